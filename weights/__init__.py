"""Checkpoint I/O and key maps between formats (ours, diffusers, original SD3 / SD3.5 / Flux files).

``load_transformer`` / ``save_transformer`` are the public entry points; ``mmdit_flow.weights.io`` holds the
family-agnostic readers and writers, ``formats.KeyFormat`` the contract each family (``sd3_keys``,
``flux_keys``) fulfils.

Light on import (no torch): the public names load on first use, so that ``mmdit_flow.weights.cli`` and with it
``mmdit-flow --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mmdit_flow.weights.io import CheckpointError
    from mmdit_flow.weights.transformer import load_transformer, save_transformer

# public name -> module that defines it, imported on first attribute access
_LAZY = {
    "CheckpointError": "mmdit_flow.weights.io",
    "load_transformer": "mmdit_flow.weights.transformer",
    "save_transformer": "mmdit_flow.weights.transformer",
}

__all__ = ["CheckpointError", "load_transformer", "save_transformer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmdit_flow.weights' has no attribute {name!r}")
