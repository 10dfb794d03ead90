"""Checkpoint I/O and key maps between formats (ours, diffusers, original SD3 / SD3.5 / Flux files).

``load_transformer`` / ``save_transformer`` are the public entry points; ``mmdit_flow.weights.io`` holds the
family-agnostic readers and writers, ``formats.KeyFormat`` the contract each family (``sd3_keys``,
``flux_keys``) fulfils.
"""

from mmdit_flow.weights.io import CheckpointError
from mmdit_flow.weights.transformer import load_transformer, save_transformer

__all__ = ["CheckpointError", "load_transformer", "save_transformer"]
