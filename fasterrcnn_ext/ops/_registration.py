"""Helpers to register Python-side pieces (fake kernels, autograd) only when the compiled ops exist."""

from __future__ import annotations

import torch

from .._library import LOADED


def register_fake(qualname: str):
    """torch.library.register_fake, or a no-op when the compiled library is not loaded (no op to attach to)."""
    if LOADED:
        return torch.library.register_fake(qualname)
    return lambda fn: fn


def register_autograd(qualname: str, backward, setup_context) -> None:
    """torch.library.register_autograd, skipped when the compiled library is not loaded."""
    if LOADED:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)

