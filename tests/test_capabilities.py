"""fasterrcnn_ext.capabilities: the one place that picks the CPU fast paths. Each capability is forced off (and on,
where this machine has it) and the fallback is checked to be taken and to give the same results, so every branch
runs on any CPU the suite lands on."""

import copy
import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fasterrcnn_ext import capabilities, memory, ops
from fasterrcnn_ext._library import ops as library_ops
from fasterrcnn_ext.models.detection import fasterrcnn_tiny
from fasterrcnn_ext.models.detection._inference import FusedBottleneck, FusedConv2d, WinogradConv2d
from tests.models.test_faster_rcnn import assert_same_detections, images_and_targets, model_pair
from tests.ops.roi_inputs import CPU_POOL_KERNELS, cpu_pool_kernel

DETECTED = capabilities.detected()
TWIN_BUILT = "avx512_twin" in CPU_POOL_KERNELS
NAMES = [f.name for f in dataclasses.fields(DETECTED)]


def _settings(flag):
    """Each setting of a capability this machine can run: off, and on where it has it."""
    return [False, True] if getattr(DETECTED, flag) else [False]


def test_detection_follows_the_cpu_and_torch_build():
    caps = capabilities.detected()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert caps.native_bfloat16 == native
    flags = set()
    if os.path.exists("/proc/cpuinfo"):  # the kernel's own list, independent of torch's probe
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
        if flags & {"avx512_vnni", "amx_int8"}:
            assert caps.native_int8
        if caps.native_int8:
            assert flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
    assert caps.avx512_kernels == (torch.cpu._is_avx512_supported()
                                   and library_ops()._cpu_avx512_kernels()[0])
    if caps.fused_bfloat16_convolutions:
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert caps.winograd and caps.memory_pool  # our own portable code, wherever the library loads
    assert capabilities.cpu_capabilities() == caps


@pytest.mark.parametrize("name", NAMES)
def test_every_capability_can_be_forced_off_and_is_restored(name):
    before = capabilities.cpu_capabilities()
    with capabilities.forced(**{name: False}) as caps:
        assert getattr(caps, name) is False
        assert capabilities.cpu_capabilities() == caps
        with capabilities.forced(**{name: getattr(before, name)}):  # nests
            assert capabilities.cpu_capabilities() == before
        assert getattr(capabilities.cpu_capabilities(), name) is False
    assert capabilities.cpu_capabilities() == before
    assert library_ops()._cpu_avx512_kernels()[2] == before.avx512_kernels


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("native_bfloat16", "native_int8")])
def test_a_capability_the_machine_lacks_cannot_be_forced_on(name, monkeypatch):
    lacking = dataclasses.replace(DETECTED, **{name: False})
    monkeypatch.setattr(capabilities, "detected", lambda: lacking)
    with pytest.raises(ValueError, match=f"lacks {name}"):
        with capabilities.forced(**{name: True}):
            pass


def test_bad_names_and_values_are_refused():
    with pytest.raises(ValueError, match="unknown capability 'avx1024'"):
        with capabilities.forced(avx1024=False):
            pass
    with pytest.raises(ValueError, match="winograd must be True or False"):
        with capabilities.forced(winograd=0):
            pass


