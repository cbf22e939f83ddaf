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


def test_run_passes_precisions_to_the_detector_group_and_records_skipped_rows(tmp_path, monkeypatch):
    import io
    import json

    from fasterrcnn_ext.benchmark import run as bench
    from fasterrcnn_ext.benchmark.cases import Case, Skipped

    boxes = torch.rand(100, 4) * 100
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(100)
    asked = []

    def detector(device, precisions=("fp32",)):
        asked.append(precisions)
        return [Skipped("detector bf16 vs a peer", "the peer is not installed", 1.3),
                Case("detector int8 row", lambda: ops.nms(boxes, scores, 0.5), lambda: ops.nms(boxes, scores, 0.5),
                     1e-6)]

    monkeypatch.setitem(bench.ALL_CASES, "detector", detector)
    monkeypatch.setitem(bench.ALL_CASES, "toy", lambda device: [])  # a group without precisions: called as before
    args = build_parser().parse_args(["bench", "--quick", "--only", "toy", "detector", "--precision", "bf16", "int8",
                                      "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    printed = io.StringIO()
    monkeypatch.setattr("sys.stdout", printed)
    result = bench.run_from_args(args)
    assert asked == [("bf16", "int8")] and result["precisions"] == ["bf16", "int8"]
    skipped, timed = json.loads((tmp_path / "b.json").read_text())["results"]
    assert skipped == {"group": "detector", "case": "detector bf16 vs a peer", "skipped": "the peer is not installed",
                       "target": 1.3}
    assert timed["case"] == "detector int8 row" and timed["ours_ms"] > 0
    line = next(line for line in printed.getvalue().splitlines() if line.startswith("detector bf16 vs a peer"))
    assert line.endswith("skipped: the peer is not installed")
    table = (tmp_path / "b.md").read_text().splitlines()
    assert table[4] == "| detector bf16 vs a peer | - | - | skipped: the peer is not installed | 1.3x |"
    assert table[5].startswith("| detector int8 row | ")
    assert build_parser().parse_args(["bench"]).precision == ["fp32"]
