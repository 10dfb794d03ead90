"""mmdit-flow: latent text-to-image generation with rectified flow matching.

Conventions (stated once, tested): t = 1 is noise, t = 0 is data; x_t = (1 - t) * x0 + t * noise;
the velocity is v = noise - x0. Models take t in [0, 1].

``import mmdit_flow`` stays light: submodules and the heavier public names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it, imported on first attribute access
_LAZY = {
    "load_transformer": "mmdit_flow.weights",
    "save_transformer": "mmdit_flow.weights",
    "SD3Config": "mmdit_flow.models.sd3",
    "SD3Transformer": "mmdit_flow.models.sd3",
    "FluxConfig": "mmdit_flow.models.flux",
    "FluxTransformer": "mmdit_flow.models.flux",
    "TextToImagePipeline": "mmdit_flow.pipelines",
}
_SUBMODULES = {
    "flow",
    "sampling",
    "likelihood",
    "reflow",
    "so3",
    "attention",
    "models",
    "pipelines",
    "training",
    "weights",
}

if TYPE_CHECKING:  # pragma: no cover
    from mmdit_flow.models.flux import FluxConfig, FluxTransformer
    from mmdit_flow.models.sd3 import SD3Config, SD3Transformer
    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.weights import load_transformer, save_transformer

__all__ = [
    "FluxConfig",
    "FluxTransformer",
    "SD3Config",
    "SD3Transformer",
    "TextToImagePipeline",
    "__version__",
    "attention",
    "flow",
    "likelihood",
    "load_transformer",
    "models",
    "pipelines",
    "reflow",
    "sampling",
    "save_transformer",
    "so3",
    "training",
    "weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mmdit_flow.{name}")
    raise AttributeError(f"module 'mmdit_flow' has no attribute {name!r}")
