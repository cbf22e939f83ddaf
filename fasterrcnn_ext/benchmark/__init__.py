"""Benchmarks of fasterrcnn_ext against torchvision in the same process (`fasterrcnn-ext bench`, or
`python -m fasterrcnn_ext.benchmark.run`). The cases and their speed targets are in cases.py."""


def main(argv=None):
    from .run import main as run_main  # imported here so `python -m fasterrcnn_ext.benchmark.run` loads run once

    return run_main(argv)


__all__ = ["main"]
