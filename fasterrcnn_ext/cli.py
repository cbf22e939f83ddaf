"""The ``fasterrcnn-ext`` command (also ``python -m fasterrcnn_ext``).

    fasterrcnn-ext demo --out runs/demo                       # synthetic data, about 4 min on 2 CPU cores
    fasterrcnn-ext train --data synthetic --model fasterrcnn_tiny --out runs/a --max-iters 1000
    torchrun --nproc_per_node 2 -m fasterrcnn_ext train --data DIR --model fasterrcnn_resnet50_fpn --out runs/b \
        --epochs 12
    fasterrcnn-ext train ... --resume runs/a/last.pt          # continue (also after Ctrl-C)
    fasterrcnn-ext eval --data DIR --weights runs/b/last.pt --out runs/b/eval
    fasterrcnn-ext detect img1.jpg imgs/ --weights runs/a/last.pt --out runs/a/detect --batch-size 4
    fasterrcnn-ext detect imgs/ --weights W --out runs/q --precision int8        # or bf16: README, Precision
    torchrun --nproc_per_node 2 -m fasterrcnn_ext detect 'imgs/**/*.jpg' --weights W --out runs/d  # a rerun continues
    fasterrcnn-ext bench --quick
    fasterrcnn-ext export --weights runs/a/last.pt --format onnx --out detector.onnx   # or torchscript, pt2, aoti
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

# The library's errors name its functions' arguments (fasterrcnn_ext/_arguments.py); the command line names the flag
# that sets each: --NAME with dashes for underscores, else this table's.
FLAG_OF_ARGUMENT = {
    "model_name": "--model",  # load_detector, detect
    "coco": "--data",  # detect: the images of a COCO-format folder
    "root": "--data",  # CocoDetection, find_annotation_file
    "fmt": "--format",  # export_detector
    "image_paths": "images",  # detect: the positional image arguments
    "count": "--calibration-images",  # load_calibration_images
    "precisions": "--precision",  # bench: detector_cases
}


def flag_of(argument: str) -> str:
    """The command-line flag that sets the library argument ``argument``."""
    return FLAG_OF_ARGUMENT.get(argument, "--" + argument.replace("_", "-"))


def _add_state_dict_model(p) -> None:
    from .engine.checkpoint import MODEL_BUILDERS

    p.add_argument("--model", choices=list(MODEL_BUILDERS), help="the builder whose state_dict --weights holds, "
                   "for a bare state_dict file (a torchvision-trained .pth)")


def _add_precision(p, source: str) -> None:
    from .engine.precision import CALIBRATION_IMAGES, PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (as trained), bf16 (the bfloat16 "
                   "inference mode: for CPUs with AMX or AVX512-BF16) or int8 (post-training quantization, "
                   "calibrated on a few images: for CPUs with AMX or VNNI); README: Precision")
    p.add_argument("--calibration", metavar="DIR", help=f"int8: calibrate on these images (a folder, glob or list "
                   f"file, read as detect reads images) instead of {source}")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"int8: the number of images it calibrates on (default {CALIBRATION_IMAGES})")


def _add_train(sub) -> None:
    from .engine.checkpoint import MODEL_BUILDERS
    from .engine.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a detector (torchrun for several processes)")
    p.add_argument("--data", required=True, help="'synthetic' or a COCO-format folder "
                   "(annotations/instances_<split>*.json plus images)")
    p.add_argument("--model", default=d.model, choices=list(MODEL_BUILDERS))
    p.add_argument("--out", required=True, help="folder for last.pt, log.txt and losses.jsonl")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--max-iters", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=int, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step and process")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (SGD, warm-up then cosine)")
    p.add_argument("--warmup-iters", type=int, default=d.warmup_iters)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--resume", metavar="CKPT", help="continue from a last.pt")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between saves")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss log lines")
    p.add_argument("--skip-bad-images", action="store_true", help="warn and skip unreadable images")
    p.add_argument("--weights-backbone", help="torchvision ImageNet weights for the backbone (e.g. DEFAULT)")
    p.add_argument("--train-split", default=d.train_split, help="annotation split of --data DIR")
    p.add_argument("--synthetic-images", type=int, default=d.synthetic_images, help="size of --data synthetic")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-reuse-cpu-memory", dest="reuse_cpu_memory", action="store_false",
                   help="on the CPU, do not keep each step's large blocks for the next step (the CPU memory pool)")
    p.set_defaults(run=_run_train)


@contextlib.contextmanager
def _process_group_destroyed():
    """The torch.distributed process group that the command made under torchrun, if any, destroyed on the way out
    (after an error too)."""
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run_train(args) -> int:
    from .engine.train import TrainConfig, train

    fields = set(TrainConfig.__dataclass_fields__)
    with _process_group_destroyed():
        result = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    if result["interrupted"]:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"continue with {flag_of('resume')} {result['checkpoint']}", file=sys.stderr, flush=True)
        return 130
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint")
    p.add_argument("--data", required=True, help="'synthetic' (held-out images) or a COCO-format folder")
    p.add_argument("--weights", required=True, metavar="CKPT")
    _add_state_dict_model(p)
    p.add_argument("--out", required=True, help="folder for metrics.json and detections.json")
    p.add_argument("--split", default="val", help="annotation split of --data DIR")
    p.add_argument("--synthetic-images", type=int, default=200, help="held-out images of --data synthetic")
    p.add_argument("--seed", type=int, default=0, help="the training seed of --data synthetic")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_precision(p, "the first images evaluated (for an unbiased mAP, calibrate on other images)")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    with _process_group_destroyed():
        return _eval(args)


def _eval(args) -> int:
    from .data import build_dataset
    from .engine.checkpoint import load_checkpoint, model_from_checkpoint
    from .engine.detect import load_detector
    from .engine.evaluate import evaluate
    from .engine.pipeline import init_distributed

    dataset = build_dataset(args.data, train=False, split=args.split, seed=args.seed,
                            synthetic_images=args.synthetic_images)
    if args.model is None:
        checkpoint = load_checkpoint(args.weights)
        if list(checkpoint["class_names"]) != list(dataset.class_names):
            raise ValueError(f"--weights {args.weights} detects {len(checkpoint['class_names'])} classes "
                             f"({', '.join(checkpoint['class_names'])}); --data {args.data} has "
                             f"{len(dataset.class_names)} ({', '.join(dataset.class_names)})")
        model = model_from_checkpoint(checkpoint, args.weights)
    else:  # a state_dict file of --model: its labels are taken as the dataset's, which must be as many
        model, _, _ = load_detector(args.weights, args.model)
        classes = model.roi_heads.box_predictor.cls_score.out_features
        if classes != dataset.num_classes:
            raise ValueError(f"--weights {args.weights} detects {classes - 1} classes; --data {args.data} has "
                             f"{dataset.num_classes - 1} ({', '.join(dataset.class_names)})")
    model = _eval_precision(model, dataset, args)
    _, _, device = init_distributed(args.device)
    metrics = evaluate(model, dataset, batch_size=args.batch_size, device=device, workers=args.workers,
                       progress=args.progress, out=args.out, precision=args.precision)
    if metrics is None:  # a torchrun rank other than 0
        return 0
    print(metrics.get("summary", ""), end="")
    print(json.dumps({k: metrics[k] for k in ("map", "map_50", "map_75")}))
    return 0


def _eval_precision(model, dataset, args):
    """The model at eval's --precision; int8 calibrates on --calibration, else on the dataset's first images."""
    from .engine.precision import calibration_paths, check_precision, load_calibration_images, with_precision

    check_precision(args.precision, args.device)
    if args.calibration is not None and args.precision != "int8":
        raise ValueError(f"--calibration applies to --precision int8, not {args.precision}")
    images = None
    if args.precision == "int8":
        if args.calibration is not None:
            images = load_calibration_images(calibration_paths(args.calibration), args.calibration_images)
        else:
            if args.calibration_images < 1:
                raise ValueError(f"--calibration-images {args.calibration_images}: at least 1")
            images = [dataset[i][0] for i in range(min(args.calibration_images, len(dataset)))]
    return with_precision(model, args.precision, images, args.device)


def _add_detect(sub) -> None:
    p = sub.add_parser("detect", help="detections (JSON Lines, COCO results) and pictures for image collections; "
                       "torchrun shards them, a rerun continues")
    p.add_argument("images", nargs="*", help="image files, folders (searched recursively), globs ('imgs/**/*.jpg') "
                   "or .txt/.lst files of image paths")
    p.add_argument("--data", metavar="DIR", help="the images of a COCO-format folder instead (ids from its "
                   "annotation file)")
    p.add_argument("--split", default="val", help="annotation split of --data DIR")
    p.add_argument("--weights", required=True, help="a checkpoint, or torchvision weights such as "
                   "FasterRCNN_ResNet50_FPN_Weights.DEFAULT")
    _add_state_dict_model(p)
    p.add_argument("--out", required=True, help="folder for detections.jsonl, detections.json, images.json and "
                   "pictures; run again with the same folder to continue a stopped run")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (batches hold images of one "
                   "size)")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes (default: the cores the model leaves free, none below 32 images)")
    p.add_argument("--pictures", type=int, metavar="N", help="draw the first N images (default: all of up to 100 "
                   "images, else none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_precision(p, "the run's first images")
    p.set_defaults(run=_run_detect)


def _run_detect(args) -> int:
    from .engine.detect import detect

    try:
        with _process_group_destroyed():
            detect(args.images, args.weights, args.out, score_thresh=args.score_thresh, device=args.device,
                   model_name=args.model, batch_size=args.batch_size, workers=args.workers, pictures=args.pictures,
                   coco=args.data, split=args.split, progress=args.progress, precision=args.precision,
                   calibration=args.calibration, calibration_images=args.calibration_images)
    except KeyboardInterrupt:
        print(f"interrupted: the images done are in {args.out}/parts; run the same command to continue",
              file=sys.stderr)
        return 130
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train on synthetic shapes, evaluate, draw (about 4 min on 2 CPU cores)")
    p.add_argument("--out", default="runs/demo", help="output folder (out-2, out-3, ... if it holds a run)")
    p.add_argument("--max-iters", type=int, default=1500)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(run=_run_demo)


def _unused_folder(out: str) -> str:
    """``out`` if it holds no earlier run, else the first of out-2, out-3, ... that does not: a rerun of the README's
    command never touches a finished run."""
    def used(folder):
        return any(os.path.exists(os.path.join(folder, f)) for f in ("last.pt", "model.pt", "metrics.json"))

    candidate, n = out, 1
    while used(candidate):
        n += 1
        candidate = f"{out.rstrip(os.sep)}-{n}"
    if candidate != out:
        print(f"{out} holds an earlier run; writing to {candidate}", file=sys.stderr)
    return candidate


def _run_demo(args) -> int:
    from .engine.demo import demo

    args.out = _unused_folder(args.out)
    metrics = demo(args.out, max_iters=args.max_iters, train_images=args.train_images, val_images=args.val_images,
                   batch_size=args.batch_size, seed=args.seed, device=args.device, progress=args.progress)
    print(metrics.get("summary", ""), end="")
    print(f"held-out mAP@0.5 {metrics['map_50']:.3f}, mAP {metrics['map']:.3f} "
          f"({metrics['total_seconds']:.0f} s); wrote {args.out}/metrics.json, model.pt and pictures/")
    return 0


def _add_bench(sub) -> None:
    from .benchmark.run import add_arguments

    p = sub.add_parser("bench", help="benchmark ops and detector against torchvision")
    add_arguments(p)
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from .benchmark.run import run_from_args

    run_from_args(args)
    return 0


def _add_export(sub) -> None:
    from .engine.export import FORMATS, ONNX_OPSET

    p = sub.add_parser("export", help="the detector as an ONNX, TorchScript, torch.export or AOTInductor file for "
                       "serving")
    p.add_argument("--weights", required=True, help="a checkpoint, or torchvision weights such as "
                   "FasterRCNN_ResNet50_FPN_Weights.DEFAULT")
    _add_state_dict_model(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (onnxruntime, standard operators), "
                   "torchscript (LibTorch), pt2 (torch.export, any image size), aoti (AOTInductor, one image size)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                   help="the example image traced for onnx and pt2 (their graphs take any size); "
                   "the one image size an aoti package takes")
    p.add_argument("--opset", type=int, default=ONNX_OPSET)
    p.add_argument("--dynamo", action="store_true", help="onnx through the torch.export-based exporter (our ops "
                   "translated to standard ONNX operators) instead of the TorchScript-based one")
    p.add_argument("--fixed-shape", action="store_true", help="one tensor images [N, 3, H, W] in; boxes [N, K, 4], "
                   "scores [N, K], labels [N, K], counts [N] out (K detections per image, zero-padded)")
    p.add_argument("--batch-size", type=int, default=1, help="N, the images per call of a --fixed-shape export")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .engine.detect import load_detector
    from .engine.export import export_detector

    model, _, _ = load_detector(args.weights, args.model)
    if args.dynamo and args.format != "onnx":
        raise ValueError(f"--dynamo chooses the ONNX exporter: it applies to --format onnx, not {args.format}")
    if args.batch_size != 1 and not args.fixed_shape:
        raise ValueError("--batch-size applies to --fixed-shape exports")
    export_detector(model, args.format, args.out, tuple(args.image_size), args.opset, dynamo=args.dynamo,
                    fixed_shape=args.fixed_shape, batch_size=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasterrcnn-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_detect, _add_demo, _add_bench, _add_export):
        add(sub)
    return parser


def main(argv=None) -> int:
    from ._arguments import cli_message

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ConnectionError) as e:
        # Bad input: one line naming the problem (in the flags that set it), not a traceback.
        print(f"fasterrcnn-ext {args.command}: error: {cli_message(e, flag_of)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
