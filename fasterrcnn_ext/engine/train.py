"""Training: one process, or one per device under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on GPU).

The loop counts optimizer steps (``iteration``). Every ``checkpoint_every`` steps, at the end, and on Ctrl-C or
SIGTERM, rank 0 writes ``<out>/last.pt`` atomically with the model, optimizer, scheduler, grad scaler, RNG state,
``iteration`` and the arguments; ``resume`` continues from it with the same data order and learning-rate schedule.
Losses go to a tqdm bar and ``<out>/log.txt`` on rank 0 in the classic Faster R-CNN log format (the median of the
last 20 steps, then the run's mean in brackets), and one JSON line per log step to ``<out>/losses.jsonl``, the loss
curve, which a resumed run appends to.

On the CPU each step (forward, backward, optimizer update) runs inside the CPU memory pool
(``fasterrcnn_ext.memory.cpu_pool``), its cache limit raised for the run (``memory.training_cache_limit``): glibc unmaps
the step's large activations and gradients when they are freed and page-faults them in again at the next step,
millions of faults a step for R50-FPN at 800 pixels; pooled, the next step reuses them (``reuse_cpu_memory=False``
turns it off).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import memory
from .._arguments import argument_error
from ..capabilities import cpu_capabilities
from ..data import build_dataset, collate
from .checkpoint import build_model, load_checkpoint, load_model_state, save_checkpoint

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


@dataclasses.dataclass
class TrainConfig:
    """Training arguments (the ``train`` subcommand's options).

    Args:
        data: "synthetic" or a COCO-format folder (annotations/instances_<train_split>*.json plus images).
        model: a builder name (see checkpoint.MODEL_BUILDERS).
        out: output folder for last.pt, log.txt and losses.jsonl.
        max_iters / epochs: the length of training in optimizer steps, or in passes over the data (one of them).
        batch_size: images per step and process.
        lr: the peak learning rate (SGD with momentum), after a linear warm-up over warmup_iters, then a cosine decay
            to lr_final_fraction * lr at the last step.
        resume: a last.pt to continue from.
        amp: autocast (float16 with a grad scaler on CUDA, bfloat16 on CPU).
        skip_bad_images: warn and skip unreadable images instead of stopping.
        weights_backbone: torchvision's ImageNet weights name for the backbone (downloaded by torchvision), or None.
        reuse_cpu_memory: on the CPU, run each step inside the CPU memory pool (the module docstring says why).
    """

    data: str = "synthetic"
    model: str = "fasterrcnn_tiny"
    out: str = "runs/train"
    max_iters: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_final_fraction: float = 0.02
    resume: str | None = None
    amp: bool = False
    workers: int = 0
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 20
    skip_bad_images: bool = False
    weights_backbone: str | None = None
    train_split: str = "train"
    synthetic_images: int = 1000
    hflip: float = 0.5
    device: str | None = None
    progress: bool = True
    reuse_cpu_memory: bool = True


def lr_factor(step: int, warmup_iters: int, max_iters: int, final_fraction: float) -> float:
    """Linear warm-up from 1/1000, then cosine decay to final_fraction at max_iters."""
    if step < warmup_iters:
        return 1e-3 + (1 - 1e-3) * step / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_batches(num_items: int, epoch: int, seed: int, rank: int, world_size: int,
                  batch_size: int) -> list[list[int]]:
    """This rank's batches of one epoch: a permutation fixed by (seed, epoch), padded by wrapping so every rank gets
    the same number of batches (DDP needs every rank to step together)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    order = torch.cat([order, order[: (-num_items) % world_size]])
    mine = order[rank::world_size].tolist()
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


class _StopRequests:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step and save; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the loader's workers too; the main process decides when to stop, after saving.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _LossLog:
    """Median of the last ``window`` values and the mean since the start, per loss (torchvision's SmoothedValue)."""

    def __init__(self, window: int = 20):
        self.recent = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self.total = collections.defaultdict(float)
        self.count = 0

    def update(self, values: dict[str, float]) -> None:
        self.count += 1
        for k, v in values.items():
            self.recent[k].append(v)
            self.total[k] += v

    def format(self, iteration: int, max_iters: int, lr: float) -> str:
        parts = [f"iter: {iteration}/{max_iters}", f"lr: {lr:.6f}"]
        for k in self.recent:
            median = sorted(self.recent[k])[len(self.recent[k]) // 2]
            parts.append(f"{k}: {median:.4f} ({self.total[k] / self.count:.4f})")
        return "  ".join(parts)


def _distributed_setup(device: str | None):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise argument_error(ValueError, "{device}: no CUDA GPU is visible", device=device)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, dev


@dataclasses.dataclass
class _Run:
    """The state of one training run: what train() sets up, steps and checkpoints."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    dataset: torch.utils.data.Dataset
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int
    max_iters: int
    batches_per_epoch: int
    last: str  # the run's last.pt

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(), "model_name": self.cfg.model, "num_classes": self.dataset.num_classes,
            "class_names": list(self.dataset.class_names), "category_ids": list(self.dataset.category_ids),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "iteration": self.iteration,
            "rng_state": torch.get_rng_state(), "args": dataclasses.asdict(self.cfg),
            # The RPN and RoI samplers draw on the device's generator.
            "cuda_rng_state": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def loader(self):
        """The rest of the current epoch's batches (a resumed run starts mid-epoch, at the same batch)."""
        epoch, offset = divmod(self.iteration, self.batches_per_epoch)
        batches = epoch_batches(len(self.dataset), epoch, self.cfg.seed, self.rank, self.world_size,
                                self.cfg.batch_size)[offset:]
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=self.cfg.workers, worker_init_fn=_ignore_sigint,
                                           # its own generator: a loader drawing its base seed from the global one
                                           # would shift the RPN/RoI samplers on resume
                                           generator=torch.Generator().manual_seed(self.cfg.seed + epoch))


def _prepare(cfg: TrainConfig) -> _Run:
    """Checks the arguments, sets up the processes, the data, the model and the optimizer, and restores a resumed
    run's state."""
    if (cfg.max_iters is None) == (cfg.epochs is None):
        raise argument_error(ValueError, "give exactly one of {max_iters:name} and {epochs:name}",
                             max_iters=cfg.max_iters, epochs=cfg.epochs)
    if (cfg.max_iters or cfg.epochs) <= 0 or cfg.batch_size <= 0 or cfg.lr <= 0:
        raise ValueError(f"max_iters/epochs, batch_size and lr must be positive, got max_iters={cfg.max_iters}, "
                         f"epochs={cfg.epochs}, batch_size={cfg.batch_size}, lr={cfg.lr}")
    rank, world_size, device = _distributed_setup(cfg.device)
    last = os.path.join(cfg.out, "last.pt")
    checkpoint = None
    if os.path.exists(last) and not (cfg.resume is not None and os.path.exists(cfg.resume)
                                     and os.path.samefile(cfg.resume, last)):
        # Never overwrite a finished (or interrupted) run's checkpoint with another run's.
        raise argument_error(FileExistsError, "{resume:value} exists: pass {resume} to continue that run, or choose "
                             "another {out:name}", resume=last, out=cfg.out)
    if cfg.resume is not None:
        checkpoint = load_checkpoint(cfg.resume)
        if "iteration" not in checkpoint or "optimizer" not in checkpoint:
            raise argument_error(ValueError, "{resume}: a model-only checkpoint; resuming needs a training last.pt",
                                 resume=cfg.resume)

    dataset = build_dataset(cfg.data, train=True, split=cfg.train_split, seed=cfg.seed,
                            synthetic_images=cfg.synthetic_images, skip_bad_images=cfg.skip_bad_images,
                            hflip=cfg.hflip)
    if len(dataset) == 0:
        raise argument_error(ValueError, "{data}: the training set is empty", data=cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.num_classes, cfg.weights_backbone)
    if checkpoint is not None:
        _check_resumable(checkpoint, cfg, dataset)
        load_model_state(model, checkpoint, cfg.resume)
    model.to(device).train()

    batches_per_epoch = len(epoch_batches(len(dataset), 0, cfg.seed, rank, world_size, cfg.batch_size))
    max_iters = cfg.max_iters if cfg.max_iters is not None else cfg.epochs * batches_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_iters, max_iters, cfg.lr_final_fraction))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    iteration = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        iteration = int(checkpoint["iteration"])
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        if device.type == "cuda" and checkpoint.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"], device)
    train_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                             else None) if world_size > 1 else model)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    return _Run(cfg, rank, world_size, device, dataset, model, train_model, optimizer, scheduler, scaler, iteration,
                max_iters, batches_per_epoch, last)


