"""Per-model defaults: what a call uses for the arguments it leaves unset, read from the model folder.

A pipeline folder may hold ``mmdit_flow.json`` beside ``model_index.json`` (diffusers ignores the file):

    {
      "defaults": {"steps": 28, "guidance": 4.0, "height": 64, "width": 64, "max_sequence_length": 32},
      "trained_sizes": [64, 64],         # smallest and largest image side (px) the model was trained at
      "vocabulary": ["a", "above", ...], # every word its text encoders were trained on
      "distilled_steps": [4]             # a few-step student: the step counts it was distilled for
    }

Every key is optional. What the file leaves out comes from diffusers' defaults: 28 steps, guidance 7 (SD3) /
3.5 (Flux), the transformer's native size (SD3: its config's ``sample_size`` x the VAE scale; Flux: 1024 px)
and the T5 tokenizer's own ``max_sequence_length``. Without ``trained_sizes`` no size warning is given,
without ``vocabulary`` no word warning, without ``distilled_steps`` no step-count warning.
``pipe.defaults`` holds the resolved values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = "mmdit_flow.json"
FAMILY_GUIDANCE = {"sd3": 7.0, "flux": 3.5}  # diffusers' defaults
DEFAULT_STEPS = 28
FLUX_NATIVE_LATENT = 128  # latent side of a Flux image at its native 1024 px
DEFAULT_KEYS = ("steps", "guidance", "height", "width", "max_sequence_length")
TOP_KEYS = ("defaults", "trained_sizes", "vocabulary", "distilled_steps")
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters and digits, with inner apostrophes ("don't")


@dataclass(frozen=True)
class ModelDefaults:
    """The values a call uses where it leaves an argument unset, and what the model was trained on."""

    steps: int
    guidance: float
    height: int  # pixels
    width: int  # pixels
    max_sequence_length: int | None  # None: the T5 tokenizer's own length
    trained_sizes: tuple[int, int] | None = None  # (smallest, largest) image side in training, pixels
    vocabulary: frozenset[str] | None = None  # lower-case words the text encoders know; None: any
    distilled_steps: tuple[int, ...] | None = None  # a few-step student's step counts; None: any
    recorded: bool = False  # read from mmdit_flow.json (save_pretrained writes it back)

    @classmethod
    def from_json(cls, data: dict | None, *, family: str, native_size: int, source: str) -> ModelDefaults:
        """Check ``data`` (the parsed file, or None) and fill what it leaves out."""
        data = {} if data is None else data
        _no_unknown(data, TOP_KEYS, source, "")
        given = data.get("defaults", {})
        if not isinstance(given, dict):
            raise ValueError(f"{source}: 'defaults' must be an object {{steps, guidance, ...}}")
        _no_unknown(given, DEFAULT_KEYS, source, "defaults.")
        length = given.get("max_sequence_length")
        return cls(
            steps=_integer(given.get("steps", DEFAULT_STEPS), "defaults.steps", source),
            guidance=_guidance(given.get("guidance", FAMILY_GUIDANCE[family]), source),
            height=_integer(given.get("height", native_size), "defaults.height", source),
            width=_integer(given.get("width", native_size), "defaults.width", source),
            max_sequence_length=None
            if length is None
            else _integer(length, "defaults.max_sequence_length", source),
            trained_sizes=_trained_sizes(data.get("trained_sizes"), source),
            vocabulary=_vocabulary(data.get("vocabulary"), source),
            distilled_steps=_distilled_steps(data.get("distilled_steps"), source),
            recorded=bool(data),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``mmdit_flow.json`` content that reads back to these defaults."""
        data: dict[str, Any] = {"defaults": {k: getattr(self, k) for k in DEFAULT_KEYS}}
        if self.max_sequence_length is None:
            del data["defaults"]["max_sequence_length"]
        if self.trained_sizes is not None:
            data["trained_sizes"] = list(self.trained_sizes)
        if self.vocabulary is not None:
            data["vocabulary"] = sorted(self.vocabulary)
        if self.distilled_steps is not None:
            data["distilled_steps"] = list(self.distilled_steps)
        return data

    def unknown_words(self, prompts: list[str]) -> list[str]:
        """The words of ``prompts`` outside the vocabulary, sorted (none when there is no vocabulary)."""
        if self.vocabulary is None:
            return []
        words = {w for p in prompts for w in WORD.findall(p.lower())}
        return sorted(words - self.vocabulary)

    def outside_trained_sizes(self, height: int, width: int) -> bool:
        if self.trained_sizes is None:
            return False
        low, high = self.trained_sizes
        return not (low <= height <= high and low <= width <= high)

    def describe(self) -> str:
        """One line for help texts: ``28 steps, guidance 4, 64x64 px, max_sequence_length 32``."""
        length = (
            "" if self.max_sequence_length is None else f", max_sequence_length {self.max_sequence_length}"
        )
        return f"{self.steps} steps, guidance {self.guidance:g}, {self.height}x{self.width} px{length}"


def read_defaults(folder: str | Path) -> ModelDefaults:
    """The defaults of a pipeline folder from its JSON files alone (no model is loaded: fit for --help)."""
    from mmdit_flow.pipelines.loading import read_index
    from mmdit_flow.pipelines.vae import vae_scale
    from mmdit_flow.weights.io import read_json

    folder = Path(folder)
    family, _ = read_index(folder)
    transformer = read_json(folder / "transformer" / "config.json")
    scale = vae_scale(read_json(folder / "vae" / "config.json"))
    path = folder / FILE
    data = read_json(path) if path.is_file() else None
    native = native_size(family, transformer, scale)
    return ModelDefaults.from_json(data, family=family, native_size=native, source=str(path))


def native_size(family: str, transformer_config: dict, vae_scale: int) -> int:
    """The image side (px) a transformer is made for: SD3 ``sample_size`` x VAE scale, Flux 1024 px."""
    latent = FLUX_NATIVE_LATENT if family == "flux" else int(transformer_config.get("sample_size", 128))
    return latent * vae_scale


def _no_unknown(data: dict, known: tuple[str, ...], source: str, prefix: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(prefix + k for k in known)}"
        )


def _integer(value: Any, key: str, source: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{source}: {key} must be an integer >= {low}, got {value!r}")
    return value


def _guidance(value: Any, source: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{source}: defaults.guidance must be a finite number >= 0, got {value!r}")
    return float(value)


def _trained_sizes(value: Any, source: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{source}: trained_sizes must be [smallest, largest] image side in pixels")
    low, high = (_integer(v, "trained_sizes", source) for v in value)
    if low > high:
        raise ValueError(f"{source}: trained_sizes is [smallest, largest]; got {value}")
    return low, high


def _distilled_steps(value: Any, source: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: 'distilled_steps' must be a non-empty list of step counts, e.g. [4]")
    return tuple(_integer(v, f"distilled_steps[{i}]", source) for i, v in enumerate(value))


def _vocabulary(value: Any, source: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(w, str) and WORD.fullmatch(w) for w in value):
        raise ValueError(f"{source}: vocabulary must be a list of words (letters and digits)")
    return frozenset(w.lower() for w in value)
