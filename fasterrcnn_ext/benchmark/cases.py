"""Benchmark cases: each times one of our ops against its torchvision counterpart on realistic inputs.

Sizes are those of the R50-FPN detector (docs/design.md): an 800x1344 image, 257,796 FPN anchors, 1,000 RoIs on
256-channel FPN maps, RPN-like clustered boxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision

import fasterrcnn_ext.ops as ops
from fasterrcnn_ext._arguments import argument_error
from fasterrcnn_ext.engine.precision import PRECISIONS

from . import inputs

IMAGE_SIZE = (800, 1344)  # (height, width): the R50-FPN detector's input for a COCO image


@dataclass
class Case:
    name: str
    ours: Callable[[], object]
    torchvision: Callable[[], object]
    target: float  # the speed-up we aim for (torchvision time / ours) on this device


@dataclass
class Skipped:
    """A case that cannot run here, and why: the CPU lacks the instructions its precision pays with
    (fasterrcnn_ext.capabilities), or a peer's package is not installed. run.py prints and records it."""
    name: str
    reason: str
    target: float


def rpn_like_boxes(n: int, num_clusters: int = 100, device="cpu", seed=0):
    """Clustered boxes as the RPN emits them around objects (16 to 266 pixels a side) on an 800x1344 image, with
    distinct scores; the same every run."""
    g = torch.Generator().manual_seed(seed)
    boxes = inputs.rpn_like_boxes(n, num_clusters, IMAGE_SIZE, max_size=266.0, generator=g)
    return boxes.to(device), inputs.distinct_scores(n, generator=g).to(device)


def nms_cases(device: str) -> list[Case]:
    cuda = device == "cuda"
    cases = []
    for n in (4_000, 20_000):
        boxes, scores = rpn_like_boxes(n, device=device)
        cases.append(Case(f"nms {n:,} RPN-like boxes",
                          lambda b=boxes, s=scores: ops.nms(b, s, 0.7),
                          lambda b=boxes, s=scores: torchvision.ops.nms(b, s, 0.7),
                          target=2.0 if cuda else 5.0))
    boxes, scores = rpn_like_boxes(20_000, device=device, seed=1)
    classes = torch.randint(0, 80, (20_000,), generator=torch.Generator().manual_seed(2)).to(device)
    cases.append(Case("batched_nms 20,000 boxes, 80 classes",
                      lambda: ops.batched_nms(boxes, scores, classes, 0.5),
                      lambda: torchvision.ops.batched_nms(boxes, scores, classes, 0.5),
                      target=2.0 if cuda else 5.0))
    boxes5, scores5 = rpn_like_boxes(4_000, device=device, seed=3)
    levels = torch.arange(5).repeat_interleave(800).to(device)
    cases.append(Case("batched_nms 4,000 boxes, 5 levels",
                      lambda: ops.batched_nms(boxes5, scores5, levels, 0.7),
                      lambda: torchvision.ops.batched_nms(boxes5, scores5, levels, 0.7),
                      target=2.0 if cuda else 5.0))
    return cases


def realistic_rois(k: int, image_size=IMAGE_SIZE, device="cpu", seed=0) -> torch.Tensor:
    """[K, 5] RoIs of one image with log-uniform sizes from 20 to 400 pixels and aspect ratios 1:2 to 2:1."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    size = torch.exp(torch.empty(k).uniform_(3.0, 6.0, generator=g))
    ratio = torch.exp(torch.empty(k).uniform_(-0.7, 0.7, generator=g))
    bw, bh = size * ratio.sqrt(), size / ratio.sqrt()
    cx, cy = torch.rand(k, generator=g) * w, torch.rand(k, generator=g) * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
    return torch.cat([torch.zeros(k, 1), boxes], 1).to(device)


def fpn_features(device="cpu", channels=256, image_size=IMAGE_SIZE, seed=0):
    """P2 to P5 of an FPN for one 800x1344 image: 1x256x200x336 down to 1x256x25x42."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    return {str(i): torch.randn(1, channels, h // 2 ** (i + 2), w // 2 ** (i + 2), generator=g).to(device)
            for i in range(4)}


