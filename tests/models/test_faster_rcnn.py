"""The detector against torchvision's: same state_dict, same detections in eval, same losses in training."""

import warnings

import pytest
import torch
import torchvision
from torchvision.models.detection import faster_rcnn as tv

from fasterrcnn_ext import capabilities
from fasterrcnn_ext.models import detection as ours

SMALL = dict(min_size=320, max_size=512)  # small images keep the CPU tests quick


def images_and_targets(n=2, seed=0, sizes=None):
    """Random images and boxes; the last image is a negative (no boxes).

    By default every image is 320x416: with min_size 320 the transform neither resizes nor pads them. Padding makes
    regions of identical features, hence tied scores, which two correct implementations may order differently.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [(320, 416)] * n
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 100 + 20], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 5, (3,), generator=g)})
    targets[-1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}  # a negative image
    return images, targets


def spread_scores(model):
    """Randomly initialised heads give near-equal scores, whose order a last-bit difference can flip; larger
    weights spread the scores so that detections are comparable one to one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor.cls_score):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)


def model_pair(name, **kw):
    torch.manual_seed(0)
    theirs = getattr(tv, name)(weights=None, weights_backbone=None, num_classes=5, **SMALL, **kw)
    spread_scores(theirs)
    mine = getattr(ours, name)(weights=None, weights_backbone=None, num_classes=5, **SMALL, **kw)
    mine.load_state_dict(theirs.state_dict(), strict=True)
    return mine, theirs


def small_model(name, **kw):
    """Our model of builder ``name`` (or fasterrcnn_vgg16) at small image sizes, randomly initialised with seed 0
    (the torchvision builders' weights are torchvision's model's: model_pair)."""
    if name == "fasterrcnn_vgg16":
        torch.manual_seed(0)
        return ours.fasterrcnn_vgg16(num_classes=5, min_size=224, max_size=320, **kw)
    return model_pair(name, **kw)[0]


def assert_same_detections(mine, theirs):
    for a, b in zip(mine, theirs):
        assert a.keys() == b.keys()
        assert len(a["boxes"]) == len(b["boxes"])
        if len(b["boxes"]) == 0:
            continue
        # Every detection has a twin: same label, IoU >= 0.99, score within 1e-3.
        iou = torchvision.ops.box_iou(a["boxes"], b["boxes"])
        same_label = a["labels"][:, None] == b["labels"][None, :]
        close_score = (a["scores"][:, None] - b["scores"][None, :]).abs() <= 1e-3
        assert ((iou >= 0.99) & same_label & close_score).any(1).all()


