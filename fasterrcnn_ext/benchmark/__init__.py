"""Benchmarks of fasterrcnn_ext against torchvision in the same process (`fasterrcnn-ext bench`). The cases and
their speed targets are in cases.py."""

from .run import main, run

__all__ = ["main", "run"]
