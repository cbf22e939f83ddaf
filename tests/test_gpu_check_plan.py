"""scripts/gpu_check.sh's plan, dry-run here on the CPU (`--plan`): the caps of its default steps sum to at most 80%
of its budget and agree with the table in its header, and its tests step selects the tests that need a GPU and only
those: every selected test skips here for want of one (none is a CPU-only test, which would spend the GPU machine's
time), and every test under the step's paths that skips here for that reason is selected."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# A pytest plugin for the plan's own collection: per collected test, whether it was selected, whether it carries the
# `cuda` marker and the reasons of the skipif marks whose condition holds here.
PROBE = '''
import json, os

ROWS = []


def _row(item, selected):
    reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")
               if m.args and not isinstance(m.args[0], str) and m.args[0]]
    return {"id": item.nodeid, "selected": selected, "cuda": item.get_closest_marker("cuda") is not None,
            "skips": reasons}


def pytest_deselected(items):
    ROWS.extend(_row(item, False) for item in items)


def pytest_collection_finish(session):
    ROWS.extend(_row(item, True) for item in session.items)
    with open(os.environ["GPU_PLAN_PROBE_OUT"], "w") as f:
        json.dump(ROWS, f)
'''


def needs_a_gpu(reasons):
    return any(re.search(r"\b(CUDA|GPU)\b", r) for r in reasons)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    (tmp / "gpu_plan_probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHON=sys.executable, PYTEST_ADDOPTS="-p gpu_plan_probe",
               PYTHONPATH=os.pathsep.join(p for p in [str(tmp), str(ROOT), os.environ.get("PYTHONPATH")] if p),
               GPU_PLAN_PROBE_OUT=str(tmp / "collected.json"))
    env.pop("STEPS", None)
    env.pop("BUDGET_S", None)
    done = subprocess.run(["bash", str(SCRIPT), "--plan"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    return {
        "budget": int(next(line.split()[1] for line in lines if line.startswith("budget "))),
        "caps": {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("cap ")},
        "total": int(next(line.split()[1] for line in lines if line.startswith("caps "))),
        "tests": [line.split(" ", 1)[1] for line in lines if line.startswith("test ")],
        "collected": json.loads((tmp / "collected.json").read_text()),
    }


def test_caps_sum_within_80_percent_of_the_budget_as_the_header_says(plan):
    caps = plan["caps"]
    assert list(caps) == ["build", "smoke", "tests", "racecheck", "synccheck", "initcheck", "memcheck", "audit",
                          "bench"]
    assert sum(caps.values()) == plan["total"] <= 0.8 * plan["budget"]
    header = SCRIPT.read_text().split("\nset -uo pipefail", 1)[0]
    stated = dict(re.findall(r"^#   (\w+) +(\d+)  ", header, re.M))
    assert {name: int(stated[name]) for name in caps} == caps
    assert int(stated["sum"]) == plan["total"]
    assert re.search(rf"^#   sum +{plan['total']}  of the {plan['budget']} s budget", header, re.M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run here: none skips for want of a GPU")
def test_selected_tests_are_the_tests_that_need_a_gpu(plan):
    collected = plan["collected"]
    selected = [row for row in collected if row["selected"]]
    assert sorted(row["id"] for row in selected) == sorted(plan["tests"])
    assert len(selected) > 100
    cpu_only = [row["id"] for row in selected if not needs_a_gpu(row["skips"])]
    assert cpu_only == [], "selected for the GPU but run here too: mark them otherwise"
    left_out = [row["id"] for row in collected if not row["selected"] and needs_a_gpu(row["skips"])]
    assert left_out == [], "skip without a GPU but are not marked `cuda`: the GPU check would not run them"
    assert all(row["cuda"] for row in selected)