def assert_equal_detections(got, expected):
    """The same detections, key by key, within float tolerance (the same model run two ways)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key])


BUILDERS = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
            "fasterrcnn_mobilenet_v3_large_320_fpn"]


def test_eval_detections_equal_torchvision():
    """The whole model, images in, detections out (the backbone run as is: see the fast-path test below)."""
    mine, theirs = model_pair("fasterrcnn_resnet50_fpn", box_score_thresh=0.05, box_detections_per_img=1000)
    mine.fast_inference = False
    images, _ = images_and_targets()
    mine.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = mine(images), theirs(images)
    assert sum(len(d["boxes"]) for d in b) > 0
    assert_same_detections(a, b)


# Box coders unlike torchvision's defaults: other weights, and exp clamps that some of the heads' dw and dh pass (the
# test checks that they do), so a path that ignored either would change the detections.
RPN_CODER = dict(weights=(2.0, 2.0, 0.5, 0.5), bbox_xform_clip=0.5)
ROI_HEADS_CODER = dict(weights=(5.0, 5.0, 2.0, 2.0), bbox_xform_clip=1.0)


def test_any_box_coders_give_torchvision_detections():
    """The fused ops decode with the model's own box coders: with coders of other weights and clamps (torchvision's
    class in the RPN, ours in the RoI heads: any object with BoxCoder's attributes), the eager model, detect_padded
    and the scripted model give torchvision's detections."""
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

    from fasterrcnn_ext.models.detection._utils import BoxCoder
    from fasterrcnn_ext.models.detection.faster_rcnn import padded_detections_to_list

    mine, theirs = model_pair("fasterrcnn_resnet50_fpn", box_score_thresh=0.05, box_detections_per_img=1000)
    mine.fast_inference = False  # the scripted model runs the modules as they are: so does the eager run
    images, _ = images_and_targets()
    mine.eval()
    theirs.eval()
    with torch.no_grad():
        for model in (mine, theirs):
            # The random RPN head's logits saturate the sigmoid (tied scores, which two correct implementations
            # order differently) and its dw, dh are in the tens (every one past any clamp): scaled down, the scores
            # are distinct and the clamp binds for some boxes only.
            model.rpn.head.cls_logits.weight.mul_(0.01)
            model.rpn.head.bbox_pred.weight.mul_(0.05)
        default = theirs(images)
        theirs.rpn.box_coder = TorchvisionBoxCoder(RPN_CODER["weights"])
        theirs.roi_heads.box_coder = TorchvisionBoxCoder(ROI_HEADS_CODER["weights"])
        unclamped = theirs(images)  # the weights alone
        theirs.rpn.box_coder = TorchvisionBoxCoder(**RPN_CODER)
        theirs.roi_heads.box_coder = TorchvisionBoxCoder(**ROI_HEADS_CODER)
        expected = theirs(images)
        mine.rpn.box_coder = TorchvisionBoxCoder(**RPN_CODER)
        mine.roi_heads.box_coder = BoxCoder(**ROI_HEADS_CODER)
        eager = mine(images)
        padded = padded_detections_to_list(*mine.detect_padded(images))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation; "RCNN always returns a (Losses, ...)"
            scripted = torch.jit.script(mine)(images)[1]
    assert sum(len(d["boxes"]) for d in expected) > 0
    for wrong in (default, unclamped):  # both the weights and the clamps change the detections
        with pytest.raises(AssertionError):
            assert_same_detections(expected, wrong)
    assert_same_detections(eager, expected)
    assert_same_detections(padded, expected)  # the box head ran on more rows: float tolerance
    assert_equal_detections(scripted, eager)


@pytest.mark.parametrize("name", BUILDERS)
def test_eval_downstream_of_backbone_equals_torchvision(name):
    """Every builder, on random features of the backbone's shapes: randomly initialised backbones can give flat
    features and so tied scores, whose order two correct implementations may break differently."""
    mine, theirs = model_pair(name, box_score_thresh=0.05, box_detections_per_img=1000)
    assert list(mine.state_dict()) == list(theirs.state_dict())
    mine.eval()
    theirs.eval()
    images, _ = images_and_targets()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        image_list, _ = theirs.transform(images)
        features = {k: torch.randn(v.shape, generator=g) for k, v in theirs.backbone(image_list.tensors).items()}
        proposals, _ = mine.rpn(image_list, features)
        expected, _ = theirs.rpn(image_list, features)
        for p, e in zip(proposals, expected):
            assert p.shape == e.shape
            assert torchvision.ops.box_iou(p, e).max(1).values.min() > 0.999
        a, _ = mine.roi_heads(features, expected, image_list.image_sizes)
        b, _ = theirs.roi_heads(features, expected, image_list.image_sizes)
    assert sum(len(d["boxes"]) for d in b) > 0
    assert_same_detections(a, b)


