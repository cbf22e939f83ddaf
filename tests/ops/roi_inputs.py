"""Inputs for the RoI pooling tests."""

import torch


def random_rois(k, batch, image_hw=(64, 80), min_size=2.0, max_size=40.0, dtype=torch.float32, device="cpu"):
    """[K, 5] rois with batch indices in [0, batch), boxes partly outside the image on purpose."""
    h, w = image_hw
    xy = torch.rand(k, 2, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64) - 4
    wh = torch.rand(k, 2, dtype=torch.float64) * (max_size - min_size) + min_size
    idx = torch.randint(0, batch, (k, 1)).to(torch.float64)
    return torch.cat([idx, xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def as_box_list(rois, batch):
    return [rois[rois[:, 0] == i, 1:] for i in range(batch)]
