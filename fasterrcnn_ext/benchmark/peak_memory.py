"""Peak resident memory of inference: our detector against torchvision's, each in a fresh subprocess (so that neither
inherits the other's heap, pool or caches), on the same random image with the same random weights. A row runs the
model's builder, then CALLS forwards under torch.no_grad, and reads the process's peak RSS (the kernel's high-water
mark, which catches the short peaks that sampling would miss). Ours runs as it ships: the inference copies and the
CPU memory pool on; torchvision's float32 model plain, and in bfloat16 under CPU autocast.

    python -m fasterrcnn_ext.benchmark.peak_memory              # R50-FPN at 800x1067, float32 and bfloat16
    python -m fasterrcnn_ext.benchmark.peak_memory --quick      # MobileNet-320 at 320x427: checks that it runs

The target is ours within 1.1x of torchvision's peak. Between runs a peak varies by tens of MB (malloc's arenas,
thread timing), so each side is measured REPEATS times and the median is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

MB = 1 << 20
TARGET = 1.1
REPEATS = 3
CALLS = 2
DTYPES = ("float32", "bfloat16")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KB on Linux


def child(side: str, builder: str, dtype: str, height: int, width: int, calls: int, threads: int) -> dict:
    """One measurement, in this process (the parent runs it in a fresh one)."""
    import contextlib
    import warnings

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if side == "ours":
        from fasterrcnn_ext.models import detection as package
    else:
        from torchvision.models import detection as package
    model = getattr(package, builder)(weights=None, weights_backbone=None).eval()
    built = _peak_rss_bytes()
    autocast = contextlib.nullcontext()
    if dtype == "bfloat16":
        if side == "ours":
            model.inference_dtype = torch.bfloat16
        else:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    images = [torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad(), autocast, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfloat16 on a CPU without native support: measured all the same
        for _ in range(calls):
            model(images)
    result = {"peak_bytes": _peak_rss_bytes(), "built_bytes": built}
    if side == "ours":
        from fasterrcnn_ext.models.detection._inference import copy_extra_bytes

        copies = [(model.backbone, model._backbone_for_inference), (model.rpn.head, model._rpn_head_for_inference)]
        key = torch.bfloat16 if dtype == "bfloat16" else None
        result["copy_extra_bytes"] = sum(copy_extra_bytes(module, c._copies[key][1])
                                         for module, c in copies if key in c._copies)
    return result


def _measure(side: str, args) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "fasterrcnn_ext.benchmark.peak_memory", "--child", side, "--builder", args.builder,
           "--size", f"{args.height}x{args.width}", "--calls", str(args.calls), "--threads", str(args.threads),
           "--dtypes", args.dtypes[0]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak_memory: the {side} subprocess failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(builder: str = "fasterrcnn_resnet50_fpn", height: int = 800, width: int = 1067, dtypes=DTYPES,
        repeats: int = REPEATS, calls: int = CALLS, threads: int = 2, out=None) -> list[dict]:
    out = out or sys.stdout
    header = f"{'case':<52} {'ours MB':>9} {'torchvision MB':>15} {'ratio':>6} {'target':>7} {'copy MB':>8}"
    print(f"peak RSS of inference, {builder} at {height}x{width}, {calls} calls, median of {repeats} processes",
          file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for dtype in dtypes:
        args = argparse.Namespace(builder=builder, height=height, width=width, calls=calls, threads=threads,
                                  dtypes=[dtype])
        samples = {side: [_measure(side, args) for _ in range(repeats)] for side in ("ours", "torchvision")}
        ours = statistics.median(s["peak_bytes"] for s in samples["ours"])
        theirs = statistics.median(s["peak_bytes"] for s in samples["torchvision"])
        copy_mb = statistics.median(s["copy_extra_bytes"] for s in samples["ours"]) / MB
        ratio = ours / theirs
        mark = "" if ratio <= TARGET else "  (above target)"
        name = f"peak RSS {builder.removeprefix('fasterrcnn_')} {dtype}"
        print(f"{name:<52} {ours / MB:>9.0f} {theirs / MB:>15.0f} {ratio:>5.2f}x {TARGET:>6.1f}x {copy_mb:>8.0f}{mark}",
              file=out, flush=True)
        rows.append({"case": name, "ours_mb": ours / MB, "torchvision_mb": theirs / MB, "ratio": ratio,
                     "target": TARGET, "copy_extra_mb": copy_mb,
                     "ours_all_mb": [s["peak_bytes"] / MB for s in samples["ours"]],
                     "torchvision_all_mb": [s["peak_bytes"] / MB for s in samples["torchvision"]]})
    return rows


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 800x1067, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return h, w


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builder", default="fasterrcnn_resnet50_fpn", help="a builder both packages have")
    p.add_argument("--size", type=_size, default=None, help="image HEIGHTxWIDTH (default 800x1067)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--repeats", type=int, default=REPEATS, help="processes per side and dtype (median)")
    p.add_argument("--calls", type=int, default=CALLS, help="forwards per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="MobileNet-320 at 320x427, float32, one process a side")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--child", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.builder, args.size = "fasterrcnn_mobilenet_v3_large_320_fpn", args.size or (320, 427)
        args.dtypes, args.repeats = ["float32"], 1
    height, width = args.size or (800, 1067)
    if args.child:
        print(json.dumps(child(args.child, args.builder, args.dtypes[0], height, width, args.calls, args.threads)))
        return None
    rows = run(args.builder, height, width, args.dtypes, args.repeats, args.calls, args.threads)
    if args.json:
        from ..files import write_json

        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
