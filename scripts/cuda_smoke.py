"""One small call of every CUDA op, each against torchvision, and a CUDA graph capture of a tiny detector, with a
watchdog: the first thing to run on a GPU.

`python scripts/cuda_smoke.py [--timeout S] [--quick]`. Each step prints its name before it runs and its largest
difference from torchvision after; a step that takes longer than S seconds (a hung kernel) dumps every thread's
stack and exits with code 3, so the hanging op is the last name printed. A step that raises is a failure named by
its step. Exits 1 if any step failed. `--quick` keeps every op and the capture but only small cases (what
scripts/gpu_check.sh runs under compute-sanitizer). `--device cpu` runs the same steps on the CPU kernels, to check
the script itself (tests/test_gpu_scripts.py); there detect_padded stands in for the capture.
"""

import argparse
import faulthandler
import os
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
    p.add_argument("--quick", action="store_true", help="small cases only (for compute-sanitizer)")
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
        try:
            t0 = time.perf_counter()
            a = ours()
            sync()
            dt = time.perf_counter() - t0
            b = theirs()
            sync()
        except Exception as e:  # named here; a CUDA error poisons the context, and the later steps fail too
            print(f"FAIL raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            failures.append(name)
            return
        finally:
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
    for n in (100, 1000) if args.quick else (10, 100, 1000, 5000):
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
    nv = 500 if args.quick else 3000
    bv, sv = boxes_on(nv, dev, 10), scores_on(nv, dev, 11)
    cv, valid = torch.randint(0, 7, (nv,), device=dev), torch.rand(nv, device=dev) < 0.3

    def valid_only():
        rows = valid.nonzero().squeeze(1)
        mask = torch.zeros(nv, dtype=torch.bool, device=dev)
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
    # chunks than the grid's y dimension holds (65,535), which the kernel loops over (a 592 MB output: not --quick).
    for channels, size, n in ((256, 7, 300),) + (() if args.quick else ((70_000, 46, 1),)):
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

    # fasterrcnn_tiny's eval forward captured in one CUDA graph (CUDAGraphDetector) and replayed, against its eager
    # forward: the capture fails on any host sync or allocation outside torch's graph pool. PyTorch's uncached
    # allocator (PYTORCH_NO_CUDA_MEMORY_CACHING, set for compute-sanitizer's memcheck and initcheck) cannot capture.
    from fasterrcnn_ext.models.detection import CUDAGraphDetector, fasterrcnn_tiny

    torch.manual_seed(0)
    tiny = fasterrcnn_tiny().eval()
    with torch.no_grad():  # scores spread apart (a random predictor's are tied), so detections have one order
        for module in tiny.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=(2.0 / module.weight[0].numel()) ** 0.5)
        tiny.roi_heads.box_predictor.cls_score.weight.normal_(std=0.3)
        tiny.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)
    tiny.to(dev)
    tiny_images = torch.rand(2, 3, 192, 256, device=dev)
    detections = tiny.roi_heads.detections_per_img

    def table(boxes, scores, labels):
        """Per image, rows (score, box, label) by descending score, padded with zeros to detections_per_img."""
        out = torch.zeros(len(boxes), detections, 6)
        for i, (b, s, lab) in enumerate(zip(boxes, scores, labels)):
            rows = torch.cat([s[:, None], b, lab[:, None].to(s.dtype)], 1).cpu()
            out[i, :len(rows)] = rows[s.cpu().argsort(descending=True)]
        return out

    def padded_table(boxes, scores, labels, counts):
        return table(*([t[i, :c] for i, c in enumerate(counts.tolist())] for t in (boxes, scores, labels)))

    def eager_table():
        with torch.no_grad():
            found = tiny(list(tiny_images))
        return table(*([d[key] for d in found] for key in ("boxes", "scores", "labels")))

    if dev == "cpu":
        step("fasterrcnn_tiny detect_padded (no capture on the CPU)",
             lambda: padded_table(*tiny.detect_padded(list(tiny_images))), eager_table, atol=1e-3)
    elif os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING"):
        print(f"{'fasterrcnn_tiny CUDA graph capture':45s} skipped (PYTORCH_NO_CUDA_MEMORY_CACHING is set)", flush=True)
    else:
        def replay():
            graph = CUDAGraphDetector(tiny, (192, 256), batch_size=2)
            return padded_table(*graph(tiny_images, padded=True))

        step("fasterrcnn_tiny CUDA graph capture and replay", replay, eager_table, atol=1e-3)
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all steps agree with torchvision")


if __name__ == "__main__":
    main()