def roi_cases(device: str) -> list[Case]:
    cuda = device == "cuda"
    feats = fpn_features(device)
    p2 = feats["0"]
    rois = realistic_rois(1000, device=device)
    cases = [
        Case("roi_align fwd, 1x256x200x336, 1000 RoIs, 7x7",
             lambda: ops.roi_align(p2, rois, 7, 0.25, 2),
             lambda: torchvision.ops.roi_align(p2, rois, 7, 0.25, 2),
             target=1.5 if cuda else 10.0),
    ]
    if not cuda:
        p2_cl = p2.contiguous(memory_format=torch.channels_last)
        cases.append(Case("roi_align fwd, channels_last input",
                          lambda: ops.roi_align(p2_cl, rois, 7, 0.25, 2),
                          lambda: torchvision.ops.roi_align(p2_cl, rois, 7, 0.25, 2),
                          target=10.0))

    def fwd_bwd(module):
        def run():
            with torch.enable_grad():
                x = p2.detach().requires_grad_()
                out = module.roi_align(x, rois, 7, 0.25, 2)
                out.backward(grad)
        return run

    grad = torch.randn(1000, 256, 7, 7, generator=torch.Generator().manual_seed(1)).to(device)
    cases.append(Case("roi_align fwd+bwd", fwd_bwd(ops), fwd_bwd(torchvision.ops), target=1.0 if cuda else 10.0))
    cases.append(Case("roi_pool fwd, 1x256x200x336, 1000 RoIs, 7x7",
                      lambda: ops.roi_pool(p2, rois, 7, 0.25),
                      lambda: torchvision.ops.roi_pool(p2, rois, 7, 0.25),
                      target=1.0 if cuda else 10.0))
    # In training the forward also writes the argmax for the backward (twice the output's bytes); without a
    # gradient to compute (the case above) ours leaves it out, torchvision's never does.
    p2_grad = p2.detach().requires_grad_()

    def pool_for_training(module):
        def run():
            with torch.enable_grad():
                return module.roi_pool(p2_grad, rois, 7, 0.25)
        return run

    cases.append(Case("roi_pool fwd, input requiring grad (argmax kept)", pool_for_training(ops),
                      pool_for_training(torchvision.ops), target=1.0 if cuda else 10.0))
    names = list(feats)
    ours_m = ops.MultiScaleRoIAlign(names, 7, 2)
    theirs_m = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    boxes = [rois[:, 1:]]
    shapes = [IMAGE_SIZE]
    cases.append(Case("MultiScaleRoIAlign, P2-P5, 1000 RoIs",
                      lambda: ours_m(feats, boxes, shapes),
                      lambda: theirs_m(feats, boxes, shapes),
                      target=3.0 if cuda else 10.0))
    return cases


def third_party_postprocess(detections, ground_truth, features, image_size):
    """Detection post-processing as code that calls torchvision itself writes it (an evaluation tool, sliced
    inference merging its slices' detections, a re-scoring head): every op looked up in torchvision.ops at the call,
    so that fasterrcnn_ext.patch_torchvision() decides whose runs."""
    kept_boxes, best_iou = [], []
    for (boxes, scores, labels), gt in zip(detections, ground_truth):
        boxes = torchvision.ops.clip_boxes_to_image(boxes, image_size)
        keep = torchvision.ops.remove_small_boxes(boxes, 2.0)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)[:300]
        kept_boxes.append(boxes[keep])
        best_iou.append(torchvision.ops.box_iou(boxes[keep], gt).max(1).values)
    pooled = torchvision.ops.roi_align(features, kept_boxes, 7, 1 / 8, 2, aligned=True)
    return kept_boxes, best_iou, pooled


