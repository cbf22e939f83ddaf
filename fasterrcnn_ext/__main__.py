"""``python -m fasterrcnn_ext``: the fasterrcnn-ext command (see cli.py); torchrun runs it as ``-m fasterrcnn_ext``."""

import sys

from .cli import main

sys.exit(main())