def test_float64_ground_truth_trains_as_in_torchvision():
    """Boxes loaded as float64 (numpy annotations) meet float32 anchors and proposals; torchvision promotes, and so
    does ours: the same losses."""
    mine, theirs = model_pair("fasterrcnn_mobilenet_v3_large_320_fpn")
    images, targets = images_and_targets()
    targets = [{**t, "boxes": t["boxes"].double()} for t in targets]
    losses = []
    for model in (mine, theirs):
        torch.manual_seed(1)
        losses.append(model.train()(images, targets))
    assert losses[0].keys() == losses[1].keys()
    for k in losses[1]:
        torch.testing.assert_close(losses[0][k], losses[1][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_train_losses_equal_torchvision(name):
    """The RPN losses equal torchvision's. The box head's losses are compared on the same proposals: end to end they
    may differ a little, because near-equal proposal scores (thousands of sigmoids, some a rounding apart) can be
    ordered differently by two correct implementations (and by torchvision on AVX2 and AVX-512 CPUs), and the
    sampler's random draw is over the proposals' order."""
    mine, theirs = model_pair(name)
    images, targets = images_and_targets()
    mine.train()
    theirs.train()
    torch.manual_seed(1)
    a = mine(images, targets)
    torch.manual_seed(1)
    b = theirs(images, targets)
    assert a.keys() == b.keys() == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for k in ("loss_objectness", "loss_rpn_box_reg"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for k in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)
    sum(a.values()).backward()

    with torch.no_grad():
        image_list, scaled_targets = theirs.transform(images, targets)
        features = theirs.backbone(image_list.tensors)
        proposals, _ = theirs.rpn(image_list, features, scaled_targets)
        torch.manual_seed(2)
        _, heads_a = mine.roi_heads(features, [p.clone() for p in proposals], image_list.image_sizes, scaled_targets)
        torch.manual_seed(2)
        _, heads_b = theirs.roi_heads(features, [p.clone() for p in proposals], image_list.image_sizes,
                                      scaled_targets)
    assert heads_a.keys() == heads_b.keys() == {"loss_classifier", "loss_box_reg"}
    for k in heads_a:
        torch.testing.assert_close(heads_a[k], heads_b[k], rtol=1e-4, atol=1e-5)


def with_calibrated_batch_norm(model, images):
    """Sets the backbone's BatchNorm running statistics to those of `images`, then returns the model in eval mode.

    A randomly initialised MobileNetV3 in eval mode (running mean 0, variance 1) shrinks its features to ~1e-8: every
    proposal then gets the same features and scores tied to the last bit, whose order rounding decides (a GEMM over
    3K RoIs may round differently from one over K). Calibrated, the features are O(1) and the scores distinct.
    """
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics
        m.train()
    with torch.no_grad():
        model.backbone(model.transform(images)[0].tensors)
    return model.eval()


def test_batched_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = ours.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                      box_score_thresh=0.0)
    images, _ = images_and_targets(3)
    images = [images[0]] * 3  # same size: batching adds no padding
    model = with_calibrated_batch_norm(model, images)
    with torch.no_grad():
        batched = model(images)
        single = [model([img])[0] for img in images]
    for a, b in zip(batched, single):
        assert len(a["scores"]) == len(b["scores"]) > 50
        # The box head's matrix products round differently for 3K RoIs than for K: scores may differ in the last
        # bits. So each of the top 50 detections must have a twin: same label, same score and box up to rounding.
        for box, score, label in zip(a["boxes"][:50], a["scores"][:50], a["labels"][:50]):
            twin = ((b["labels"] == label) & ((b["scores"] - score).abs() <= 1e-5)
                    & ((b["boxes"] - box).abs().amax(1) <= 1e-2))
            assert twin.any(), (box, score, label)
        torch.testing.assert_close(a["scores"][:50], b["scores"][:50], rtol=0, atol=1e-5)


def test_vgg16_train_step_and_eval():
    torch.manual_seed(0)
    model = ours.fasterrcnn_vgg16(num_classes=5, min_size=224, max_size=320)
    assert model.backbone[-1].__class__ is torch.nn.ReLU and model.backbone.out_channels == 512
    assert model.rpn.anchor_generator.num_anchors_per_location() == [9]
    images, targets = images_and_targets(sizes=[(300, 400), (260, 350)])  # different sizes batch together
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    frozen = model.backbone[0].weight  # conv1_1: frozen as in the classic setup
    assert frozen.grad is None and model.roi_heads.box_head.fc6.weight.grad is not None
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(set(d) == {"boxes", "labels", "scores"} for d in out)


@pytest.mark.parametrize(
    "images, targets, training, message",
    [
        ([torch.rand(300, 400)], None, False, r"images\[0\] must be a \[C, H, W\] tensor, got \(300, 400\)"),
        (torch.rand(3, 64, 64), None, False,
         r"images must be a list of \[C, H, W\] tensors or one \[N, C, H, W\] tensor, got a tensor of shape \(3, 64"),
        ([torch.rand(3, 64, 64), torch.rand(64, 64)], None, False, r"images\[1\] must be a \[C, H, W\] tensor"),
        ([torch.rand(3, 64, 64)], None, True, r"targets are required in training mode"),
        ([torch.rand(3, 64, 64), torch.rand(3, 0, 64)], None, False,
         r"images\[1\] is empty: its shape is \(3, 0, 64\)"),
        # min_size 320, max_size 640: 2x1281 would resize to 0x640 (torch's interpolate fails, naming no image).
        ([torch.rand(3, 2, 1281)], None, False, r"images\[0\] of 2x1281 pixels is too thin: .* would make it 0x640"),
        ([torch.rand(3, 1281, 2)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}], True,
         r"images\[0\] of 1281x2 pixels is too thin"),
        ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, 10, 5, 20]]), "labels": torch.tensor([1])}], True,
         r"targets\[0\]\['boxes'\]\[0\] .* of image 0 has x2 <= x1 or y2 <= y1"),
        ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, 10, 20, 10]]), "labels": torch.tensor([1])}], True,
         r"has x2 <= x1 or y2 <= y1"),
    ],
)
def test_bad_input(images, targets, training, message):
    model = ours.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    model.train(training)
    with pytest.raises(ValueError, match=message):
        model(images, targets)
    if not training:
        with pytest.raises(ValueError, match=message):
            model.detect_padded(images)


