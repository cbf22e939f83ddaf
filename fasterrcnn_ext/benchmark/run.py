"""Times fasterrcnn_ext against torchvision in the same process and prints the ratios.

    fasterrcnn-ext bench                      # CPU, all groups (also: python benchmarks/run.py)
    fasterrcnn-ext bench --device cuda        # CUDA (each timed block ends with a device synchronisation)
    fasterrcnn-ext bench --quick --only nms --json out.json
    fasterrcnn-ext bench --device cuda --quick --profile   # also where each side's time goes, per case
    fasterrcnn-ext bench --markdown bench.md  # also the table for BENCHMARKS.md, with device, date and commit
    fasterrcnn-ext bench --only detector --precision fp32 bf16 int8   # also ours and the peers in bf16 and int8

Each case times ours and torchvision's in alternating blocks (ours, theirs, ours, ...), so that a change in the
machine's speed during a case (another process, clock drift) touches both sides alike, and reports each side's median
per call, with a fixed number of CPU threads (default 2, this project's machines). The speed targets live here,
never in the unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import fasterrcnn_ext

from ..engine.precision import PRECISIONS
from ..files import atomic_write, write_json
from .cases import ALL_CASES, PRECISION_GROUPS, Skipped

# A timed block repeats a fast call until it lasts this long, so that the clock's resolution and the loop's own
# overhead stay out of the figures.
BLOCK_SECONDS = 0.005
# Blocks per side at least: a median of fewer would follow a single slow run.
MIN_ROUNDS = 5


def _block_seconds(fn, calls: int, sync) -> float:
    """Seconds for ``calls`` calls of ``fn`` in a row, from a synchronised start to a synchronised end."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return time.perf_counter() - start


def _calls_per_block(fn, sync) -> int:
    calls = 1
    while _block_seconds(fn, calls, sync) < BLOCK_SECONDS:
        calls *= 2
    return calls


