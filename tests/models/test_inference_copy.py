"""The inference copy's memory (models/detection/_inference.py): what it holds beside the module, what it shares
with it, and that sharing leaves the module, its state_dict and its training untouched."""

import pytest
import torch

from fasterrcnn_ext import capabilities, memory
from fasterrcnn_ext.models import detection as ours
from fasterrcnn_ext.models.detection._inference import ChannelAffine, InferenceCopy, WinogradConv2d, copy_extra_bytes

# The float32 copy of R50-FPN's backbone may add at most this many times the backbone's parameter bytes: its folded
# ResNet weights up to the stride-16 stage and the stride-32 stage's 3x3 ones (the FPN's and the large 1x1 ones are
# shared), plus the Winograd layers' transformed weights beyond the weights they replace. Holding every folded
# weight beside an unshared duplicate, or the 512-channel layers' transformed weights (38 MB each), goes past it.
MAX_EXTRA_PER_PARAMETER_BYTE = 1.7


def parameter_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def features(out):
    return list(out.values()) if isinstance(out, dict) else [out]


def storages(module):
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    model = ours.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    for m in model.backbone.modules():  # non-trivial statistics, so that folding changes the weights
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_float32_copy_adds_less_than_the_bound(r50):
    if not capabilities.cpu_capabilities().winograd:
        pytest.skip("no Winograd on this CPU: the copy holds only folded weights")
    copy = InferenceCopy().get(r50.backbone)
    extra = copy_extra_bytes(r50.backbone, copy)
    params = parameter_bytes(r50.backbone)
    assert any(isinstance(m, WinogradConv2d) for m in copy.modules())
    assert extra <= MAX_EXTRA_PER_PARAMETER_BYTE * params, (extra / params)
    # The transformed weights counted are there: more than the folded ResNet weights alone.
    assert extra > 0.8 * params


def test_large_1x1_convolutions_keep_the_modules_weights_and_the_outputs_stay(r50):
    """A fold copies the weight; the stride-32 stage's 1x1 convolutions (up to 2M elements) keep the module's own,
    their norms run as one per-channel pass, and the copy computes what the module does."""
    copy = InferenceCopy().get(r50.backbone)
    block, copied = r50.backbone.body.layer4[0], copy.body.layer4[0]
    for name in ("conv1", "conv3"):
        assert getattr(copied, name).weight.data_ptr() == getattr(block, name).weight.data_ptr(), name
    assert isinstance(copied.bn1, ChannelAffine) and isinstance(copied.bn3, ChannelAffine)
    assert copied.downsample[0].weight.data_ptr() == block.downsample[0].weight.data_ptr()
    assert isinstance(copied.downsample[1], ChannelAffine)
    # The stride-16 stage's 1x1 convolutions (2**18 elements) are folded.
    assert isinstance(copy.body.layer3[1].bn1, torch.nn.Identity)
    x = torch.rand(1, 3, 160, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = features(r50.backbone(x)), features(copy(x))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_bfloat16_copy_adds_at_most_half_the_module(r50):
    copy = InferenceCopy().get(r50.backbone, torch.bfloat16)
    assert copy_extra_bytes(r50.backbone, copy) <= 0.5 * parameter_bytes(r50.backbone) + (1 << 20)


def test_unchanged_tensors_are_shared_and_the_module_is_untouched(r50):
    state = {k: v.clone() for k, v in r50.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in r50.state_dict().items()}
    formats = {k: v.stride() for k, v in r50.state_dict().items()}
    copy = InferenceCopy().get(r50.backbone)
    # The FPN's 1x1 convolutions are unchanged by folding and their bytes already in channels_last order: shared.
    inner = r50.backbone.fpn.inner_blocks[0][0]
    copied_inner = copy.fpn.inner_blocks[0][0]
    assert copied_inner.weight.data_ptr() == inner.weight.data_ptr()
    assert copied_inner.weight is not inner.weight  # its own Parameter object: replacing it leaves the module alone
    assert storages(r50.backbone) & storages(copy)
    for k, v in r50.state_dict().items():
        assert v.data_ptr() == pointers[k] and v.stride() == formats[k], k
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_training_the_module_leaves_shared_tensors_consistent():
    """Gradients and an optimizer step update the module as without a copy; the copy that aliased the old values
    is rebuilt at the next lookup and computes what the trained module computes."""
    torch.manual_seed(0)
    model = ours.fasterrcnn_tiny().eval()
    plain = ours.fasterrcnn_tiny()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        first = model._backbone_for_inference.get(model.backbone)
    for m in (model, plain):
        m.train()
        optimizer = torch.optim.SGD(m.backbone.parameters(), lr=0.1)
        loss = sum(f.square().mean() for f in features(m.backbone(x)))
        loss.backward()
        optimizer.step()
        m.eval()
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with torch.no_grad():
        second = model._backbone_for_inference.get(model.backbone)
        assert second is not first
        expected = features(plain.backbone(x))
        got = features(second(x.contiguous(memory_format=torch.channels_last)))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_stale_copies_of_every_dtype_are_dropped():
    torch.manual_seed(0)
    model = ours.fasterrcnn_tiny().eval()
    copies = InferenceCopy()
    copies.get(model.backbone)
    copies.get(model.backbone, torch.bfloat16)
    assert set(copies._copies) == {None, torch.bfloat16}  # both current: both kept
    with torch.no_grad():
        next(model.backbone.parameters()).mul_(0.5)
    copies.get(model.backbone)
    assert set(copies._copies) == {None}  # the bfloat16 copy followed the old weights


def test_copy_built_inside_a_pooled_forward_takes_no_pooled_block(r50):
    memory.empty_cpu_cache()
    before = memory.cpu_cache_stats()
    with memory.cpu_pool():
        copy = InferenceCopy().get(r50.backbone)
    after = memory.cpu_cache_stats()
    assert copy_extra_bytes(r50.backbone, copy) > 16 << 20  # large enough that the pool would have taken it
    assert (after.misses, after.in_use_bytes) == (before.misses, before.in_use_bytes)