def test_a_batch_tensor_gives_the_detections_of_its_images():
    """torchvision's eager model iterates over what it is given, so users pass one Tensor[N, C, H, W]: ours takes it
    too, in forward (eval and training) and in detect_padded, as the list of its images."""
    model = small_model("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0).eval()
    images, targets = images_and_targets()
    batch = torch.stack(images)
    with torch.no_grad():
        assert_equal_detections(model(batch), model(images))
        for got, expected in zip(model.detect_padded(batch), model.detect_padded(images)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.manual_seed(0)
    losses = model.train()(batch, targets)
    torch.manual_seed(0)
    expected = model(images, targets)
    assert losses.keys() == expected.keys() and all(torch.equal(losses[k], expected[k]) for k in expected)


def test_the_thinnest_images_the_resize_allows_run():
    """The thinness check refuses only what torchvision's resize cannot do: at exactly max_size to 1 it runs."""
    model = small_model("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0).eval()
    images = [torch.rand(3, 2, 1024), torch.rand(3, 512, 1)]  # max_size 512 (SMALL): resized to 1 pixel thick
    with torch.no_grad():
        detections = model(images)
        padded = model.detect_padded(images)
    assert sum(len(d["boxes"]) for d in detections) > 0
    for d, (height, width) in zip(detections, [(2, 1024), (512, 1)]):
        assert ((d["boxes"] >= 0) & (d["boxes"] <= torch.tensor([width, height, width, height]))).all()
    assert torch.equal(padded[3], torch.tensor([len(d["boxes"]) for d in detections]))


def test_local_checkpoint_weights(tmp_path):
    mine, _ = model_pair("fasterrcnn_mobilenet_v3_large_320_fpn")
    path = tmp_path / "model.pt"
    torch.save({"model": mine.state_dict(), "iteration": 3}, path)
    loaded = ours.fasterrcnn_mobilenet_v3_large_320_fpn(weights=str(path), **SMALL)
    for (k, v), (k2, v2) in zip(mine.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="has 5 classes, not num_classes=7"):
        ours.fasterrcnn_mobilenet_v3_large_320_fpn(weights=str(path), num_classes=7)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        ours.fasterrcnn_mobilenet_v3_large_320_fpn(weights=str(bad))


def test_uses_our_kernels():
    model = ours.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert isinstance(model.rpn, ours.RegionProposalNetwork)
    assert isinstance(model.rpn.anchor_generator, ours.AnchorGenerator)
    assert isinstance(model.roi_heads, ours.RoIHeads)
    from fasterrcnn_ext.ops import MultiScaleRoIAlign
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleRoIAlign)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                                  "fasterrcnn_mobilenet_v3_large_fpn"])
def test_fast_inference_backbone_equals_backbone(name):
    """The inference copy (batch norms folded, channels_last) computes the backbone's features."""
    mine, _ = model_pair(name)
    mine.eval()
    for m in mine.backbone.modules():  # non-trivial batch-norm statistics, so the folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 320, 416)
    with torch.no_grad():
        expected = mine.backbone(x)
        fast = mine._backbone_for_inference.get(mine.backbone)(x.contiguous(memory_format=torch.channels_last))
    for k in expected:
        torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-4 * expected[k].abs().max().item())
    # The copy follows the weights.
    with torch.no_grad():
        next(mine.backbone.parameters()).mul_(0.5)
    with torch.no_grad():
        changed = mine.backbone(x)
        fast = mine._backbone_for_inference.get(mine.backbone)(x.contiguous(memory_format=torch.channels_last))
    for k in changed:
        torch.testing.assert_close(fast[k], changed[k], rtol=1e-4, atol=1e-4 * changed[k].abs().max().item())


