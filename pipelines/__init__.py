"""Text-to-image pipelines (SD3 / SD3.5 and Flux) and the ``mmdit-flow`` command line.

Light on import: transformers and diffusers load when a pipeline is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mmdit_flow.pipelines.pipeline import TextToImagePipeline

__all__ = ["TextToImagePipeline"]


def __getattr__(name: str) -> Any:
    if name == "TextToImagePipeline":
        from mmdit_flow.pipelines.pipeline import TextToImagePipeline

        return TextToImagePipeline
    raise AttributeError(f"module 'mmdit_flow.pipelines' has no attribute {name!r}")
