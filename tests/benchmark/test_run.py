import re

import torch

from fasterrcnn_ext import ops
from fasterrcnn_ext.benchmark.run import profile_summary
from fasterrcnn_ext.cli import build_parser


def test_profile_summary_counts_the_ops_of_one_call():
    boxes = torch.rand(300, 4) * 100
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(300)
    line = profile_summary(lambda: ops.nms(boxes, scores, 0.5), "cpu", runs=4)
    m = re.match(r"(\d+) ops/call, ([0-9.]+) ms self CPU; largest: (.*)", line)
    assert m, line
    assert int(m.group(1)) >= 1
    assert "fasterrcnn_ext::nms" in m.group(3)
    # Twice the work per call: twice the ops per call.
    twice = profile_summary(lambda: (ops.nms(boxes, scores, 0.5), ops.nms(boxes, scores, 0.5)), "cpu", runs=4)
    assert int(twice.split()[0]) == 2 * int(m.group(1))


def test_bench_command_takes_profile():
    args = build_parser().parse_args(["bench", "--quick", "--only", "nms", "--profile"])
    assert args.profile and args.quick and args.only == ["nms"]
    assert not build_parser().parse_args(["bench"]).profile


def test_run_writes_json_and_the_markdown_table(tmp_path, monkeypatch):
    import io
    import json

    from fasterrcnn_ext.benchmark import run as bench
    from fasterrcnn_ext.benchmark.cases import Case

    boxes = torch.rand(200, 4) * 100
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(200)
    # Both sides run the same op, so the ratio is about 1: a target of 1e-6 is met, one of 1e6 is not.
    fast = Case("nms 200 boxes", lambda: ops.nms(boxes, scores, 0.5), lambda: ops.nms(boxes, scores, 0.5), 1e-6)
    slow = Case("an unreachable target", lambda: ops.nms(boxes, scores, 0.5), lambda: ops.nms(boxes, scores, 0.5), 1e6)
    monkeypatch.setitem(bench.ALL_CASES, "toy", lambda device: [fast, slow])
    args = build_parser().parse_args(["bench", "--quick", "--only", "toy", "--json", str(tmp_path / "b.json"),
                                      "--markdown", str(tmp_path / "b.md")])
    monkeypatch.setattr("sys.stdout", io.StringIO())
    result = bench.run_from_args(args)
    assert json.loads((tmp_path / "b.json").read_text())["results"] == json.loads(json.dumps(result["results"]))
    table = (tmp_path / "b.md").read_text().splitlines()
    assert table[0].startswith(result["device_name"]) and f"commit {result['commit']}" in table[0]
    assert table[2] == "| case | ours ms | torchvision ms | speed-up | target |"
    assert table[4].startswith("| nms 200 boxes | ") and table[4].endswith("x | 0.0x |")
    assert table[5].startswith("| an unreachable target | ") and table[5].endswith("x (below) |")
    assert len(table) == 6