def test_model_built_under_inference_mode_follows_in_place_weight_loads():
    """Inference tensors keep no version counter: the inference copy must not go stale after load_state_dict."""
    from fasterrcnn_ext.models.detection import fasterrcnn_tiny

    torch.manual_seed(1)
    trained = fasterrcnn_tiny(box_score_thresh=0.0).eval()
    for m in trained.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    images = [torch.rand(3, 160, 192)]
    with torch.inference_mode():
        model = fasterrcnn_tiny(box_score_thresh=0.0).eval()
        model(images)  # a first call with the random weights
        model.load_state_dict(trained.state_dict())
        got = model(images)[0]
        model.fast_inference = False
        expected = model(images)[0]
    assert len(expected["boxes"]) > 0
    # Twins, not the same order: the fast path rounds differently (Winograd), which may swap near-tied scores.
    assert_same_detections([got], [expected])


@pytest.mark.filterwarnings("ignore:inference_dtype = torch.bfloat16 on a CPU without")
def test_bfloat16_inference_runs_and_keeps_float32_boxes():
    mine, _ = model_pair("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0)
    mine.eval()
    mine.inference_dtype = torch.bfloat16
    images, _ = images_and_targets()
    with torch.no_grad():
        out = mine(images)
    assert all(d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32 for d in out)
    assert sum(len(d["boxes"]) for d in out) > 0


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n
                                  for n in BUILDERS + ["fasterrcnn_vgg16"]])
