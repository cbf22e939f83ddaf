"""The low-precision accuracy gate: held-out COCO mAP of a trained detector in float32, bfloat16 and int8.

    .venv/bin/python scripts/accuracy_gate.py --out runs/gate            # trains both models, then measures
    .venv/bin/python scripts/accuracy_gate.py --demo runs/demo --out runs/gate   # reuses a demo's model.pt

Models: the demo's fasterrcnn_tiny (trained by the demo's defaults unless --demo names a finished run) and a
fasterrcnn_mobilenet_v3_large_320_fpn trained from scratch on the same synthetic shapes (--mobilenet-iters steps).
int8 calibrates on the first --calibration training images. The gate: mAP drops by at most 0.01 in int8 and at most
0.005 in bfloat16 against float32. Prints one table and writes out/gate.json; exits 1 when a gate fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

from fasterrcnn_ext.data import build_dataset
from fasterrcnn_ext.engine.checkpoint import load_checkpoint, model_from_checkpoint
from fasterrcnn_ext.engine.demo import demo
from fasterrcnn_ext.engine.evaluate import evaluate
from fasterrcnn_ext.engine.train import TrainConfig, train
from fasterrcnn_ext.files import write_json
from fasterrcnn_ext.quantization import quantize

INT8_MAX_DROP = 0.01
BF16_MAX_DROP = 0.005


def _trained(args) -> dict[str, str]:
    paths = {}
    demo_dir = args.demo or os.path.join(args.out, "demo")
    if not os.path.exists(os.path.join(demo_dir, "model.pt")):
        demo(demo_dir, progress=False)
    paths["fasterrcnn_tiny (demo)"] = os.path.join(demo_dir, "model.pt")
    if args.mobilenet_iters == 0:
        return paths
    mobilenet_dir = os.path.join(args.out, "mobilenet_v3_320")
    last = os.path.join(mobilenet_dir, "last.pt")
    if not os.path.exists(last):
        train(TrainConfig(data="synthetic", model="fasterrcnn_mobilenet_v3_large_320_fpn", out=mobilenet_dir,
                          max_iters=args.mobilenet_iters, batch_size=4, progress=False))
    paths["fasterrcnn_mobilenet_v3_large_320_fpn"] = last
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the trained models and gate.json")
    parser.add_argument("--demo", help="a finished demo run (its model.pt) instead of training one")
    parser.add_argument("--mobilenet-iters", type=int, default=1000, help="0: the demo's model only")
    parser.add_argument("--calibration", type=int, default=16, help="training images int8 calibrates on")
    parser.add_argument("--held-out", type=int, default=200)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    held_out = build_dataset("synthetic", train=False, split="val", synthetic_images=args.held_out)
    calibration = build_dataset("synthetic", train=True, split="train", synthetic_images=args.calibration)
    images = [calibration[i][0] for i in range(args.calibration)]
    rows = []
    for name, path in _trained(args).items():
        model = model_from_checkpoint(load_checkpoint(path), path).eval()
        bf16 = copy.deepcopy(model)
        bf16.inference_dtype = torch.bfloat16
        variants = {"fp32": model, "bf16": bf16, "int8": quantize(model, images)}
        row = {"model": name}
        for precision, variant in variants.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # emulated bfloat16 warns; the gate is accuracy
                row[precision] = evaluate(variant, held_out, progress=False)["map"]
            row[f"{precision}_seconds"] = round(time.perf_counter() - start, 1)
        row["int8_pass"] = row["fp32"] - row["int8"] <= INT8_MAX_DROP
        row["bf16_pass"] = row["fp32"] - row["bf16"] <= BF16_MAX_DROP
        rows.append(row)
    print(f"| model | fp32 mAP | bf16 mAP (drop <= {BF16_MAX_DROP}) | int8 mAP (drop <= {INT8_MAX_DROP}) |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['fp32']:.4f} | {row['bf16']:.4f} ({'pass' if row['bf16_pass'] else 'FAIL'})"
              f" | {row['int8']:.4f} ({'pass' if row['int8_pass'] else 'FAIL'}) |")
    write_json(os.path.join(args.out, "gate.json"), {"rows": rows, "calibration_images": args.calibration,
                                                     "held_out_images": args.held_out})
    return 0 if all(row["int8_pass"] and row["bf16_pass"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