def _pools_cpu_memory(run: _Run) -> bool:
    return run.device.type == "cpu" and run.cfg.reuse_cpu_memory and cpu_capabilities().memory_pool


def _step_memory(run: _Run):
    """The step's allocations (forward, backward on this thread, optimizer) come from the CPU memory pool."""
    return memory.cpu_pool() if _pools_cpu_memory(run) else contextlib.nullcontext()


def _training_cache_limit(run: _Run):
    """The pool's cap raised for the run (memory.training_cache_limit), where the steps are pooled."""
    return memory.training_cache_limit() if _pools_cpu_memory(run) else contextlib.nullcontext()


def _step(run: _Run, images, targets, stop_requested: bool) -> tuple[dict[str, float], bool]:
    """One optimizer step. Returns the losses averaged over the ranks (with their sum, ``loss``) and whether any
    rank was asked to stop; one reduction carries both, so that every rank stops after the same step."""
    device = run.device
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with _step_memory(run):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=run.cfg.amp):
            losses = run.train_model(images, targets)
        loss = sum(losses.values())
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.scheduler.step()
    run.iteration += 1
    values = torch.stack([losses[k].detach().float() for k in LOSS_NAMES] +
                         [torch.tensor(float(stop_requested), device=device)])
    if run.world_size > 1:
        dist.all_reduce(values)
        values /= run.world_size
    values = values.cpu()
    step_losses = {k: float(v) for k, v in zip(LOSS_NAMES, values[:-1])}
    step_losses = {"loss": sum(step_losses.values()), **step_losses}
    if not math.isfinite(step_losses["loss"]):
        raise FloatingPointError(f"loss is {step_losses['loss']} at iteration {run.iteration} "
                                 f"({step_losses}); {run.last} keeps the last good state")
    return step_losses, bool(values[-1] > 0)


