"""What code built on the ops (the detector in fasterrcnn_ext.models, user models) needs besides the ops themselves:
the error type of bad arguments, the output-size rule, the tracing and export state that picks a path, and the ONNX
forms for the dynamo exporter. The modules that define them (``_utils``, ``_onnx``, ``_onnxscript``) are private and
may change; these names stay.

- ArgumentError: a bad argument where torchvision asserts (a ValueError and an AssertionError).
- pair: an int or (h, w) pair as (h, w), torchvision's output_size rule.
- exporting(): under torch.jit.trace or torch.onnx.export (either exporter): take the paths of standard operations.
- tracing_by_value(): under torch.jit.trace or the TorchScript-based ONNX exporter, which freeze data-dependent sizes.
- onnx_translations(): the ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.
"""

from ._onnx import exporting, tracing_by_value
from ._onnxscript import onnx_translations
from ._utils import ArgumentError, pair

__all__ = ["ArgumentError", "pair", "exporting", "tracing_by_value", "onnx_translations"]