def interleaved_medians(ours, theirs, min_run_time: float, device: str = "cpu",
                        min_rounds: int = MIN_ROUNDS) -> tuple[float, float]:
    """The median seconds per call of ``ours`` and of ``theirs``, timed in alternating blocks until each side has had
    ``min_rounds`` blocks and ``min_run_time`` seconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sides = [(ours, _calls_per_block(ours, sync), []), (theirs, _calls_per_block(theirs, sync), [])]
    spent = [0.0, 0.0]
    while min(len(samples) for _, _, samples in sides) < min_rounds or min(spent) < min_run_time:
        for i, (fn, calls, samples) in enumerate(sides):
            elapsed = _block_seconds(fn, calls, sync)
            samples.append(elapsed / calls)
            spent[i] += elapsed
    return statistics.median(sides[0][2]), statistics.median(sides[1][2])


def profile_summary(fn, device: str, runs: int = 5, top: int = 3) -> str:
    """One line on where `fn`'s time goes: on CUDA the kernels it launches per call, their device time and the
    largest of them; on the CPU the operators (ATen's and ours) it calls per call and the largest by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device == "cuda":
        items = [(e.key, e.count, e.self_device_time_total) for e in events
                 if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        unit = "kernels"
    else:
        items = [(e.key, e.count, e.self_cpu_time_total) for e in events  # aten::, fasterrcnn_ext::, torchvision::
                 if "::" in e.key and e.self_cpu_time_total > 0]
        unit = "ops"
    total_us = sum(t for _, _, t in items)
    calls = sum(c for _, c, _ in items) / runs
    items.sort(key=lambda item: -item[2])
    largest = ", ".join(f"{name[:40]} {100 * t / total_us:.0f}%" for name, _, t in items[:top]) if total_us else "-"
    where = "on the device" if device == "cuda" else "self CPU"
    return f"{calls:.0f} {unit}/call, {total_us / runs / 1e3:.3f} ms {where}; largest: {largest}"


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def markdown_table(result: dict) -> str:
    """The results as BENCHMARKS.md's tables are written: a line on where and when, then one row per case."""
    lines = [f"{result['device_name']}; torch {result['torch']}; {result['date']}; commit {result['commit']}", "",
             "| case | ours ms | torchvision ms | speed-up | target |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["results"]:
        if "skipped" in r:
            lines.append(f"| {r['case']} | - | - | skipped: {r['skipped']} | {r['target']:.1f}x |")
            continue
        below = "" if r["speedup"] >= r["target"] else " (below)"
        lines.append(f"| {r['case']} | {_ms(r['ours_ms'])} | {_ms(r['torchvision_ms'])} | {r['speedup']:.1f}x | "
                     f"{r['target']:.1f}x{below} |")
    return "\n".join(lines) + "\n"


def run(device: str = "cpu", quick: bool = False, only: list[str] | None = None, threads: int = 2,
        json_path: str | None = None, out=None, profile: bool = False, markdown_path: str | None = None,
        precisions=("fp32",)) -> dict:
    """Times the cases of ``only`` (default: every group) and prints them; the groups of PRECISION_GROUPS at each of
    ``precisions`` (a row that cannot run here is printed and recorded as skipped, with the reason)."""
    out = out or sys.stdout
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    torch.set_num_threads(threads)
    # Steady state for both sides: freeing one large (mmap-backed) block makes glibc raise its mmap threshold, so
    # later tensors up to that size come from the heap instead of fresh, page-faulting mappings. Without this, the
    # figures depend on which benchmark ran first.
    warm = torch.empty(30 << 20, dtype=torch.uint8)
    del warm
    min_run_time = 0.2 if quick else 1.0
    groups = only or list(ALL_CASES)
    unknown = [g for g in groups if g not in ALL_CASES]
    if unknown:
        raise SystemExit(f"unknown benchmark group(s) {unknown}; choose from {list(ALL_CASES)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise SystemExit(f"--precision {bad[0] if bad else ''!r}: choose from {', '.join(PRECISIONS)}")
    rows = []
    header = f"{'case':<52} {'ours ms':>10} {'torchvision ms':>15} {'speed-up':>9} {'target':>7}"
    print(f"fasterrcnn_ext benchmark on {device} ({_device_name(device)})", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    with torch.no_grad():  # (not inference_mode: the backward cases re-enable grad)
        for group in groups:
            make = ALL_CASES[group]
            for case in make(device, precisions=tuple(precisions)) if group in PRECISION_GROUPS else make(device):
                if isinstance(case, Skipped):
                    print(f"{case.name:<52} skipped: {case.reason}", file=out, flush=True)
                    rows.append({"group": group, "case": case.name, "skipped": case.reason, "target": case.target})
                    continue
                case.ours()
                case.torchvision()  # warm-up (and lazy initialisation) outside the timing
                ours, theirs = interleaved_medians(case.ours, case.torchvision, min_run_time, device)
                ratio = theirs / ours
                mark = "" if ratio >= case.target else "  (below target)"
                print(f"{case.name:<52} {ours * 1e3:>10.3f} {theirs * 1e3:>15.3f} {ratio:>8.1f}x {case.target:>6.1f}x"
                      f"{mark}", file=out, flush=True)
                row = {"group": group, "case": case.name, "ours_ms": ours * 1e3, "torchvision_ms": theirs * 1e3,
                       "speedup": ratio, "target": case.target}
                if profile:
                    row["profile"] = {"ours": profile_summary(case.ours, device),
                                      "torchvision": profile_summary(case.torchvision, device)}
                    for side, line in row["profile"].items():
                        print(f"    {side:<12} {line}", file=out, flush=True)
                rows.append(row)
    result = {
        "device": device,
        "device_name": _device_name(device),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "torch": torch.__version__,
        "build_info": fasterrcnn_ext.build_info(),
        "threads": threads,
        "precisions": list(precisions),
        "results": rows,
    }
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}", file=out)
    if markdown_path:
        with atomic_write(markdown_path) as f:
            f.write(markdown_table(result))
        print(f"wrote {markdown_path}", file=out)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="shorter timing runs")
    p.add_argument("--only", nargs="+", metavar="GROUP", help=f"groups to run: {', '.join(ALL_CASES)}")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as a Markdown table for BENCHMARKS.md")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"], metavar="PRECISION",
                   help=f"the precisions of the detector group ({', '.join(PRECISIONS)}; default fp32): bf16 and int8 "
                   "add ours in that precision against torchvision's float32 and against OpenVINO and onnxruntime "
                   "in it, each skipped with its reason where this CPU or the peer's package lacks it")
    p.add_argument("--profile", action="store_true",
                   help="after each case, where each side's time goes (kernels per call and the largest on CUDA)")


def run_from_args(args: argparse.Namespace) -> dict:
    """run() with the arguments of add_arguments (the bench command and this script)."""
    return run(args.device, args.quick, args.only, args.threads, args.json, profile=args.profile,
               markdown_path=args.markdown, precisions=args.precision)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
