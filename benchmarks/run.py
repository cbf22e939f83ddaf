"""The benchmark table, ours against torchvision in one process: `python benchmarks/run.py [--device cuda] [--quick]`,
the same as `fasterrcnn-ext bench`. The cases and targets live in fasterrcnn_ext/benchmark/cases.py."""

from fasterrcnn_ext.benchmark import main

if __name__ == "__main__":
    main()