def test_kernels_switch_follows_the_capability():
    built, cpu_has, enabled = library_ops()._cpu_avx512_kernels()
    assert enabled == (built and cpu_has) == DETECTED.avx512_kernels
    with capabilities.forced(avx512_kernels=False):
        assert library_ops()._cpu_avx512_kernels()[2] is False
    assert library_ops()._cpu_avx512_kernels()[2] == enabled
    # Asking the library directly for loops the CPU lacks leaves them off.
    assert library_ops()._cpu_set_avx512_kernels(True) == enabled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_roi_pool_is_the_same_with_and_without_the_avx512_loops(dtype, requires_grad):
    """The AVX-512 running max and the portable one give the same bits, ties, NaN and signed zeros included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 23, 31, generator=g, dtype=dtype).round(decimals=1)  # many ties
    x[0, 3, 5:9, 4:8] = float("nan")
    x[1, 7] = -0.0
    xy = torch.rand(300, 2, generator=g, dtype=dtype) * 500
    wh = torch.rand(300, 2, generator=g, dtype=dtype) * 150 + 1
    rois = torch.cat([torch.randint(0, 2, (300, 1), generator=g).to(dtype), xy, xy + wh], 1)

    def run():
        inp = x.clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(requires_grad):
            out = ops.roi_pool(inp, rois, (7, 5), 1 / 16)
        return out.detach(), torch.autograd.grad(out.sum(), inp)[0] if requires_grad else None

    results = {}
    for kernel in CPU_POOL_KERNELS:  # the AVX-512 loops where the CPU has them, and their CPU twin where built
        with cpu_pool_kernel(kernel):
            results[kernel] = run()
    reference = torch.ops.torchvision.roi_pool(x, rois, 1 / 16, 7, 5)[0]
    for out, grad in results.values():
        torch.testing.assert_close(out, reference, rtol=0, atol=0, equal_nan=True)
        if grad is not None:
            torch.testing.assert_close(grad, results["portable"][1], rtol=0, atol=0)


@pytest.mark.skipif(not TWIN_BUILT, reason="built without the AVX-512 CPU twins (no SIMDe headers)")
def test_avx512_twin_switch_nests_and_restores():
    assert library_ops()._cpu_avx512_twin() is False
    with capabilities.avx512_twin():
        assert library_ops()._cpu_avx512_twin() is True
        with capabilities.avx512_twin():
            pass
        assert library_ops()._cpu_avx512_twin() is True
        with capabilities.forced(avx512_kernels=False):  # the twin is a check, independent of the capabilities
            assert library_ops()._cpu_avx512_twin() is True
        with capabilities.avx512_twin(False):
            assert library_ops()._cpu_avx512_twin() is False
        assert library_ops()._cpu_avx512_twin() is True
    assert library_ops()._cpu_avx512_twin() is False


@pytest.mark.skipif(not TWIN_BUILT, reason="built without the AVX-512 CPU twins (no SIMDe headers)")
@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False)])
def test_avx512_twin_environment_variable(value, expected):
    """FRCNN_USE_AVX512_TWIN=1 at load turns the twins on for the whole process (scripts/sanitize.sh uses it)."""
    code = "import fasterrcnn_ext, torch; print(torch.ops.fasterrcnn_ext._cpu_avx512_twin())"
    env = dict(os.environ, FRCNN_USE_AVX512_TWIN=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_avx512_twin_refused_where_not_built(monkeypatch):
    monkeypatch.setattr(capabilities._library, "build_info", lambda: {"cpu_avx512_twin": False})
    with pytest.raises(ValueError, match="no AVX-512 CPU twins"):
        with capabilities.avx512_twin():
            pass
    with capabilities.avx512_twin(False):  # off is always possible
        pass
    assert library_ops()._cpu_avx512_twin() is False


def _detections(model, images):
    with torch.no_grad():
        return model(images)


def test_winograd_off_runs_direct_convolutions_with_the_same_detections():
    mine, _ = model_pair("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0)
    mine.eval()
    images, _ = images_and_targets(1)
    expected = _detections(mine, images)
    with capabilities.forced(winograd=False):
        got = _detections(mine, images)
        copy_off = mine._backbone_for_inference.get(mine.backbone)
        assert not any(isinstance(m, WinogradConv2d) for m in copy_off.modules())
    copy_on = mine._backbone_for_inference.get(mine.backbone)  # rebuilt for the restored capabilities
    assert any(isinstance(m, WinogradConv2d) for m in copy_on.modules())
    assert sum(len(d["boxes"]) for d in expected) > 0
    assert_same_detections(got, expected)


def test_memory_pool_off_leaves_the_allocator_alone_with_the_same_detections():
    torch.manual_seed(0)
    model = fasterrcnn_tiny(box_score_thresh=0.0).eval()
    images = [torch.rand(3, 480, 640)]
    expected = _detections(model, images)
    with capabilities.forced(memory_pool=False):
        before = memory.cpu_cache_stats()
        got = _detections(model, images)
        after = memory.cpu_cache_stats()
    assert (after.hits, after.misses) == (before.hits, before.misses)
    for a, b in zip(got, expected):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("fused", _settings("fused_bfloat16_convolutions"))
def test_bfloat16_copy_fuses_only_where_onednn_runs_bfloat16(fused):
    """Where oneDNN has no bfloat16 convolution (AVX2-only CPUs) the bfloat16 copy keeps torch's convolutions (the
    fused op would raise there); either way its features match the float32 backbone's within bfloat16 rounding."""
    from fasterrcnn_ext.models.detection._inference import fold_batch_norms

    mine, _ = model_pair("fasterrcnn_resnet50_fpn")
    mine.eval()
    x = torch.rand(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    folded = copy.deepcopy(mine.backbone)
    fold_batch_norms(folded)
    with capabilities.forced(fused_bfloat16_convolutions=fused), torch.no_grad():
        reference = folded(x)
        bf16_copy = mine._backbone_for_inference.get(mine.backbone, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = bf16_copy(x)
    n_fused = sum(isinstance(m, (FusedBottleneck, FusedConv2d)) for m in bf16_copy.modules())
    assert (n_fused > 0) == fused
    for k in reference:
        assert (got[k].float() - reference[k]).abs().max() <= 0.05 * reference[k].abs().max(), k


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_detector_runs_on_any_cpu_and_warns_where_emulated(native):
    """inference_dtype = bfloat16 runs wherever the CPU is (fused or not) and warns exactly where bfloat16 is
    emulated; the boxes stay float32."""
    mine, _ = model_pair("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0)
    mine.eval()
    mine.inference_dtype = torch.bfloat16
    images, _ = images_and_targets(1)
    with capabilities.forced(native_bfloat16=native), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _detections(mine, images)
    emulated = [w for w in caught if "without AVX512-BF16 or AMX" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
    assert all(d["boxes"].dtype == torch.float32 for d in out) and sum(len(d["boxes"]) for d in out) > 0


def test_results_do_not_depend_on_the_number_of_threads():
    """Kernels split their work by thread count; the results must not change with it (1 thread, the machine's,
    and more threads than cores, as on a loaded machine)."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 64, 50, 60, generator=g)
    xy = torch.rand(500, 2, generator=g) * 700
    boxes = torch.cat([xy, xy + torch.rand(500, 2, generator=g) * 200 + 1], 1)
    rois = torch.cat([torch.randint(0, 2, (500, 1), generator=g).float(), boxes], 1)
    scores = torch.rand(500, generator=g)
    labels = torch.randint(0, 5, (500,), generator=g)

    def run():
        f = feats.clone().requires_grad_()
        aligned = ops.roi_align(f, rois, 7, 1 / 16, 2, True)
        (grad,) = torch.autograd.grad(aligned.square().sum(), f)
        return [aligned.detach(), grad, ops.roi_pool(feats, rois, 7, 1 / 16), ops.nms(boxes, scores, 0.5),
                ops.batched_nms(boxes, scores, labels, 0.5), ops.box_iou(boxes, boxes[:50]),
                ops.decode_boxes(torch.randn(500, 4, generator=torch.Generator().manual_seed(0)), boxes,
                                 (1.0, 1.0, 1.0, 1.0))]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, threads, 2 * threads + 1):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
