import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA GPU visible")

# Tests that take `device` run on the CPU and, when a GPU is visible, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=_NO_CUDA)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
