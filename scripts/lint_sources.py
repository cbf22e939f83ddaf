"""Source rules that ruff cannot check, run by CI after `ruff check .` (exit status 1 and the offending lines
otherwise):

1. Every argument check in csrc/ formats its message with fasterrcnn_ext::message (std::string) through
   FRCNN_CHECK: a TORCH_CHECK that streams an integer into its message from nvcc-compiled code can crash the
   process instead of raising (csrc/ops/common/checks.h).
2. Every op in the fasterrcnn_ext registry appears in a torch.library.opcheck call of the test suite (runtime
   switches, which take and return no tensors, excepted): by name, or as a test twin of an op that a loop
   ``for name in ops_and_twins("op")`` opchecks (fasterrcnn_ext/ops/_registration.py's TEST_TWINS, every name of
   which must be a registered op). Needs the built library.

    .venv/bin/python scripts/lint_sources.py
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def unformatted_checks() -> list[str]:
    offenders = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in {".h", ".cpp", ".cu", ".cuh"}:
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("#define FRCNN_CHECK"):
                continue
            # A check's message may start on one of the next two lines.
            if re.search(r"\bTORCH_CHECK(_[A-Z_]+)?\(", line) and "message(" not in "".join(lines[i:i + 3]):
                offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()} (use FRCNN_CHECK)")
    return offenders


def ops_without_opcheck() -> list[str]:
    import torch

    import fasterrcnn_ext  # noqa: F401  (registers the ops)
    from fasterrcnn_ext.ops._registration import TEST_TWINS, ops_and_twins

    sources = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    checked = set(re.findall(r"torch\.ops\.fasterrcnn_ext\.(\w+)\.default", sources))
    for group in re.findall(r"for name in \(([^)]*)\)", sources):  # loops over op names
        checked |= set(re.findall(r'"(\w+)"', group))
    for public in re.findall(r'for name in ops_and_twins\("(\w+)"\)', sources):  # loops over an op and its twins
        checked |= set(ops_and_twins(public))
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fasterrcnn_ext::")}
    stale = [f"TEST_TWINS names fasterrcnn_ext::{name}, which is not registered"
             for public, twins in TEST_TWINS.items() for name in (public, *twins) if name not in registered]
    # Runtime utilities take and return no tensors: nothing to opcheck (test_memory.py, test_capabilities.py).
    registered = {name for name in registered if name != "_build_info" and not name.startswith("_cpu_")}
    if len(registered) < 17:
        return [f"only {len(registered)} ops registered: is the library built?"]
    return stale + [f"fasterrcnn_ext::{name} is in no opcheck call of tests/" for name in sorted(registered - checked)]


def main() -> int:
    problems = unformatted_checks() + ops_without_opcheck()
    for p in problems:
        print(p)
    print(f"lint_sources: {len(problems)} problem(s)" if problems else "lint_sources: clean")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
