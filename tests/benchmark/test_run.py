import re

import torch

from fasterrcnn_ext import ops
from fasterrcnn_ext.benchmark.run import interleaved_medians, profile_summary
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


def test_sides_are_timed_in_alternating_blocks_of_at_least_min_rounds():
    calls = []
    ours_s, theirs_s = interleaved_medians(lambda: calls.append("ours"), lambda: calls.append("theirs"),
                                           min_run_time=0.0, min_rounds=3)
    blocks = [side for i, side in enumerate(calls) if i == 0 or calls[i - 1] != side]
    # calibration (each side alone), then ours, theirs, ours, ... for 3 rounds at least
    assert blocks[:2] == ["ours", "theirs"] and blocks[2:] == ["ours", "theirs"] * (len(blocks[2:]) // 2)
    assert len(blocks[2:]) >= 6 and 0 < ours_s < 1e-3 and 0 < theirs_s < 1e-3


def test_a_slower_side_has_the_larger_median():
    import time

    ours_s, theirs_s = interleaved_medians(lambda: time.sleep(0.001), lambda: time.sleep(0.004), min_run_time=0.02)
    assert theirs_s > 2 * ours_s
