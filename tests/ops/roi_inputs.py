"""Inputs for the RoI pooling tests, and the CPU kernels of roi_pool they run on."""

import contextlib

import torch

from fasterrcnn_ext import build_info, capabilities

# The CPU running-max kernels of roi_pool this machine can run (roi_pool_kernel.cpp picks one per call): the portable
# one, the hand-written AVX-512 one where the CPU has AVX512F, and that kernel's CPU twin (its source on SIMDe's
# portable intrinsics) wherever it is built, so CPUs without AVX-512 test that kernel too.
CPU_POOL_KERNELS = (["portable"] + (["avx512"] if capabilities.detected().avx512_kernels else [])
                    + (["avx512_twin"] if build_info()["cpu_avx512_twin"] else []))


@contextlib.contextmanager
def cpu_pool_kernel(name):
    """roi_pool's CPU kernel inside the block is the one named (from CPU_POOL_KERNELS)."""
    with capabilities.forced(avx512_kernels=name == "avx512"), capabilities.avx512_twin(name == "avx512_twin"):
        yield


def random_rois(k, batch, image_hw=(64, 80), min_size=2.0, max_size=40.0, dtype=torch.float32, device="cpu"):
    """[K, 5] rois with batch indices in [0, batch), boxes partly outside the image on purpose."""
    h, w = image_hw
    xy = torch.rand(k, 2, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64) - 4
    wh = torch.rand(k, 2, dtype=torch.float64) * (max_size - min_size) + min_size
    idx = torch.randint(0, batch, (k, 1)).to(torch.float64)
    return torch.cat([idx, xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def as_box_list(rois, batch):
    return [rois[rois[:, 0] == i, 1:] for i in range(batch)]