def patch_cases(device: str) -> list[Case]:
    """third_party_postprocess on detector-sized inputs (two 800x1344 images, each with the merged detections of four
    slices: 6,000 boxes of 80 classes, 30 ground-truth boxes, 256-channel stride-8 features), with torchvision as it
    is against torchvision patched by fasterrcnn_ext.patch_torchvision(). The patched side's first call puts the patch
    in place and torchvision's first call undoes it (run.py times one side's calls, then the other's, and ends with
    torchvision's), so the patch is out of either side's median and torchvision is left as it was."""
    import fasterrcnn_ext

    g = torch.Generator().manual_seed(0)
    detections, ground_truth = [], []
    for i in range(2):
        boxes, scores = rpn_like_boxes(6000, num_clusters=60, device=device, seed=10 + i)
        labels = torch.randint(0, 80, (6000,), generator=g).to(device)
        detections.append((boxes, scores, labels))
        ground_truth.append(rpn_like_boxes(30, num_clusters=30, device=device, seed=20 + i)[0])
    features = torch.randn(2, 256, 100, 168, generator=g).to(device)
    args = (detections, ground_truth, features, IMAGE_SIZE)

    def patched():
        if not fasterrcnn_ext.patched():
            fasterrcnn_ext.patch_torchvision()
        return third_party_postprocess(*args)

    def unpatched():
        if fasterrcnn_ext.patched():
            fasterrcnn_ext.unpatch_torchvision()
        return third_party_postprocess(*args)

    return [Case("third-party code calling torchvision.ops, patched", patched, unpatched,
                 target=2.0 if device == "cuda" else 3.0)]


