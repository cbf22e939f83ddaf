"""Helpers to register Python-side pieces (fake kernels, autograd) only when the compiled ops exist."""

from __future__ import annotations

import torch

from .._library import LOADED

# The public ops that have test twins: private ops of the same schema and results, registered so that the CPU tests
# run an implementation the dispatcher does not pick on the CPU (the device-generic forms, which CUDA runs:
# csrc/ops/composite/postprocess.cpp). A twin gets its public op's fake kernel (register_fake below), and a test that
# opchecks ``ops_and_twins(name)`` covers them all (scripts/lint_sources.py reads this table).
TEST_TWINS: dict[str, tuple[str, ...]] = {
    "rpn_proposals": ("_rpn_proposals_generic",),
    "rpn_proposals_padded": ("_rpn_proposals_padded_generic",),
    "detection_postprocess": ("_detection_postprocess_generic",),
    "detection_postprocess_padded": ("_detection_postprocess_padded_generic",),
}


def ops_and_twins(name: str) -> tuple[str, ...]:
    """The op ``name`` (without namespace) and its test twins."""
    return (name, *TEST_TWINS.get(name, ()))


def register_fake(qualname: str):
    """torch.library.register_fake for the op and its test twins (TEST_TWINS), or a no-op when the compiled library
    is not loaded (no op to attach to)."""
    if not LOADED:
        return lambda fn: fn
    namespace, name = qualname.split("::")

    def register(fn):
        for op in ops_and_twins(name):
            torch.library.register_fake(f"{namespace}::{op}")(fn)
        return fn

    return register


def register_autograd(qualname: str, backward, setup_context) -> None:
    """torch.library.register_autograd, skipped when the compiled library is not loaded."""
    if LOADED:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
