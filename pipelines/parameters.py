"""An image's generation parameters, stored in its PNG file so that the image can be made again from itself.

    params = GenerationParameters(prompt="a red circle", negative=None, steps=28, guidance=4.0, seed=0, ...)
    image.save("x.png", pnginfo=params.png_info())
    GenerationParameters.from_png("x.png") == params

The PNG holds one international text chunk (iTXt, UTF-8, so any prompt fits) with the keyword ``mmdit-flow``
and a JSON object: prompt, negative, steps, guidance, seed, sampler, model, height, width,
max_sequence_length, and where they apply num_images / index (image ``index`` of a ``--num-images`` call, all
drawn from one seed), image / mask / strength (an edit; the paths of its input files), step_cache (the
first-block cache threshold the image was made with) and lora (each ``--lora`` file and its scale, as
``[[file, scale], ...]``). ``guidance`` is null for a Flux model without a guidance embedding; ``model`` is
the folder's absolute path, or ``DEMO_MODEL`` for the shipped demo model. ``mmdit-flow generate --from-png
x.png`` reads it back. Light: PIL loads on use.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from PIL.PngImagePlugin import PngInfo

CHUNK = "mmdit-flow"  # the PNG text chunk's keyword
DEMO_MODEL = "tiny-shapes (the shipped demo model)"  # `model` for the demo model (no --model)


class NoParametersError(ValueError):
    """An image without the ``mmdit-flow`` chunk: not written by ``mmdit-flow generate`` as a PNG."""


@dataclass(frozen=True)
class GenerationParameters:
    """Everything a call needs to make one image again (the resolved values, not the model's defaults)."""

    prompt: str
    negative: str | None
    steps: int
    guidance: float | None
    seed: int
    sampler: str
    model: str
    height: int
    width: int
    max_sequence_length: int | None  # None: the T5 tokenizer's own length
    num_images: int = 1
    index: int = 0
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    step_cache: float | None = None  # the first-block cache threshold (lossy; mmdit_flow/step_cache.py)
    lora: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale) of each --lora, in load order

    @staticmethod
    def model_name(model: str | None) -> str:
        """What ``model`` records for ``--model`` (None: the demo model)."""
        return DEMO_MODEL if model is None else str(Path(model).resolve())

    @property
    def model_path(self) -> str | None:
        """The ``--model`` to pass again (None: the demo model)."""
        return None if self.model == DEMO_MODEL else self.model

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields; the optional ones only where they differ from a plain text-to-image call."""
        data = dataclasses.asdict(self)
        for field in dataclasses.fields(self):
            if field.default is not dataclasses.MISSING and data[field.name] == field.default:
                del data[field.name]
        return data

    def call_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``TextToImagePipeline.__call__`` that make this image, but for the prompt,
        the seed and an edit's input images."""
        kwargs: dict[str, Any] = {
            "negative_prompt": self.negative,
            "steps": self.steps,
            "height": self.height,
            "width": self.width,
            "sampler": self.sampler,
            "max_sequence_length": self.max_sequence_length,
        }
        if self.guidance is not None:
            kwargs["guidance"] = self.guidance
        if self.strength is not None:
            kwargs["strength"] = self.strength
        return kwargs

    def png_info(self) -> PngInfo:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt(CHUNK, json.dumps(self.to_dict(), ensure_ascii=False))
        return info

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> GenerationParameters:
        """ValueError naming ``source`` for missing, unknown or mistyped fields."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        missing = sorted(n for n, f in names.items() if f.default is dataclasses.MISSING and n not in data)
        if unknown or missing:
            raise ValueError(
                f"{source}: the {CHUNK!r} parameters have unknown fields {unknown} / lack fields {missing}"
            )
        ints = ("steps", "seed", "height", "width", "max_sequence_length", "num_images", "index")
        for name in ints:
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{source}: parameter {name} must be an integer, got {value!r}")
        if not isinstance(data["prompt"], str):
            raise ValueError(f"{source}: parameter prompt must be a string, got {data['prompt']!r}")
        if "lora" in data:
            data = {**data, "lora": _loras(data["lora"], source)}
        return cls(**data)

    @classmethod
    def from_png(cls, path: str | Path) -> GenerationParameters:
        """The parameters a PNG written by mmdit-flow carries; ValueError naming the file otherwise."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                text = getattr(img, "text", {}).get(CHUNK)
        except FileNotFoundError as err:
            raise ValueError(f"{path}: no such file") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{path}: cannot read the image ({err})") from err
        if text is None:
            raise NoParametersError(
                f"{path} carries no {CHUNK!r} text chunk: it was not written by mmdit-flow generate as a PNG"
            )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: the {CHUNK!r} text chunk is not JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the {CHUNK!r} text chunk is not a JSON object")
        return cls.from_dict(data, str(path))


def _loras(value: Any, source: str) -> tuple[tuple[str, float], ...]:
    """The recorded ``lora`` ([[file, scale], ...]) as the field's tuple; ValueError naming ``source``."""
    pairs = value if isinstance(value, list) else [None]
    ok = all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) in (int, float)
        for p in pairs
    )
    if not ok:
        raise ValueError(f"{source}: parameter lora must be a list of [file, scale] pairs, got {value!r}")
    return tuple((path, float(scale)) for path, scale in pairs)


def resolved_settings(
    pipe: Any,
    *,
    steps: int | None,
    guidance: float | None,
    height: int | None,
    width: int | None,
    max_sequence_length: int | None,
) -> dict[str, Any]:
    """The values a call of ``pipe`` uses for these arguments: those given, else the model's defaults
    (``pipe.defaults``); guidance None for a Flux model without a guidance embedding (it takes none)."""
    d = pipe.defaults
    takes_guidance = pipe.family == "sd3" or pipe.guidance_embeds
    return {
        "steps": d.steps if steps is None else steps,
        "guidance": (d.guidance if guidance is None else float(guidance)) if takes_guidance else guidance,
        "height": d.height if height is None else height,
        "width": d.width if width is None else width,
        "max_sequence_length": d.max_sequence_length if max_sequence_length is None else max_sequence_length,
    }
