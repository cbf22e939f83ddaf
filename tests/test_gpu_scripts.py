"""The GPU machine's scripts stay runnable where no GPU is: scripts/gpu_check.sh parses and keeps to its time budget,
scripts/cuda_sync_audit.py's cases and scripts/cuda_smoke.py's steps run (on the CPU, without the audit)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_parses_and_skips_steps_past_its_budget(tmp_path):
    subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT, check=True)
    env = dict(os.environ, STEPS="smoke audit", BUDGET_S="0", PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^smoke +SKIPPED", summary, re.M) and re.search(r"^audit +SKIPPED", summary, re.M), summary
    assert (tmp_path / "env.txt").exists()


def test_sync_audit_cases_run_on_the_cpu():
    done = subprocess.run([sys.executable, "scripts/cuda_sync_audit.py", "--cpu-dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": ran") >= 12


@pytest.mark.parametrize("quick", [[], ["--quick"]], ids=["full", "quick"])
def test_smoke_steps_run_and_agree_on_the_cpu(quick):
    done = subprocess.run([sys.executable, "scripts/cuda_smoke.py", "--device", "cpu", *quick], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all steps agree with torchvision" in done.stdout and "FAIL" not in done.stdout
    assert "roi_align fixed point vs its CPU twin" in done.stdout
    assert "fasterrcnn_tiny detect_padded" in done.stdout  # the CUDA graph capture's step, on the CPU
    assert ("70000 channels" in done.stdout) == (not quick)