class _Logger:
    """Rank 0's progress: the tqdm bar, log.txt (the classic log line) and losses.jsonl (the loss curve)."""

    def __init__(self, run: _Run):
        cfg = run.cfg
        self.run = run
        self.losses = _LossLog()
        self.bar = tqdm(total=run.max_iters, initial=run.iteration, disable=not (run.is_main and cfg.progress),
                        dynamic_ncols=True, desc="train")
        self.log_file = open(os.path.join(cfg.out, "log.txt"), "a") if run.is_main else None  # noqa: SIM115
        self.curve_file = open(os.path.join(cfg.out, "losses.jsonl"), "a") if run.is_main else None  # noqa: SIM115

    def step(self, losses: dict[str, float], force: bool) -> None:
        run, cfg = self.run, self.run.cfg
        self.losses.update(losses)
        self.bar.update(1)
        if not run.is_main or not (run.iteration % cfg.log_every == 0 or run.iteration == run.max_iters or force):
            return
        line = self.losses.format(run.iteration, run.max_iters, run.optimizer.param_groups[0]["lr"])
        if cfg.progress:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()
        record = {"iteration": run.iteration, "time": time.time(), **losses}
        self.curve_file.write(json.dumps(record) + "\n")
        self.curve_file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.run.is_main:
            self.log_file.close()
            self.curve_file.close()


def train(cfg: TrainConfig) -> dict:
    """Trains as ``cfg`` says; returns {"iteration", "checkpoint", "losses" (the last step's, averaged over ranks),
    "interrupted"}."""
    run = _prepare(cfg)
    logger = _Logger(run)
    last_losses: dict[str, float] = {}
    interrupted = False
    try:
        with _StopRequests() as stop, _training_cache_limit(run):
            while run.iteration < run.max_iters and not interrupted:
                for images, targets in run.loader():
                    last_losses, interrupted = _step(run, images, targets, stop.requested)
                    logger.step(last_losses, force=interrupted)
                    if interrupted or run.iteration >= run.max_iters:
                        break
                    if run.is_main and run.iteration % cfg.checkpoint_every == 0:
                        save_checkpoint(run.last, run.checkpoint())
        if run.is_main:
            save_checkpoint(run.last, run.checkpoint())
            if interrupted:
                print(f"stopped at iteration {run.iteration}; saved {run.last}", file=sys.stderr, flush=True)
    finally:
        logger.close()
    result = {"iteration": run.iteration, "checkpoint": run.last, "losses": last_losses, "interrupted": interrupted}
    if _pools_cpu_memory(run):
        # The model's and the optimizer's pooled blocks (gradients, momentum) return to the pool when the run is
        # freed, and from there to the system.
        del run, logger
        memory.empty_cpu_cache()
    return result


def _check_resumable(checkpoint: dict, cfg: TrainConfig, dataset) -> None:
    if checkpoint["model_name"] != cfg.model:
        raise argument_error(ValueError, "{resume}: the checkpoint is of model {saved:value}, not {model}",
                             resume=cfg.resume, saved=checkpoint["model_name"], model=cfg.model)
    if int(checkpoint["num_classes"]) != dataset.num_classes or (
            list(checkpoint.get("class_names", dataset.class_names)) != list(dataset.class_names)):
        raise argument_error(ValueError, "{resume}: the checkpoint has {saved:value} classes ({saved_names:value} and "
                             "the background), the data {classes:value} ({names:value} and the background)",
                             resume=cfg.resume, saved=checkpoint["num_classes"],
                             saved_names=", ".join(checkpoint.get("class_names", [])), classes=dataset.num_classes,
                             names=", ".join(dataset.class_names))
