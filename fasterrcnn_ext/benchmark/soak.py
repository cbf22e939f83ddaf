"""Soak: the resident memory of many inference calls and training steps, which must level off.

    python scripts/soak.py                    # 1,000 inference calls, 150 + 200 training steps (pool on, then off)
    python scripts/soak.py --calls 100 --train-warmup 20 --train-steps 20 --json soak.json

Inference runs the detector in eval mode on images of varying sizes (so every call's activations have another
shape), once with the CPU memory pool (``reuse_cpu_memory``) and once without; training runs SGD steps on random
boxes, once without the pool and once with each step in it (as ``fasterrcnn-ext train`` runs them on the CPU).
Resident memory (RSS, /proc/self/statm) is sampled after every call. A phase passes when its growth over its second
half, the highest RSS of the last quarter minus the highest of the second quarter, is within the bound: whatever a
run needs is allocated in its first half (the pool's cache, glibc's arenas, torch's caches), so a leak shows as
growth after it.

Training first runs unmeasured warm-up steps: its RSS climbs for about 150 steps (2.3 passes over the 64 image
sizes) before it levels off, as torchvision's own model does in the same loop, because glibc keeps the freed blocks
of each shape's autograd graph in its arenas. The measured steps after the warm-up must then be flat like inference.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _image_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [(int(h), int(w)) for h, w in torch.randint(200, 520, (count, 2), generator=g)]


def second_half_growth(samples: list[int]) -> int:
    """max(RSS over the last quarter) - max(RSS over the second quarter), in bytes."""
    n = len(samples)
    if n < 4:
        return 0
    return max(samples[3 * n // 4:]) - max(samples[n // 4: n // 2])


def _phase(name: str, steps: int, step, bound_bytes: int, log, warmup: int = 0) -> dict:
    """Runs ``warmup`` unmeasured steps, then ``steps`` measured ones; the figures of the measured ones."""
    for i in range(warmup):
        step(i)
        if log and (i + 1) % max(1, warmup // 5) == 0:
            log(f"{name} warm-up: {i + 1}/{warmup}, RSS {rss_bytes() / MB:.0f} MB")
    gc.collect()
    start = rss_bytes()
    samples = []
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
        samples.append(rss_bytes())
        if log and (i + 1) % max(1, steps // 10) == 0:
            log(f"{name}: {i + 1}/{steps}, RSS {samples[-1] / MB:.0f} MB")
    growth = second_half_growth(samples)
    return {"phase": name, "warmup_steps": warmup, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "rss_start_mb": round(start / MB, 1), "rss_peak_mb": round(max(samples, default=start) / MB, 1),
            "rss_end_mb": round(samples[-1] / MB if samples else start / MB, 1),
            "second_half_growth_mb": round(growth / MB, 1), "bound_mb": round(bound_bytes / MB, 1),
            "flat": growth <= bound_bytes}


def run(model_name: str = "fasterrcnn_mobilenet_v3_large_fpn", calls: int = 1000, train_steps: int = 200,
        bound_mb: float = 32.0, min_size: int = 320, max_size: int = 640, train_warmup: int = 150,
        log=print) -> list[dict]:
    """The soak's phases (inference with the pool, without it, training); one dict of figures per phase."""
    from ..memory import cpu_pool, empty_cpu_cache, training_cache_limit
    from ..models import detection

    torch.manual_seed(0)
    builder = getattr(detection, model_name)
    kwargs = {} if model_name == "fasterrcnn_tiny" else dict(weights=None, weights_backbone=None, min_size=min_size,
                                                              max_size=max_size)
    model = builder(num_classes=5, **kwargs)
    sizes = _image_sizes(64, seed=1)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    bound = int(bound_mb * MB)
    results = []

    model.eval()
    for pool in (True, False):
        model.reuse_cpu_memory = pool
        empty_cpu_cache()

        def infer(i):
            with torch.no_grad():
                model([images[i % len(images)]])

        results.append(_phase(f"inference, pool {'on' if pool else 'off'}", calls, infer, bound, log))
    empty_cpu_cache()

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    # Off first: glibc's arenas then warm up as in torchvision's loop. (After a pooled phase and the release of its
    # cache, the unpooled steps' RSS still wandered by ~50 MB after 150 warm-up steps.) On: as fasterrcnn-ext train
    # runs each CPU step.
    for pool in (False, True):

        def train_step(i, pool=pool):
            image = images[i % len(images)]
            h, w = image.shape[-2:]
            xy = torch.rand(3, 2, generator=g) * torch.tensor([w / 2, h / 2])
            boxes = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 60 + 10], 1)
            with cpu_pool() if pool else contextlib.nullcontext():
                losses = model([image], [{"boxes": boxes, "labels": torch.randint(1, 5, (3,), generator=g)}])
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                optimizer.step()

        with training_cache_limit() if pool else contextlib.nullcontext():
            results.append(_phase(f"training, pool {'on' if pool else 'off'}", train_steps, train_step, bound, log,
                                  warmup=train_warmup))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_fpn")
    parser.add_argument("--calls", type=int, default=1000, help="inference calls per phase (pool on, pool off)")
    parser.add_argument("--train-steps", type=int, default=200, help="measured training steps")
    parser.add_argument("--train-warmup", type=int, default=150, help="training steps run before measuring")
    parser.add_argument("--bound-mb", type=float, default=32.0, help="allowed RSS growth over a phase's second half")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.model, args.calls, args.train_steps, args.bound_mb, train_warmup=args.train_warmup)
    for r in results:
        warm = f" after {r['warmup_steps']} warm-up" if r["warmup_steps"] else ""
        print(f"{r['phase']:<22} {r['steps']:>5} steps{warm} {r['seconds']:>7.1f} s  RSS {r['rss_start_mb']:.0f} -> "
              f"peak {r['rss_peak_mb']:.0f} -> end {r['rss_end_mb']:.0f} MB, second-half growth "
              f"{r['second_half_growth_mb']:+.1f} MB (bound {r['bound_mb']:.0f}): {'flat' if r['flat'] else 'GROWS'}")
    if args.json:
        from ..files import write_json

        write_json(args.json, {"model": args.model, "threads": args.threads, "phases": results})
    return 0 if all(r["flat"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
