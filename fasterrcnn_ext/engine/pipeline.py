"""Detection over image collections of any size: decoded ahead by DataLoader workers, batched by image size,
sharded exactly over torchrun's processes, streamed to JSON Lines and resumable.

Files in the output folder:
    parts/rank<R>.jsonl  while running: one line per finished image, appended by rank R and synced per batch
    detections.jsonl     one line per detected image: file_name, image_id, width, height, boxes (x1y1x2y2),
                         labels, scores, picture (the PNG's name, or null)
    detections.json      the COCO results file; images.json (image_id to file); failures.json (unreadable images)
    run.json             the weights and threshold the folder's detections come from
    <stem>.png           pictures of the first ``pictures`` images

A run stopped at any point (Ctrl-C, a killed process, a crash) and started again with the same output folder skips
the images its lines name; a torn last line (a process killed mid-write) is dropped and its image detected again.
The final files are written by rank 0 after every rank finishes, each atomically, from all lines: every image
appears once.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

from .._arguments import argument_error
from ..data import load_image
from ..files import atomic_write, write_json
from .evaluate import detections_to_coco

# The most images drawn by default: past this many inputs, no pictures unless asked for.
DEFAULT_PICTURES_LIMIT = 100
# The text files an input names a list of image paths in (one a line; relative paths from the list's folder).
LIST_EXTENSIONS = (".txt", ".lst")


def expand_inputs(inputs: list[str], image_extensions) -> list[str]:
    """Image files, folders (searched recursively, sorted), globs (``**`` recursive) and text files of paths
    (LIST_EXTENSIONS) to the list of image files, in the order given. A missing file or folder, a glob matching
    nothing, or a folder without images is an error naming it; a listed path that cannot be read fails later, as
    one image."""
    paths: list[str] = []
    missing = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(p) for name in names
                           if name.lower().endswith(image_extensions))
            if not found:
                raise ValueError(f"folder {p} holds no image files ({', '.join(image_extensions)})")
            paths += found
        elif os.path.isfile(p) and p.lower().endswith(LIST_EXTENSIONS):
            base = os.path.dirname(os.path.abspath(p))
            with open(p) as f:
                listed = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
            paths += [q if os.path.isabs(q) else os.path.join(base, q) for q in listed]
        elif os.path.exists(p):
            paths.append(p)
        elif glob.has_magic(p):
            found = sorted(q for q in glob.glob(p, recursive=True) if os.path.isfile(q))
            if not found:
                raise FileNotFoundError(f"{p} matches no files")
            paths += found
        else:
            missing.append(p)
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    return paths


class _Images(torch.utils.data.Dataset):
    """(index, image or None, error message or None): a bad file is reported, not raised, so that the main process
    warns about it and goes on."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return index, load_image(path), None
        except (ValueError, OSError) as e:
            return index, None, str(e) if path in str(e) else f"image file {path}: {e}"


def _identity(item):
    return item


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the loader's workers too; the main process stops, its lines already synced.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def size_batches(items, batch_size: int, window: int):
    """Batches of up to ``batch_size`` images of one size (H, W), from at most ``window`` images held at a time:
    no image is padded for another, so a batch's detections equal each image's alone (within float tolerance).
    Unreadable items pass on at once, alone."""
    buckets: dict[tuple, list] = {}
    held = 0
    for item in items:
        if item[1] is None:
            yield [item]
            continue
        key = tuple(item[1].shape[-2:])
        bucket = buckets.setdefault(key, [])
        bucket.append(item)
        held += 1
        if len(bucket) == batch_size:
            held -= len(buckets.pop(key))
            yield bucket
        elif held >= window:  # the fullest bucket goes, so that memory stays bounded
            key = max(buckets, key=lambda k: len(buckets[k]))
            bucket = buckets.pop(key)
            held -= len(bucket)
            yield bucket
    yield from buckets.values()


def _read_lines(path: str) -> list[dict]:
    """The whole JSON lines of a file; a torn or unparsable line (a process killed mid-write) is left out."""
    records = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return records
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "file_name" in record:
            records.append(record)
    return records