def test_torch_compile_fullgraph_eval_model(name):
    """torch.compile(fullgraph=True) of the eval model gives the plain eager detections: no graph break from the
    images to the detections (the per-image splits of the post-processing are an op with unbacked output sizes)."""
    mine = small_model(name, box_score_thresh=0.0).eval()
    images, _ = images_and_targets(2)
    compiled = torch.compile(mine, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(images)
        mine.fast_inference = False  # what the compiled forward runs: the modules as they are
        expected = mine(images)
    assert sum(len(d["boxes"]) for d in got) > 0
    assert_equal_detections(got, expected)


def test_bfloat16_copy_fuses_convolutions_and_keeps_bfloat16_weights():
    """With inference_dtype the inference copy keeps bfloat16 weights and runs each convolution with the ReLU and
    residual add after it as one oneDNN call. Against the folded float32 backbone its mean error is no larger than
    autocast's over the unfused modules (measured ~5% smaller: the add rounds once instead of twice), and the two
    are close."""
    import copy

    from fasterrcnn_ext.models.detection._inference import FusedBottleneck, FusedConv2d, fold_batch_norms

    mine, _ = model_pair("fasterrcnn_resnet50_fpn")
    mine.eval()
    x = torch.rand(1, 3, 160, 224).contiguous(memory_format=torch.channels_last)
    folded = copy.deepcopy(mine.backbone)
    fold_batch_norms(folded)
    folded = folded.to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = folded(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unfused = folded(x)
            bf16_copy = mine._backbone_for_inference.get(mine.backbone, torch.bfloat16)
            got = bf16_copy(x)
    assert all(p.dtype == torch.bfloat16 for p in bf16_copy.parameters())
    assert all(p.dtype == torch.float32 for p in mine.backbone.parameters())  # the model itself is untouched
    if not capabilities.cpu_capabilities().fused_bfloat16_convolutions:
        pytest.skip("oneDNN runs no bfloat16 convolution on this CPU (tests/test_capabilities.py covers that case)")
    assert sum(isinstance(m, FusedBottleneck) for m in bf16_copy.modules()) == 16  # ResNet-50: 3 + 4 + 6 + 3
    assert isinstance(bf16_copy.body.conv1, FusedConv2d)  # the stem, with its ReLU
    for k in reference:
        scale = reference[k].abs().mean()
        fused_error = (got[k].float() - reference[k]).abs().mean() / scale
        unfused_error = (unfused[k].float() - reference[k]).abs().mean() / scale
        assert fused_error <= 1.05 * unfused_error, (k, fused_error, unfused_error)
        assert (got[k].float() - unfused[k].float()).abs().max() <= 0.03 * reference[k].abs().max()


@pytest.mark.parametrize("stride, downsample", [(1, False), (2, True)])
def test_fused_bottleneck_equals_the_block_in_float32(stride, downsample):
    """FusedBottleneck's wiring (strides, padding, downsample, residual, ReLUs), checked in float32 where rounding
    cannot hide a mistake; the Sequential fusion likewise on conv, batch norm, ReLU."""
    from torchvision.models.resnet import Bottleneck

    from fasterrcnn_ext.models.detection._inference import FusedConv2d, fold_batch_norms, fuse_convolutions

    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        pytest.skip("no oneDNN fused convolution in this torch build")
    torch.manual_seed(0)
    down = torch.nn.Sequential(torch.nn.Conv2d(64, 256, 1, stride, bias=False), torch.nn.BatchNorm2d(256))
    block = Bottleneck(64 if downsample else 256, 64, stride=stride, downsample=down if downsample else None)
    seq = torch.nn.Sequential(torch.nn.Conv2d(64 if downsample else 256, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                              torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1))
    for m in list(block.modules()) + list(seq.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so that folding matters
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    block.eval()
    seq.eval()
    x = torch.randn(2, 64 if downsample else 256, 15, 17).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, expected_seq = block(x), seq(x)
        wrapper = torch.nn.Sequential(block)
        fold_batch_norms(wrapper)
        fold_batch_norms(seq)
        assert fuse_convolutions(wrapper) == 1 and fuse_convolutions(seq) == 1
        assert isinstance(seq[0], FusedConv2d) and isinstance(seq[2], torch.nn.Identity)
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seq(x), expected_seq, rtol=1e-4, atol=1e-4)


def test_fast_inference_uses_winograd_in_backbone_and_rpn_head():
    """The inference copies run the eligible 3x3 convolutions by Winograd (the RPN head's with its ReLU fused), and
    the RPN head's copy computes the head's outputs (the backbone's: test_fast_inference_backbone_equals_backbone)."""
    from fasterrcnn_ext.models.detection._inference import WinogradConv2d

    mine, _ = model_pair("fasterrcnn_resnet50_fpn")
    mine.eval()
    backbone_copy = mine._backbone_for_inference.get(mine.backbone)
    head_copy = mine._rpn_head_for_inference.get(mine.rpn.head)
    # FPN; the ResNet stride-1 3x3 layers of up to 256 channels (the stride-32 stage's 512 are direct)
    assert sum(isinstance(m, WinogradConv2d) for m in backbone_copy.modules()) == 4 + 11
    assert [m.relu for m in head_copy.modules() if isinstance(m, WinogradConv2d)] == [True]  # conv + ReLU fused
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 256, s, s + 3, generator=g).contiguous(memory_format=torch.channels_last)
                for s in (40, 20, 10, 5, 3)]
    with torch.no_grad():
        expected, got = mine.rpn.head(features), head_copy(features)
    for e_level, g_level in zip(expected, got):
        for e, g_ in zip(e_level, g_level):
            torch.testing.assert_close(g_, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_weights_enums_import_from_here_too():
    """`from fasterrcnn_ext.models.detection import fasterrcnn_resnet50_fpn, FasterRCNN_ResNet50_FPN_Weights` works:
    the enums are torchvision's own (the builders hand them to torchvision)."""
    for name in ("FasterRCNN_ResNet50_FPN_Weights", "FasterRCNN_ResNet50_FPN_V2_Weights",
                 "FasterRCNN_MobileNet_V3_Large_FPN_Weights", "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights"):
        assert getattr(ours, name) is getattr(tv, name) and name in ours.__all__
        assert getattr(ours, name).DEFAULT.meta["categories"][1] == "person"


def test_adopt_leaves_the_torchvision_model_as_it_was():
    """FasterRCNN.adopt copies: the torchvision model keeps its types, its very modules and its weights, and
    training ours later does not reach it; RegionProposalNetwork.adopt and RoIHeads.adopt share the submodules but
    leave the module they are given as it was."""
    torch.manual_seed(0)
    theirs = tv.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5, **SMALL)
    modules = dict(theirs.named_modules())
    types = {name: type(m) for name, m in modules.items()}
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    mine = ours.FasterRCNN.adopt(theirs)
    assert dict(theirs.named_modules()) == modules  # the same module objects under the same names
    assert {name: type(m) for name, m in theirs.named_modules()} == types
    assert type(theirs.rpn.anchor_generator) is torchvision.models.detection.anchor_utils.AnchorGenerator
    assert type(theirs.roi_heads.box_roi_pool) is torchvision.ops.MultiScaleRoIAlign
    assert isinstance(mine.rpn, ours.RegionProposalNetwork) and isinstance(mine.roi_heads, ours.RoIHeads)
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(1.0)  # as training would
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, state[k]), k

    rpn_modules = dict(theirs.rpn.named_modules())
    adopted_rpn = ours.RegionProposalNetwork.adopt(theirs.rpn)
    adopted_rpn.head = torch.nn.Identity()
    heads_box_coder = theirs.roi_heads.box_coder
    ours.RoIHeads.adopt(theirs.roi_heads).box_head = torch.nn.Identity()
    assert dict(theirs.rpn.named_modules()) == rpn_modules
    assert type(theirs.rpn) is torchvision.models.detection.rpn.RegionProposalNetwork
    assert theirs.roi_heads.box_coder is heads_box_coder
    assert type(theirs.roi_heads.box_head) is torchvision.models.detection.faster_rcnn.TwoMLPHead


