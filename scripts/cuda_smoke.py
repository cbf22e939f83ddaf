"""One small call of every CUDA op, each against torchvision, with a watchdog: the first thing to run on a GPU.

`python scripts/cuda_smoke.py [--timeout S]`. Each step prints its name before it runs and its largest difference
from torchvision after; a step that takes longer than S seconds (a hung kernel) dumps every thread's stack and
exits with code 3, so the hanging op is the last name printed. Exits 1 if any step's result differs.
`--device cpu` runs the same steps on the CPU kernels, to check the script itself (tests/test_gpu_scripts.py).
"""

import argparse
import faulthandler
import sys
import time

import torch
import torchvision

import fasterrcnn_ext  # noqa: F401  (loads the kernels)
from fasterrcnn_ext import ops


def boxes_on(n, device, seed=0, size=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 4 + 1
    return torch.cat([xy, xy + wh], 1).to(device)


def scores_on(n, device, seed=0):
    """Distinct scores: with ties (likely among a few thousand torch.rand floats) the kept boxes are the same but
    their order is not, since torchvision sorts the per-class results with an unstable sort."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randperm(n, generator=g).float() + 0.5) / n).to(device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    dev = args.device
    failures = []
    torch.manual_seed(0)  # every input the same from run to run

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step(name, ours, theirs, atol=1e-4):
        print(f"{name:45s}", end=" ", flush=True)
        faulthandler.dump_traceback_later(args.timeout, exit=True)
        t0 = time.perf_counter()
        a = ours()
        sync()
        dt = time.perf_counter() - t0
        b = theirs()
        sync()
        faulthandler.cancel_dump_traceback_later()
        if a.dtype == torch.bool or a.dtype == torch.int64:
            ok = a.shape == b.shape and bool((a == b).all())
            diff = "equal" if ok else f"differ: {a.shape} vs {b.shape}"
        else:
            err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            ok = a.shape == b.shape and err <= atol
            diff = f"max |diff| {err:.3g}"
        print(f"{'ok  ' if ok else 'FAIL'} {diff}  ({dt * 1e3:.1f} ms)", flush=True)
        if not ok:
            failures.append(name)

    b1, b2 = boxes_on(50, dev, 0), boxes_on(70, dev, 1)
    step("box_iou", lambda: ops.box_iou(b1, b2), lambda: torchvision.ops.box_iou(b1, b2))
    step("clip_boxes_to_image", lambda: ops.clip_boxes_to_image(b1 - 20, (100, 120)),
         lambda: torchvision.ops.clip_boxes_to_image(b1 - 20, (100, 120)))
    step("remove_small_boxes", lambda: ops.remove_small_boxes(b1, 20.0),
         lambda: torchvision.ops.remove_small_boxes(b1, 20.0))
    for n in (10, 100, 1000, 5000):
        bx = boxes_on(n, dev, 2)
        sc = scores_on(n, dev, n)
        step(f"nms {n}", lambda: ops.nms(bx, sc, 0.5), lambda: torchvision.ops.nms(bx, sc, 0.5))
        cls = torch.randint(0, 5, (n,), device=dev)
        step(f"batched_nms {n}", lambda: ops.batched_nms(bx, sc, cls, 0.5),
             lambda: torchvision.ops.batched_nms(bx, sc, cls, 0.5))
        # The same kernels with the mask built and walked 64 rows at a time (the path of 10^5+ boxes).
        step(f"nms {n}, mask in 64-row chunks",
             lambda: torch.ops.fasterrcnn_ext._nms_bitmask(bx, sc, None, 0.5, -1, 64),
             lambda: torchvision.ops.nms(bx, sc, 0.5))
    x = torch.randn(2, 8, 40, 50, device=dev)
    rois = torch.cat([torch.randint(0, 2, (30, 1), device=dev).float(), boxes_on(30, dev, 3)], 1)
    step("roi_align", lambda: ops.roi_align(x, rois, 7, 0.25, 2, True),
         lambda: torchvision.ops.roi_align(x, rois, 7, 0.25, 2, True))
    # The same kernel with every RoI pooled per element, without its shared-memory sample table; and adaptive grids.
    step("roi_align, per element (no table)",
         lambda: torch.ops.fasterrcnn_ext._roi_align_per_element([x], rois, [0.25], 7, 7, 2, True, 224.0, 4.0, 0),
         lambda: torchvision.ops.roi_align(x, rois, 7, 0.25, 2, True))
    step("roi_align, adaptive sampling", lambda: ops.roi_align(x, rois, 7, 0.25, -1, False),
         lambda: torchvision.ops.roi_align(x, rois, 7, 0.25, -1, False))
    step("roi_pool", lambda: ops.roi_pool(x, rois, 7, 0.25), lambda: torchvision.ops.roi_pool(x, rois, 7, 0.25))

    def grad_of(fn):
        def run():
            xg = x.clone().requires_grad_()
            fn(xg).square().sum().backward()
            return xg.grad
        return run

    step("roi_align backward", grad_of(lambda t: ops.roi_align(t, rois, 7, 0.25, 2, True)),
         grad_of(lambda t: torchvision.ops.roi_align(t, rois, 7, 0.25, 2, True)), atol=1e-3)
    step("roi_pool backward", grad_of(lambda t: ops.roi_pool(t, rois, 7, 0.25)),
         grad_of(lambda t: torchvision.ops.roi_pool(t, rois, 7, 0.25)), atol=1e-3)

    def deterministic(run):
        def wrapped():
            torch.use_deterministic_algorithms(True)
            try:
                return run()
            finally:
                torch.use_deterministic_algorithms(False)
        return wrapped

    # Fixed-point integer atomics (common/fixed_point.h): the CPU twin's bits exactly.
    step("roi_align backward, deterministic",
         deterministic(grad_of(lambda t: ops.roi_align(t, rois, 7, 0.25, 2, True))),
         grad_of(lambda t: torchvision.ops.roi_align(t, rois, 7, 0.25, 2, True)), atol=1e-3)
    step("roi_pool backward, deterministic", deterministic(grad_of(lambda t: ops.roi_pool(t, rois, 7, 0.25))),
         grad_of(lambda t: torchvision.ops.roi_pool(t, rois, 7, 0.25)), atol=1e-3)
    gx = torch.randn(30, 8, 7, 7, device=dev)
    step("roi_align fixed point vs its CPU twin",
         lambda: torch.ops.fasterrcnn_ext._roi_align_backward_fixed_point(
             gx, rois, [0.25], 7, 7, 2, True, 224.0, 4.0, 2, 8, [40], [50])[0].cpu(),
         lambda: torch.ops.fasterrcnn_ext._roi_align_backward_fixed_point(
             gx.cpu(), rois.cpu(), [0.25], 7, 7, 2, True, 224.0, 4.0, 2, 8, [40], [50])[0], atol=0.0)
    # The NMS over valid boxes only: the invalid ones sorted last, the kernels bounded by the valid count.
    bv, sv = boxes_on(3000, dev, 10), scores_on(3000, dev, 11)
    cv, valid = torch.randint(0, 7, (3000,), device=dev), torch.rand(3000, device=dev) < 0.3

    def valid_only():
        rows = valid.nonzero().squeeze(1)
        mask = torch.zeros(3000, dtype=torch.bool, device=dev)
        mask[rows[torchvision.ops.batched_nms(bv[rows], sv[rows], cv[rows], 0.5)]] = True
        return mask

    step("batched NMS keep mask over valid boxes",
         lambda: torch.ops.fasterrcnn_ext._batched_nms_keep_mask_valid(bv, sv, cv, valid, 0.5), valid_only)
    feats = {str(i): torch.randn(2, 8, 64 >> i, 80 >> i, device=dev) for i in range(4)}
    props = [boxes_on(20, dev, 4), boxes_on(15, dev, 5)]
    sizes = [(256, 320), (256, 320)]
    step("MultiScaleRoIAlign", lambda: ops.MultiScaleRoIAlign(list(feats), 7, 2)(feats, props, sizes),
         lambda: torchvision.ops.MultiScaleRoIAlign(list(feats), 7, 2)(feats, props, sizes))
    # The CUDA RoIAlign forward splits channels into chunks: a partial last chunk (256 = 6 x 37 + 34), and more
    # chunks than the grid's y dimension holds (65,535), which the kernel loops over.
    for channels, size, n in ((256, 7, 300), (70_000, 46, 1)):
        xc = torch.randn(1, channels, 12, 10, device=dev)
        rc = torch.cat([torch.zeros(n, 1, device=dev), boxes_on(n, dev, 6, 30.0)], 1)
        step(f"roi_align, {channels} channels at {size}x{size}", lambda: ops.roi_align(xc, rc, size, 0.25, 2, True),
             lambda: torchvision.ops.roi_align(xc, rc, size, 0.25, 2, True))

    # The composite post-processing (what CUDA runs) against the fused CPU kernels: per-image scores by rank.
    obj, dl, anc = torch.randn(2, 3000), torch.randn(2, 3000, 4) * 0.1, boxes_on(3000, "cpu", 7)

    def rpn_on(device):
        _, scores = ops.rpn_proposals(obj.to(device), dl.to(device), anc.to(device), [2000, 1000],
                                      [(220, 230), (200, 240)], 500, 200, 0.7)
        return torch.cat([v.sort(descending=True).values for v in scores]).cpu()

    step("rpn_proposals (CUDA vs the CPU op)", lambda: rpn_on(dev), lambda: rpn_on("cpu"))
    logits, regression = torch.randn(300, 11) * 3, torch.randn(300, 44) * 0.1
    props = [boxes_on(180, "cpu", 8), boxes_on(120, "cpu", 9)]

    def detections_on(device):
        _, scores, _ = ops.detection_postprocess(logits.to(device), regression.to(device),
                                                 [p.to(device) for p in props], [(250, 240), (230, 260)])
        return torch.cat([v.sort(descending=True).values for v in scores]).cpu()

    step("detection_postprocess (CUDA vs the CPU op)", lambda: detections_on(dev), lambda: detections_on("cpu"))
    padded_props = torch.cat([props[0][:150], props[1][:120], torch.zeros(30, 4)])  # 150 rows each, 30 padding

    def padded_detections_on(device):
        _, scores, _, counts = ops.detection_postprocess_padded(
            logits.to(device), regression.to(device), padded_props.to(device), torch.tensor([150, 120], device=device),
            [(250, 240), (230, 260)])
        return torch.cat([s[:c].sort(descending=True).values for s, c in zip(scores.cpu(), counts.tolist())])

    step("detection_postprocess_padded (CUDA vs the CPU op)", lambda: padded_detections_on(dev),
         lambda: padded_detections_on("cpu"))
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all steps agree with torchvision")


if __name__ == "__main__":
    main()
