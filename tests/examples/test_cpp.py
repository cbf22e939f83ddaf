"""examples/cpp: a C++ program with no Python loads the op library (fasterrcnn_ext.library_path()), then the
scripted detector or its AOTInductor package, and prints the detections of one image: they equal the Python model's
(same weights, same image).

The program is built once per test session into build/cpp_example (CMake against the installed torch's LibTorch,
incremental: a rerun with nothing changed only links nothing); about a minute on 2 cores the first time."""

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import fasterrcnn_ext
from fasterrcnn_ext.engine.export import compile_aoti, export_detector, export_program

from ..models.test_export import assert_close_detections, assert_equal_detections, eager_detections, spread_tiny

ROOT = Path(__file__).parents[2]
BUILD = ROOT / "build" / "cpp_example"
SIZE = (192, 256)


@pytest.fixture(scope="session")
def detect_binary():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    torch_root = os.path.dirname(torch.__file__)
    if not (BUILD / "CMakeCache.txt").exists() or torch_root not in (BUILD / "CMakeCache.txt").read_text():
        subprocess.run([cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                        f"-DTORCH_ROOT={torch_root}",
                        f"-DTORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"],
                       check=True, capture_output=True, text=True)
    out = subprocess.run([cmake, "--build", str(BUILD), "-j", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return BUILD / "detect"


def run_detect(binary, fmt, model_path, image, tmp_path):
    image_path = tmp_path / "image.raw"
    image.contiguous().numpy().tofile(image_path)
    # No Python in the child: a bare environment, and the binary itself links no libpython.
    out = subprocess.run([str(binary), fasterrcnn_ext.library_path(), fmt, str(model_path), str(image_path),
                          str(image.shape[1]), str(image.shape[2])], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout)
    return [{"boxes": torch.tensor(result["boxes"], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(result["labels"], dtype=torch.int64),
             "scores": torch.tensor(result["scores"], dtype=torch.float32)}]


def one_thread_detections(model, image):
    """The Python model's detections at one thread, as the C++ program runs (OMP_NUM_THREADS=1): convolutions may
    round differently at other thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return eager_detections(model, [image])
    finally:
        torch.set_num_threads(threads)


def test_cpp_program_runs_the_scripted_detector(detect_binary, tmp_path):
    linked = subprocess.run(["ldd", str(detect_binary)], capture_output=True, text=True).stdout
    assert "libpython" not in linked and "libtorch_python" not in linked
    model = spread_tiny()
    path = export_detector(model, "torchscript", str(tmp_path / "detector.pt"), SIZE, log=lambda *_: None)
    g = torch.Generator().manual_seed(0)
    for size in (SIZE, (96, 160)):  # sizes that scale exactly (see tests/models/test_fixed_shape.py)
        image = torch.rand(3, *size, generator=g)
        expected = one_thread_detections(model, image)
        assert len(expected[0]["boxes"]) > 0
        assert_equal_detections(run_detect(detect_binary, "torchscript", path, image, tmp_path), expected)


@pytest.mark.slow
def test_cpp_program_runs_the_aoti_package(detect_binary, tmp_path):
    model = spread_tiny()
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compile_aoti(export_program(model, image, dynamic=False), str(tmp_path / "detector.pt2"))
    for seed in (1, 2):
        image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(seed))
        expected = one_thread_detections(model, image)
        assert len(expected[0]["boxes"]) > 0
        got = run_detect(detect_binary, "aoti", tmp_path / "detector.pt2", image, tmp_path)
        assert_close_detections(got, expected)  # AOTInductor's fused kernels round differently