def _open_part(path: str):
    """The rank's part file for appending, cut after its last whole line first (a torn line would spoil the next)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a")


def _picture_names(paths: list[str]) -> list[str]:
    names, used = [], set()
    for position, path in enumerate(paths, start=1):
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        if name in used:  # two inputs with one stem: keep both pictures
            name = f"{position:04d}_{name}"
        used.add(name)
        names.append(name)
    return names


def init_distributed(device: str):
    """(rank, world size, device) of this process; under torchrun (WORLD_SIZE > 1) the process group is joined (gloo
    on the CPU, nccl with CUDA, one GPU per local rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world_size, dev


def _check_run(out: str, run: dict, rank: int) -> None:
    """The folder's run.json must describe this run: a folder holds the detections of one model and threshold."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier != run:
            raise argument_error(ValueError, "{out} holds detections of another run ({earlier:value}); this run is "
                                 "{run:value}: choose another {out:name}", out=out, earlier=earlier, run=run)
    elif rank == 0:
        write_json(path, run)


# A decoding process costs about 0.5 s to start (a process importing torch): a collection smaller than this, per
# process, is decoded faster in the main process.
MIN_IMAGES_FOR_WORKERS = 32
MAX_DEFAULT_WORKERS = 4


def default_workers(num_images: int, device: str) -> int:
    """The decoding processes that pay for this run: none for fewer than MIN_IMAGES_FOR_WORKERS images; on CUDA every
    core but the main process's (the model runs on the GPU); on the CPU only the cores beyond the model's own threads
    (torch.get_num_threads()), which decoding would otherwise take from the model. At most MAX_DEFAULT_WORKERS."""
    if num_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cores - 1 if str(device).startswith("cuda") else cores - torch.get_num_threads()
    return max(0, min(MAX_DEFAULT_WORKERS, spare))


def run_detect(paths: list[str], ids: list[int], model, class_names, category_ids, out: str, *,
               run: dict, score_thresh: float = 0.5, device: str = "cpu", batch_size: int = 1,
               workers: int | None = None,
               pictures: int | None = None, progress: bool = True) -> list[dict] | None:
    """Detects ``paths`` (with COCO ``ids``) into ``out`` as the module describes. Under torchrun, rank r takes
    images r, r + K, r + 2K, ... of those not done yet; rank 0 merges and returns the COCO results (other ranks
    return None). Raises ValueError, leaving no folder it made, where no image could be detected."""
    from .detect import draw_detections, save_png

    rank, world_size, dev = init_distributed(device)
    fresh = not os.path.exists(out)
    _check_run(out, run, rank)
    if pictures is None:
        pictures = len(paths) if len(paths) <= DEFAULT_PICTURES_LIMIT else 0
    names = _picture_names(paths)
    parts = os.path.join(out, "parts")
    done = {r["file_name"] for r in _done_records(out, parts)}
    abspaths = [os.path.abspath(p) for p in paths]
    todo = [i for i in range(rank, len(paths), world_size) if abspaths[i] not in done]
    model.eval().to(dev)
    if workers is None:
        workers = default_workers(len(todo), str(dev))
    loader = torch.utils.data.DataLoader(_Images(paths), batch_size=None, sampler=todo, collate_fn=_identity,
                                         num_workers=min(workers, len(todo)), worker_init_fn=_ignore_sigint,
                                         prefetch_factor=max(2, batch_size) if workers and todo else None)
    bar = tqdm(total=len(todo), desc=f"detect (rank {rank})" if world_size > 1 else "detect", unit="img",
               disable=not progress or rank != 0, dynamic_ncols=True)
    part = _open_part(os.path.join(parts, f"rank{rank}.jsonl"))
    try:
        for batch in size_batches(loader, batch_size, window=8 * batch_size):
            records = []
            for (index, image, error), detections in zip(batch, _forward(model, batch, dev)):
                if isinstance(detections, str):
                    error = f"image file {paths[index]}: {detections}"
                if error is not None:
                    warnings.warn(f"skipping image: {error}", stacklevel=2)
                    records.append({"file_name": abspaths[index], "error": error})
                    continue
                keep = detections["scores"] >= score_thresh
                detections = {k: v[keep] for k, v in detections.items()}
                picture = None
                if index < pictures:
                    picture = names[index]
                    with atomic_write(os.path.join(out, picture), binary=True) as f:
                        save_png(draw_detections(image, detections, class_names), f)
                records.append({"file_name": abspaths[index], "image_id": int(ids[index]),
                                "width": int(image.shape[-1]), "height": int(image.shape[-2]),
                                "boxes": [[round(v, 2) for v in box] for box in detections["boxes"].float().tolist()],
                                "labels": detections["labels"].tolist(),
                                "scores": [round(s, 5) for s in detections["scores"].float().tolist()],
                                "picture": picture})
            part.write("".join(json.dumps(r) + "\n" for r in records))
            part.flush()
            os.fsync(part.fileno())
            bar.update(len(batch))
    finally:
        part.close()
        bar.close()
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return None
    return _merge(out, parts, abspaths, category_ids, fresh)


def _forward(model, batch, dev) -> list:
    """The detections of each readable image of ``batch`` (None for the unreadable), or an error message for an
    image the model rejects: a batch that fails is run again one image at a time to tell which."""
    images = [image for _, image, _ in batch if image is not None]
    if not images:
        return [None] * len(batch)
    try:
        with torch.inference_mode():
            outputs = iter([{k: v.cpu() for k, v in o.items()} for o in model([im.to(dev) for im in images])])
        return [next(outputs) if image is not None else None for _, image, _ in batch]
    except (ValueError, OSError) as e:
        if len(images) > 1:
            return [_forward(model, [item], dev)[0] for item in batch]
        return [str(e) if image is not None else None for _, image, _ in batch]


def _done_records(out: str, parts: str) -> list[dict]:
    records = _read_lines(os.path.join(out, "detections.jsonl"))
    failures = os.path.join(out, "failures.json")
    if os.path.exists(failures):
        with open(failures) as f:
            records += json.load(f)
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        if name.endswith(".jsonl"):
            records += _read_lines(os.path.join(parts, name))
    return records


def _merge(out: str, parts: str, abspaths: list[str], category_ids, fresh: bool) -> list[dict]:
    """The final files from the merged lines and the parts, one record per input image in input order; then the
    parts go."""
    by_file: dict[str, dict] = {}
    for record in _done_records(out, parts):
        by_file.setdefault(record["file_name"], record)
    ordered = [by_file[p] for p in dict.fromkeys(abspaths) if p in by_file]
    detected = [r for r in ordered if "error" not in r]
    failures = [{"file_name": r["file_name"], "error": r["error"]} for r in ordered if "error" in r]
    if not detected:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"no image could be detected: {'; '.join(f['error'] for f in failures)}")
    results = []
    for r in detected:
        detections = {"boxes": torch.tensor(r["boxes"], dtype=torch.float32).reshape(-1, 4),
                      "labels": torch.tensor(r["labels"], dtype=torch.int64),
                      "scores": torch.tensor(r["scores"], dtype=torch.float32)}
        results += detections_to_coco(detections, r["image_id"], category_ids)
    with atomic_write(os.path.join(out, "detections.jsonl")) as f:
        f.write("".join(json.dumps(r) + "\n" for r in detected))
    write_json(os.path.join(out, "detections.json"), results)
    write_json(os.path.join(out, "images.json"),
               [{"id": r["image_id"], "file_name": r["file_name"], "picture": r["picture"]} for r in detected])
    failures_file = os.path.join(out, "failures.json")
    if failures:
        write_json(failures_file, failures)
        print(f"{len(failures)} of {len(abspaths)} images skipped: {failures_file}", file=sys.stderr, flush=True)
    elif os.path.exists(failures_file):  # an earlier run's list, which no longer describes these inputs
        os.remove(failures_file)
    shutil.rmtree(parts, ignore_errors=True)
    return results
