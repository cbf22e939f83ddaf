import os

import pytest
import torch

try:  # a test dependency (requirements-dev.txt); a machine without it (the GPU machine) skips those tests only
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None

if settings is not None:
    # Property-based tests (tests/ops/test_properties.py): in CI a fixed seed and a bounded number of examples (the
    # whole file in under 2 minutes on 2 cores); HYPOTHESIS_PROFILE=long for a local hunt.
    _SLOW_CASES = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=50, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_CASES, database=None)
    # A short run (scripts/gpu_check.sh runs the cases under compute-sanitizer, which is slow).
    settings.register_profile("short", max_examples=8, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_CASES, database=None)
    settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_CASES)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--patch-torchvision", action="store_true",
                     help="run with fasterrcnn_ext.patch_torchvision() in place for the whole session (our ops and "
                          "detector behind torchvision's names): every test must still pass")


def pytest_configure(config):
    if config.getoption("--patch-torchvision"):
        import fasterrcnn_ext

        fasterrcnn_ext.patch_torchvision()


def pytest_report_header(config):
    if config.getoption("--patch-torchvision"):
        return "torchvision patched: fasterrcnn_ext.patch_torchvision() for the whole session"


CUDA_AVAILABLE = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA GPU visible")

# Tests that take `device` run on the CPU and, when a GPU is visible, on CUDA. Every test that needs a GPU carries
# the `cuda` marker (scripts/gpu_check.sh selects them with -m cuda; tests/test_gpu_check_plan.py checks both ways).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NO_CUDA])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's main job, run once per session with its defaults (about 4 minutes on 2 cores): the folder with
    the trained fasterrcnn_tiny (model.pt) and its metrics. Tests whose results matter detect with this model on
    held-out images, since random weights detect nothing or everything."""
    from fasterrcnn_ext.engine import demo

    out = tmp_path_factory.mktemp("demo") / "run"
    demo(str(out), progress=False)
    return out
