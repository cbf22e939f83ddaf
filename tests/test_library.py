"""The package, the compiled library and its op registry."""

import subprocess

import pytest
import torch

import fasterrcnn_ext
from fasterrcnn_ext import _library


def test_build_info_tells_the_truth():
    info = fasterrcnn_ext.build_info()
    assert info["loaded"] is True
    assert info["version"] == fasterrcnn_ext.__version__
    assert torch.__version__.startswith(info["torch_version"])
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fasterrcnn_ext::nms", "CUDA")
    assert info["cuda"] == has_cuda_kernel
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
    assert info["parallel_backend"] in ("OpenMP", "native thread pool")
    assert info["parallel_backend"].split()[0].lower() in torch.__config__.parallel_info().lower()
    from fasterrcnn_ext import _build_config
    assert info["cpu_max_isa"] == _build_config.CPU_MAX_ISA  # the binary and setup.py's record agree
    assert info["cpu_avx512_twin"] == _build_config.CPU_AVX512_TWIN


def test_ops_are_registered_under_torch_ops():
    for name in ["nms", "batched_nms"]:
        assert hasattr(torch.ops.fasterrcnn_ext, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fasterrcnn_ext::{name}", "CPU")


def test_mismatched_torch_is_not_loaded_and_says_how_to_rebuild(monkeypatch):
    from fasterrcnn_ext import _build_config

    monkeypatch.setattr(_build_config, "TORCH_VERSION", "1.0.0")
    reason = _library._load()
    assert "built against torch 1.0.0" in reason and torch.__version__ in reason

    monkeypatch.setattr(_library, "LOADED", False)
    monkeypatch.setattr(_library, "LOAD_ERROR", reason)
    with pytest.raises(fasterrcnn_ext.ExtensionNotBuiltError, match="pip install --no-build-isolation"):
        fasterrcnn_ext.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
    assert fasterrcnn_ext.build_info()["error"] == reason


def test_import_without_compiled_library_still_works(tmp_path):
    """A source tree that was never built imports fine and fails only when an op is called."""
    import shutil
    import subprocess
    import sys

    pkg = tmp_path / "fasterrcnn_ext"
    shutil.copytree(fasterrcnn_ext.__path__[0], pkg,
                    ignore=shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__"))
    # An editable install's import hook would find the built files of the real tree: leave it out.
    code = ("import sys\nsys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import torch, fasterrcnn_ext\n"
            "assert not fasterrcnn_ext.build_info()['loaded']\n"
            "try:\n    fasterrcnn_ext.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)\n"
            "except fasterrcnn_ext.ExtensionNotBuiltError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "not built" in out.stdout and "pip install --no-build-isolation -e ." in out.stdout


def test_op_library_needs_no_python():
    """Every Python symbol the library references is weak (resolved in a Python process, null elsewhere), and it
    depends on no Python library, so dlopen(RTLD_NOW) succeeds in a program without Python."""
    path = fasterrcnn_ext.library_path()
    symbols = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    python = [line.split() for line in symbols if " Py" in line or " _Py" in line]
    assert python and all(kind == "w" for kind, _ in python), python
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "libpython" not in needed and "libtorch_python" not in needed


def test_version_is_pyproject_s(monkeypatch, tmp_path):
    """One home, pyproject.toml: the installed metadata carries it, and a source tree that is not installed reads it
    from the file itself."""
    import importlib.metadata
    import os

    from fasterrcnn_ext import _version

    root = os.path.dirname(os.path.dirname(os.path.abspath(fasterrcnn_ext.__file__)))
    expected = _version.pyproject_version(os.path.join(root, "pyproject.toml"))
    assert expected and fasterrcnn_ext.__version__ == expected

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert _version.package_version() == expected
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "9.8.7rc1"\n')
    assert _version.pyproject_version(str(tmp_path / "pyproject.toml")) == "9.8.7rc1"
    assert _version.pyproject_version(str(tmp_path / "missing.toml")) is None
