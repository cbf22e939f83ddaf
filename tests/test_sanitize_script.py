"""scripts/sanitize.sh reaches its test run in every mode (its build and run take minutes: DRY_RUN=1 stops before
them), and refuses bad settings with a message."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sanitize(**env):
    return subprocess.run(["bash", "scripts/sanitize.sh", "tests/ops", "-k", "nms"], cwd=ROOT,
                          env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("isa, twin, label", [("default", "0", "default build"), ("avx2", "0", "avx2 build"),
                                              ("default", "1", "default build, AVX-512 CPU twins"),
                                              ("avx2", "1", "avx2 build, AVX-512 CPU twins")])
def test_every_mode_reaches_the_test_run(isa, twin, label):
    done = sanitize(ISA=isa, TWIN=twin)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"build/sanitize-{isa}/src" in done.stdout
    assert ("FRCNN_CPU_MAX_ISA=avx2" in done.stdout) == (isa == "avx2")
    assert f"== pytest tests/ops -k nms under ASan + UBSan (CPU only; {label})" in done.stdout
    assert "dry run: nothing built or run" in done.stdout


@pytest.mark.parametrize("setting, message", [({"ISA": "avx512"}, "ISA must be 'default' or 'avx2', got 'avx512'"),
                                              ({"TWIN": "yes"}, "TWIN must be 0 or 1, got 'yes'"),
                                              ({"DRY_RUN": "2"}, "DRY_RUN must be 0 or 1, got '2'")])
def test_bad_settings_are_refused(setting, message):
    done = sanitize(**setting)
    assert done.returncode == 2
    assert message in done.stderr
