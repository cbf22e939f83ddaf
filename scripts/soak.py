"""Soak test of resident memory: 1,000 detector inference calls (CPU memory pool on, then off) and 200 training
steps (pool off, then on); exit status 1 if a phase's memory keeps growing. See fasterrcnn_ext/benchmark/soak.py.

    .venv/bin/python scripts/soak.py [--calls N] [--train-steps N] [--model NAME] [--json FILE]
"""

import sys

from fasterrcnn_ext.benchmark.soak import main

if __name__ == "__main__":
    sys.exit(main())