def test_adopted_model_gives_torchvision_detections():
    _, theirs = model_pair("fasterrcnn_resnet50_fpn", box_score_thresh=0.05, box_detections_per_img=1000)
    adopted = ours.FasterRCNN.adopt(theirs).eval()
    adopted.fast_inference = False
    theirs.eval()
    images, _ = images_and_targets(1)
    with torch.no_grad():
        got, expected = adopted(images), theirs(images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    assert_same_detections(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_detector_converted_to_half_precision_runs_and_trains(dtype):
    """model.half() / model.bfloat16(): the layers run in that dtype while anchors, proposals and boxes stay float32
    (box decoding in float32), so the pooler meets half maps and float32 RoIs (tests/ops/test_poolers.py covers the
    pooling). torchvision's converted model stops at its CPU NMS ("not implemented for 'Half'"); ours detects and
    trains on the CPU."""
    from fasterrcnn_ext.models.detection import fasterrcnn_tiny

    torch.manual_seed(0)
    mine = fasterrcnn_tiny(box_score_thresh=0.0).to(dtype)  # half convolutions are slow on a CPU: a small model
    float_images, targets = images_and_targets(sizes=[(160, 192), (192, 176)])
    images = [image.to(dtype) for image in float_images]
    with torch.no_grad():
        detections = mine.eval()(images)
        # float32 images, as a user's pipeline gives them: cast to the layers' dtype, the same detections.
        assert_same_detections(mine(float_images), detections)
    for image, d in zip(images, detections):
        assert len(d["boxes"]) > 0 and d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32
        assert torch.isfinite(d["boxes"]).all() and torch.isfinite(d["scores"]).all()
        assert (d["boxes"][:, 2:] <= torch.tensor(image.shape[:0:-1])).all()
    losses = mine.train()(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grad = next(mine.roi_heads.box_head.parameters()).grad
    assert grad is not None and grad.dtype == dtype and grad.abs().sum() > 0
