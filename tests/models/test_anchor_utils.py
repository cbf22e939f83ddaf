import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fasterrcnn_ext.models.detection import AnchorGenerator

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5


def fpn_features(image_hw=(768, 1344), device="cpu", dtype=torch.float32):
    h, w = image_hw
    return [torch.zeros(1, 1, -(-h // s), -(-w // s), device=device, dtype=dtype) for s in (4, 8, 16, 32, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fpn_anchors_equal_torchvision(device, dtype):
    # An 800-pixel image resized by the transform (e.g. 750x1333) is padded to 768x1344: P2 is 192x336.
    images = ImageList(torch.zeros(2, 3, 768, 1344, device=device, dtype=dtype), [(750, 1333), (768, 1300)])
    feats = fpn_features(device=device, dtype=dtype)
    ours = AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    theirs = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    assert len(ours) == len(theirs) == 2
    if dtype == torch.float16:  # half-precision features get float32 anchors (fp32 box coordinates)
        theirs = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, [f.float() for f in feats])
    for a, b in zip(ours, theirs):
        assert a.shape == (257_796, 4)  # the count docs/design.md gives
        assert a.dtype == (torch.float32 if dtype == torch.float16 else dtype)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_level_vgg_anchors_and_grid_anchors():
    gen = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    tv = TVAnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location() == tv.num_anchors_per_location() == [9]
    images = ImageList(torch.zeros(1, 3, 600, 1000), [(600, 1000)])
    feats = [torch.zeros(1, 512, 38, 63)]
    torch.testing.assert_close(gen(images, feats)[0], tv(images, feats)[0], rtol=0, atol=0)
    strides = [[torch.tensor(16), torch.tensor(16)]]
    tv.set_cell_anchors(torch.float32, torch.device("cpu"))
    torch.testing.assert_close(gen.grid_anchors([(38, 63)], [(16, 16)])[0], tv.grid_anchors([[38, 63]], strides)[0])


def test_mismatched_levels_raise():
    gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    with pytest.raises(ValueError, match="got 2 feature maps but anchors for 5 levels"):
        gen(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), [torch.zeros(1, 1, 16, 16)] * 2)


def test_opcheck(device):
    cells = [AnchorGenerator.generate_anchors((32, 64), (0.5, 1.0)).to(device)] * 2
    torch.library.opcheck(torch.ops.fasterrcnn_ext.anchor_grid.default, (cells, [3, 4, 2, 2], [8, 8, 16, 16]))