def box_cases(device: str) -> list[Case]:
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    from fasterrcnn_ext.models.detection import AnchorGenerator as OurAnchorGenerator

    cuda = device == "cuda"
    g = torch.Generator().manual_seed(0)
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    cases = []
    # The R50-FPN detector at 800 pixels (docs/design.md): an image padded to 768x1344, 257,796 anchors.
    feats = [torch.zeros(2, 1, 768 // s, 1344 // s, device=device) for s in (4, 8, 16, 32)]
    feats.append(torch.zeros(2, 1, 12, 21, device=device))
    ours_gen, theirs_gen = OurAnchorGenerator(sizes, ratios), AnchorGenerator(sizes, ratios)
    images = ImageList(torch.zeros(1, 3, 768, 1344, device=device), [(750, 1333)])
    cases.append(Case("anchors, FPN at 768x1344 (257,796)", lambda: ours_gen(images, feats),
                      lambda: theirs_gen(images, feats), target=1.0))
    anchors = theirs_gen(images, feats)[0]
    per_level = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    total = anchors.shape[0]
    deltas = (torch.randn(2, total, 4, generator=g) * 0.3).to(device)
    objectness = (torch.randn(2, total, generator=g) * 2).to(device)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    cases.append(Case("decode 257,796 anchors (BoxCoder)", lambda: ops.decode_boxes(deltas[0], anchors, (1, 1, 1, 1)),
                      lambda: coder.decode_single(deltas[0], anchors), target=2.0))
    rpn = RegionProposalNetwork(theirs_gen, RPNHead(1, 3), 0.7, 0.3, 256, 0.5, dict(training=2000, testing=1000),
                                dict(training=2000, testing=1000), 0.7).eval()
    for batch in (1, 2):
        image_sizes = [(750, 1333), (768, 1100)][:batch]

        def theirs(batch=batch, image_sizes=image_sizes):
            proposals = coder.decode(deltas[:batch], [anchors] * batch).view(batch, -1, 4)
            return rpn.filter_proposals(proposals, objectness[:batch], image_sizes, per_level)

        def ours(batch=batch, image_sizes=image_sizes):
            return ops.rpn_proposals(objectness[:batch], deltas[:batch], anchors, per_level, image_sizes, 1000, 1000,
                                     0.7)

        cases.append(Case(f"RPN proposal selection, R50-FPN 800px, batch {batch}", ours, theirs,
                          target=3.0 if cuda else 5.0))
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    xy = torch.rand(1000, 2, generator=g) * torch.tensor([1200.0, 700.0])
    proposals = [torch.cat([xy, xy + torch.rand(1000, 2, generator=g) * 300 + 4], 1).to(device)]
    class_logits = (torch.randn(1000, 91, generator=g) * 3).to(device)
    box_regression = torch.randn(1000, 364, generator=g).to(device)
    cases.append(Case("detection post-processing, 1000 proposals, 91 classes",
                      lambda: ops.detection_postprocess(class_logits, box_regression, proposals, [(750, 1333)]),
                      lambda: heads.postprocess_detections(class_logits, box_regression, proposals, [(750, 1333)]),
                      target=3.0))
    return cases


def detector_cases(device: str, precisions=("fp32",)) -> list[Case | Skipped]:
    """fasterrcnn_resnet50_fpn end to end (same random weights; no download), batch 1, an 800-pixel image, at each of
    ``precisions`` (bench --precision): fp32, ours against torchvision, the part outside the learned layers
    (transform, anchors, proposal selection, RoI pooling, post-processing) alone, and the deployment peers; bf16 and
    int8, low_precision_cases."""
    from torchvision.models.detection import faster_rcnn as tv

    from fasterrcnn_ext.models import detection as ours

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise argument_error(ValueError, "{precisions:name} holds {unknown:value}: choose from {names:value}",
                             precisions=precisions, unknown=repr(unknown[0]), names=", ".join(PRECISIONS))
    torch.manual_seed(0)
    theirs = tv.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval().to(device)

    def make_ours():
        model = ours.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval().to(device)
        model.load_state_dict(theirs.state_dict())
        return model

    image = torch.rand(3, 800, 1067, generator=torch.Generator().manual_seed(0)).to(device)
    cases: list[Case | Skipped] = []
    if "fp32" in precisions:
        cases += _fp32_detector_cases(make_ours(), theirs, image, device)
    low = [p for p in PRECISIONS if p != "fp32" and p in precisions]
    if low:
        cases += low_precision_cases(make_ours, theirs, image, device, low)
    return cases


def _fp32_detector_cases(mine, theirs, image, device: str) -> list[Case]:
    """detector_cases' float32 rows: ours (``mine``) against torchvision (``theirs``) on ``image`` [3, H, W]."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    from fasterrcnn_ext.models import detection as ours

    image = [image]
    cases = [Case("detector fp32, R50-FPN, 800px, batch 1", lambda: mine(image), lambda: theirs(image),
                  target=1.3 if device == "cuda" else 1.5)]

    # The non-learned part, given the learned layers' outputs.
    with torch.no_grad():
        image_list, _ = theirs.transform(image)
        features = theirs.backbone(image_list.tensors)
        feature_list = list(features.values())
        objectness, deltas = theirs.rpn.head(feature_list)
        proposals, _ = theirs.rpn(image_list, features)
        pooled = theirs.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)
        class_logits, box_regression = theirs.roi_heads.box_predictor(theirs.roi_heads.box_head(pooled))

    def outside_learned(model):
        def run():
            il, _ = model.transform(image)
            anchors = model.rpn.anchor_generator(il, feature_list)
            per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
            obj, dl = concat_box_prediction_layers(list(objectness), list(deltas))
            if model is mine:
                boxes, _ = ops.rpn_proposals(obj.view(1, -1), dl.view(1, -1, 4), anchors[0], per_level,
                                             il.image_sizes, 1000, 1000, 0.7)
            else:
                props = model.rpn.box_coder.decode(dl, anchors).view(1, -1, 4)
                boxes, _ = model.rpn.filter_proposals(props, obj, il.image_sizes, per_level)
            model.roi_heads.box_roi_pool(features, boxes, il.image_sizes)
            dets = model.roi_heads.postprocess_detections(class_logits, box_regression, proposals, il.image_sizes)
            result = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(*dets)]
            return model.transform.postprocess(result, il.image_sizes, [(800, 1067)])
        return run

    cases.append(Case("detector outside the learned layers", outside_learned(mine), outside_learned(theirs),
                      target=3.0))
    if device == "cpu":
        cases += _deployment_peers(mine, image[0])
    else:
        # The batch-1 latency path: the whole eval forward replayed from one CUDA graph (CUDAGraphDetector).
        graph = ours.CUDAGraphDetector(mine, (800, 1067))
        cases.append(Case("detector fp32, R50-FPN, 800px, batch 1, one CUDA graph", lambda: graph(image),
                          lambda: theirs(image), target=2.0))
    return cases


def _deployment_peers(model, image) -> list[Case]:
    """Our eager detector against the same model exported: the torch.export program with a dynamic image size (what
    `fasterrcnn-ext export --format pt2` writes), and the ONNX export (TorchScript-based and, when onnxscript is
    installed, dynamo) run by onnxruntime and by OpenVINO with as many threads, each when installed: the deployment
    peers our eager path must stay ahead of. The "torchvision" column of these rows is the peer's time."""
    import importlib.util
    import io

    from ..engine.export import export_onnx, export_program

    program = export_program(model, image).module()
    cases = [Case("detector vs its torch.export program (dynamic size; right column)", lambda: model([image]),
                  lambda: program([image]), target=1.0)]
    runtimes = [name for name in ("onnxruntime", "openvino") if importlib.util.find_spec(name) is not None]
    if not runtimes:
        return cases
    buffer = io.BytesIO()
    export_onnx(model, image, buffer)
    threads = torch.get_num_threads()
    feed = {"image": image.numpy()}
    if "onnxruntime" in runtimes:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        exports = [("ONNX export", buffer.getvalue())]
        if importlib.util.find_spec("onnxscript") is not None:
            dynamo = io.BytesIO()
            export_onnx(model, image, dynamo, dynamo=True)
            exports.append(("dynamo ONNX export", dynamo.getvalue()))
        for what, data in exports:
            session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            cases.append(Case(f"detector vs onnxruntime {onnxruntime.__version__} (its {what}; right column)",
                              lambda: model([image]), lambda session=session: session.run(None, feed), target=1.0))
    if "openvino" in runtimes:
        import openvino

        core = openvino.Core()
        # float32 like our forward: on CPUs with bfloat16 units the plugin would otherwise run in bfloat16.
        compiled = core.compile_model(core.read_model(buffer.getvalue()), "CPU",
                                      {"INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": "f32"})
        cases.append(Case(f"detector vs OpenVINO {openvino.__version__.split('-')[0]} (its ONNX export; right column)",
                          lambda: model([image]), lambda: compiled(feed), target=1.0))
    return cases


# The images the int8 rows calibrate on, the same for ours, NNCF and onnxruntime's quantize_static: a few set the
# activations' ranges (the timing does not depend on which), and each costs every quantizer a forward.
BENCH_CALIBRATION_IMAGES = 4

# The rows of each low precision: (name, target). Ours first; "right column" rows time a peer (or ours at another
# precision) in the torchvision column. Targets: bf16 at least 1.3x OpenVINO's bf16 and int8 1.6x our bf16 (issue
# 39), int8 ahead of the int8 peers, and against torchvision's float32 the bf16 row's target times that 1.6.
BF16_ROWS = (("detector bf16 (ours) vs fp32 (torchvision)", 3.0),
             ("detector bf16 vs OpenVINO bf16 (right column)", 1.3))
INT8_ROWS = (("detector int8 (ours) vs fp32 (torchvision)", 4.8),
             ("detector int8 vs bf16 (ours; right column)", 1.6),
             ("detector int8 vs OpenVINO int8, NNCF (right column)", 1.0),
             ("detector int8 vs onnxruntime int8, static QDQ (right column)", 1.0))


def _versioned(name: str, peer: str, version: str) -> str:
    """A row's name with the version of the peer it names."""
    return name.replace(peer, f"{peer} {version.split('-')[0]}", 1)


def low_precision_cases(make_model: Callable[[], torch.nn.Module], reference: torch.nn.Module, image: torch.Tensor,
                        device: str, precisions, calibration: list[torch.Tensor] | None = None
                        ) -> list[Case | Skipped]:
    """Our detector in bfloat16 (its inference_dtype) and in int8 (fasterrcnn_ext.quantization.quantize) on ``image``
    [3, H, W], against ``reference`` (torchvision's detector, float32), our int8 against our bf16, and each against
    the deployment peers at its precision, on the ONNX export their float32 rows run (engine.export.export_onnx):
    OpenVINO in bfloat16, OpenVINO in int8 (NNCF's post-training quantization, nncf.quantize) and onnxruntime in int8
    (its static QDQ quantization, quantize_static), with as many threads. Every int8 side calibrates on the same
    ``calibration`` images (default: BENCH_CALIBRATION_IMAGES random images of the image's size). ``make_model()``
    builds a fresh eval copy of ours with the reference's weights.

    A row that cannot run here is Skipped with its reason: the CPU lacks the instructions the precision pays with
    (capabilities: native_bfloat16, native_int8; quantization.int8_available()), or a peer is not installed."""
    from ..capabilities import cpu_capabilities

    wanted = [p for p in precisions if p != "fp32"]
    rows = (BF16_ROWS if "bf16" in wanted else ()) + (INT8_ROWS if "int8" in wanted else ())
    if device != "cpu":
        reason = "a CPU row: the bf16 and int8 modes here are CPU inference modes, and the peers CPU runtimes"
        return [Skipped(name, reason, target) for name, target in rows]
    caps = cpu_capabilities()
    threads = torch.get_num_threads()
    feed = {"image": image.numpy()}
    onnx_data: list[bytes] = []

    def onnx_export() -> bytes:
        if not onnx_data:
            import io

            from ..engine.export import export_onnx

            buffer = io.BytesIO()
            export_onnx(make_model(), image, buffer)
            onnx_data.append(buffer.getvalue())
        return onnx_data[0]

    bf16_reason = None if caps.native_bfloat16 else ("this CPU has neither AVX512-BF16 nor AMX: bfloat16 runs "
                                                     "emulated there, slower than float32")
    bf16_models: list[torch.nn.Module] = []

    def bf16_model() -> torch.nn.Module | None:
        """Ours in bfloat16, built once on first use; None where bfloat16 does not pay here."""
        if bf16_reason is None and not bf16_models:
            bf16_models.append(make_model())
            bf16_models[0].inference_dtype = torch.bfloat16
        return bf16_models[0] if bf16_models else None

    cases: list[Case | Skipped] = []
    if "bf16" in wanted:
        (tv_name, tv_target), (ov_name, ov_target) = BF16_ROWS
        if bf16_reason is not None:
            cases += [Skipped(name, bf16_reason, target) for name, target in BF16_ROWS]
        else:
            bf16 = bf16_model()
            cases.append(Case(tv_name, lambda: bf16([image]), lambda: reference([image]), tv_target))
            openvino = _peer("openvino")
            if isinstance(openvino, str):
                cases.append(Skipped(ov_name, openvino, ov_target))
            else:
                core = openvino.Core()
                compiled = core.compile_model(core.read_model(onnx_export()), "CPU", {
                    "INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": "bf16"})
                cases.append(Case(_versioned(ov_name, "OpenVINO", openvino.__version__),
                                  lambda: bf16([image]), lambda: compiled(feed), ov_target))
    if "int8" in wanted:
        cases += _int8_cases(make_model, reference, image, caps, bf16_model, bf16_reason, onnx_export, feed, threads,
                             calibration)
    return cases


def _peer(name: str):
    """The deployment peer's module, or why it cannot run: not installed."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed (an optional peer: requirements-dev.txt)"
    return importlib.import_module(name)


def _int8_cases(make_model, reference, image, caps, bf16_model, bf16_reason, onnx_export, feed, threads,
                calibration) -> list[Case | Skipped]:
    """low_precision_cases' int8 rows."""
    reason = None
    if not caps.native_int8:
        reason = "this CPU has neither VNNI nor AMX: int8 runs slower there than float32"
    else:
        from .. import quantization

        available, why = quantization.int8_available()
        if not available:
            reason = f"int8 does not pay here: {why}"
    if reason is not None:
        return [Skipped(name, reason, target) for name, target in INT8_ROWS]
    if calibration is None:
        calibration = [torch.rand(image.shape, generator=torch.Generator().manual_seed(100 + k))
                       for k in range(BENCH_CALIBRATION_IMAGES)]
    int8_model = quantization.quantize(make_model(), calibration)
    (tv_name, tv_target), (bf_name, bf_target), (ov_name, ov_target), (ort_name, ort_target) = INT8_ROWS
    cases: list[Case | Skipped] = [Case(tv_name, lambda: int8_model([image]), lambda: reference([image]), tv_target)]
    bf16 = bf16_model()
    if bf16 is None:
        cases.append(Skipped(bf_name, bf16_reason, bf_target))
    else:
        cases.append(Case(bf_name, lambda: int8_model([image]), lambda: bf16([image]), bf_target))
    openvino, nncf = _peer("openvino"), _peer("nncf")
    if isinstance(openvino, str) or isinstance(nncf, str):
        cases.append(Skipped(ov_name, openvino if isinstance(openvino, str) else nncf, ov_target))
    else:
        ov_name = _versioned(_versioned(ov_name, "OpenVINO", openvino.__version__), "NNCF", nncf.__version__)
        compiled = _openvino_int8(openvino, nncf, onnx_export(), calibration, threads)
        cases.append(Case(ov_name, lambda: int8_model([image]), lambda: compiled(feed), ov_target))
    onnxruntime = _peer("onnxruntime")
    if isinstance(onnxruntime, str):
        cases.append(Skipped(ort_name, onnxruntime, ort_target))
    else:
        ort_name = _versioned(ort_name, "onnxruntime", onnxruntime.__version__)
        session = _onnxruntime_int8(onnxruntime, onnx_export(), calibration, threads)
        cases.append(Case(ort_name, lambda: int8_model([image]), lambda: session.run(None, feed), ort_target))
    return cases


def _openvino_int8(openvino, nncf, onnx_data: bytes, calibration, threads: int):
    """The ONNX export quantized by NNCF (nncf.quantize: int8 weights and activations, calibrated on
    ``calibration``), compiled for the CPU at OpenVINO's default precision for what stays unquantized."""
    import contextlib
    import io
    import logging
    import os
    import tempfile

    core = openvino.Core()
    # nncf builds its graph from every consumer of each node's outputs, also consumers the model no longer reaches,
    # which the ONNX frontend leaves in place ("Could not find a node ... in NNCFGraph"); writing the model out and
    # reading it back drops them.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "detector.xml")
        openvino.save_model(core.read_model(onnx_data), path, compress_to_fp16=False)
        model = core.read_model(path)
    dataset = nncf.Dataset([im.numpy() for im in calibration], lambda image: {"image": image})
    # Its log and progress bars would interleave with the table: the level is restored after, the bars discarded.
    level = nncf.nncf_logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    finally:
        nncf.set_log_level(level)
    return core.compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": str(threads)})


def _onnxruntime_int8(onnxruntime, onnx_data: bytes, calibration, threads: int):
    """The ONNX export quantized by onnxruntime's static quantization (QDQ format: per-channel int8 weights, uint8
    activations calibrated on ``calibration``), after its pre-processing (shape inference and graph optimization,
    which it recommends before quantizing), as a CPU session with ``threads`` threads."""
    import os
    import tempfile

    from onnxruntime import quantization

    class Images(quantization.CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {"image": image.numpy()}

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, quantized = (os.path.join(folder, f"{n}.onnx") for n in ("source", "prepared", "int8"))
        with open(source, "wb") as f:
            f.write(onnx_data)
        quantization.quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantization.quantize_static(prepared, quantized, Images(), quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8)
        with open(quantized, "rb") as f:
            data = f.read()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def training_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                  seed: int = 0) -> Callable[[], torch.Tensor]:
    """One training step of `model` (in train mode) without the optimizer's update: the forward with its losses and
    the backward into the parameters' gradients. The samplers draw from torch's generator, seeded first, so two
    models with the same weights train on the same anchors and proposals. Returns the four losses."""
    def run() -> torch.Tensor:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            losses = model(images, targets)
            sum(losses.values()).backward()
        return torch.stack([losses[k].detach() for k in sorted(losses)])
    return run


def training_cases(device: str) -> list[Case]:
    """A training step of fasterrcnn_resnet50_fpn (same random weights, same sampled anchors and proposals), batch
    2, images resized to an 800-pixel short side, 6 boxes each: forward and backward, without the optimizer's update
    (the same on both sides). Ours runs the anchors, proposal selection, matching IoU, box encoding and
    MultiScaleRoIAlign's forward and backward in our kernels; the learned layers are torchvision's modules on both
    sides, and their backward is most of the step."""
    from torchvision.models.detection import faster_rcnn as tv

    from fasterrcnn_ext.models import detection as ours

    torch.manual_seed(0)
    theirs = tv.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).train().to(device)
    mine = ours.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).train().to(device)
    mine.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for h, w in ((600, 800), (640, 720)):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(6, 2, generator=g) * 200 + 16
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, 91, (6,), generator=g).to(device)})
    ours_step, theirs_step = training_step(mine, images, targets), training_step(theirs, images, targets)
    cases = [Case("training step (fwd+bwd), R50-FPN, 800px, batch 2", ours_step, theirs_step, target=1.0)]
    if device == "cpu":
        # What `fasterrcnn-ext train` runs on the CPU: each step in the memory pool, which reuses the previous step's
        # blocks instead of page-faulting them in again (a memory strategy, not a kernel: torchvision's side runs as
        # its reference training script does). The training loop's cap is raised here, once, and kept between the
        # timed calls (memory.training_cache_limit() would empty the cache on leaving).
        from fasterrcnn_ext import memory

        memory.set_cpu_cache_limit(max(memory.cpu_cache_stats().limit_bytes, memory.training_cache_limit_bytes()))

        def pooled_step():
            with memory.cpu_pool():
                return ours_step()

        cases.append(Case("training step in the memory pool (our trainer)", pooled_step, theirs_step, target=1.3))
    return cases


