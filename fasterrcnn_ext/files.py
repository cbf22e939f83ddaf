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


def read_checkpoint_file(path):
    """torch.load on the CPU, weights only; FileNotFoundError or ValueError naming the file."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!s} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a corrupt checkpoint for the user
        raise ValueError(f"checkpoint {path!s} could not be read: {e}") from e


def load_checkpoint_state_dict(path) -> dict:
    """The model state_dict of a checkpoint file: a bare state_dict, or a training checkpoint with a "model" entry."""
    import torch

    checkpoint = read_checkpoint_file(path)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path!s} holds no model state_dict")
    return state
