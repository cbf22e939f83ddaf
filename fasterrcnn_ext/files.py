"""Files: result files and checkpoints written atomically (a crash or Ctrl-C mid-write leaves the previous file whole,
never half a file), and checkpoint files read with errors that name the file. engine/checkpoint.py builds on these
for training checkpoints; the model builders read weights files with them."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status), else set and
    restored under a lock (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, binary: bool = False):
    """Yields a file in ``path``'s folder; on a clean exit it is synced and renamed over ``path``, else removed.
    The file gets the mode a plain ``open(path, "w")`` would give (0o666 less the umask), not the temporary file's
    private 0o600, so a shared runs folder stays readable."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> None:
    with atomic_write(path) as f:
        json.dump(value, f, indent=1)


def is_checkpoint_path(weights) -> bool:
    """Whether a ``weights=`` argument names a local checkpoint file (an existing path, or a .pt/.pth name) rather
    than torchvision weights (an enum or its name)."""
    return isinstance(weights, (str, os.PathLike)) and (os.path.exists(weights)
                                                        or str(weights).endswith((".pt", ".pth")))


def _file_kind(path) -> str | None:
    """What a file that torch.load cannot read is, where its first bytes or zip entries tell: a TorchScript
    archive, a torch.export or AOTInductor package, an ONNX model, text. None where they do not."""
    import zipfile

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            return "a TorchScript file (torch.jit.save): load it with torch.jit.load"
        if any("/archive_format" in n or n == "archive_format" or "/aotinductor/" in n for n in names):
            return ("a torch.export or AOTInductor package: load it with torch.export.load or "
                    "torch._inductor.aoti_load_package")
        return None
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"onnx" in head[:256].lower() or head.startswith(b"\x08"):
        return "an ONNX model: run it with onnxruntime"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file"


def read_checkpoint_file(path):
    """torch.load on the CPU, weights only; FileNotFoundError or ValueError naming the file and, where it can be
    told, what the file is instead of a checkpoint."""
    import torch

    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!s} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!s} does not exist")
    not_a_checkpoint = (f"checkpoint {path!s} could not be read: it is {{}}; a checkpoint is a torch.save file "
                        "of a state_dict or of a training checkpoint")
    import zipfile

    if zipfile.is_zipfile(path) and (kind := _file_kind(path)) is not None:  # before torch.load, which would warn
        raise ValueError(not_a_checkpoint.format(kind))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a corrupt checkpoint for the user
        kind = _file_kind(path)
        if kind is not None:
            raise ValueError(not_a_checkpoint.format(kind)) from e
        raise ValueError(f"checkpoint {path!s} could not be read as a PyTorch checkpoint (torch.save file): "
                         f"{_load_failure_reason(e)}") from e


def _load_failure_reason(error: Exception) -> str:
    """torch.load's error without its advice to load with weights_only=False (which runs arbitrary code from the
    file): the lines that say what was wrong."""
    advice = ("weights_only", "PyTorch 2.6", "file an issue", "documentation", "trusted source", "Weights only load")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    facts = [line for line in lines if not any(a in line for a in advice)]
    return f"{type(error).__name__}: {'; '.join(facts)[:300]}" if facts else type(error).__name__


def describe_checkpoint(checkpoint) -> str:
    """What a checkpoint holds, for errors: "a fasterrcnn_tiny with 5 classes", "a state_dict of 12 tensors with
    91 classes", ..."""
    if isinstance(checkpoint, dict) and "model_name" in checkpoint:
        return f"a {checkpoint['model_name']} with {checkpoint.get('num_classes')} classes"
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return f"a {type(checkpoint).__name__}, not a state_dict"
    predictor = state.get("roi_heads.box_predictor.cls_score.weight")
    classes = f" with {predictor.shape[0]} classes" if hasattr(predictor, "shape") else " of no Faster R-CNN"
    first = next(iter(state), None)
    return f"a state_dict of {len(state)} tensors{classes} (first key {first!r})"


def load_checkpoint_state_dict(path) -> dict:
    """The model state_dict of a checkpoint file: a bare state_dict, or a training checkpoint with a "model" entry."""
    return state_dict_of(read_checkpoint_file(path), path)


def state_dict_of(checkpoint, path) -> dict:
    """The model state_dict in a checkpoint already read from ``path``: the checkpoint itself, or its "model"
    entry; ValueError naming the file where there is none."""
    import torch

    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path!s} holds no model state_dict")
    return state


class WeightsDownloadError(ConnectionError):
    """torchvision's weights could not be downloaded (no network, a proxy, a server error)."""


@contextlib.contextmanager
def named_weights_downloads(what: str):
    """Turns a failed download of torchvision's weights inside the block (torch.hub's load_state_dict_from_url) into
    one WeightsDownloadError naming ``what``, the URL and the file torch.hub caches it as, so that an offline machine
    can be given the file by hand. Other errors pass unchanged."""
    try:
        yield
    except OSError as e:  # urllib's URLError, ConnectionError, socket timeouts: all OSError
        url = cached = None
        tb = e.__traceback__
        while tb is not None:  # the frame of torch.hub.load_state_dict_from_url holds the URL and the cache path
            if tb.tb_frame.f_code.co_name == "load_state_dict_from_url":
                url, cached = tb.tb_frame.f_locals.get("url"), tb.tb_frame.f_locals.get("cached_file")
            tb = tb.tb_next
        if url is None:
            raise
        reason = getattr(e, "reason", None) or e
        raise WeightsDownloadError(f"{what}: could not download {url} ({reason}); torchvision caches it as "
                                   f"{cached}: copy the file there to use it offline") from e