def conv_cases(device: str) -> list[Case]:
    """The inference copies' Winograd 3x3 convolution (CPU only) against the direct convolution torchvision's
    modules run (F.conv2d, channels_last as in our copies), on the detector's largest layers. No issue sets a
    target: it is here to show where the detector's time went."""
    if device != "cpu":
        return []
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    cases = []
    for channels, (h, w), where in ((256, (200, 272), "FPN/RPN head at stride 4"), (512, (25, 34), "ResNet layer4")):
        x = torch.randn(1, channels, h, w, generator=g).relu().contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(channels, channels, 3, 3, generator=g) * 0.02).contiguous(
            memory_format=torch.channels_last)
        bias = torch.randn(channels, generator=g)
        transformed = ops.winograd_weight(weight)
        cases.append(Case(f"conv3x3 {channels}ch {h}x{w} ({where}), Winograd vs direct",
                          lambda x=x, u=transformed, b=bias: ops.conv3x3_winograd(x, u, b),
                          lambda x=x, wt=weight, b=bias: F.conv2d(x, wt, b, padding=1), target=1.0))
    return cases


def pipeline_cases(device: str) -> list[Case]:
    """detect's pipeline over a folder of images, per pass (benchmark/throughput.py)."""
    from .throughput import pipeline_cases as cases

    return cases(device)


# The groups that take bench's --precision (the others time float32 only).
PRECISION_GROUPS = ("detector",)

ALL_CASES: dict[str, Callable[..., list[Case | Skipped]]] = {
    "detector": detector_cases,
    "conv": conv_cases,
    "boxes": box_cases,
    "nms": nms_cases,
    "roi": roi_cases,
    "training": training_cases,
    "patch": patch_cases,
    "pipeline": pipeline_cases,
}
