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
