"""What each component folder of an SD3 / Flux pipeline folder may hold, and the checks every folder passes
before a library reads it.

Each slot (``text_encoder``, ``vae`` ...) accepts only the classes diffusers' ``StableDiffusion3Pipeline`` /
``FluxPipeline`` declare for it; anything else is refused by name, custom code (``auto_map``) included, so
nothing a folder ships ever runs. Every file is checked first: a dangling link, a Git LFS pointer, broken
JSON, a truncated safetensors header or a shard index pointing outside the folder is named. Config values the
pipeline computes with (scheduler shifts and sequence lengths, VAE scaling) must be finite and in range.
Libraries load the components, and report missing, unexpected and mis-shaped keys; those raise here, as the
transformer loader's do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdit_flow.weights.io import (
    CheckpointError,
    LoadResult,
    check_not_lfs_pointer,
    mismatch_error,
    read_json,
    read_safetensors_header,
    read_shard_index,
)

# model_index.json "_class_name" -> family
FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
PIPELINE_CLASS = {family: name for name, family in FAMILIES.items()}
DIFFUSERS_TRANSFORMER = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


@dataclass(frozen=True)
class Slot:
    """What one component folder may hold: the library and the class names model_index.json may give, and for
    a transformers model the ``model_type`` values its config.json may have."""

    library: str
    classes: tuple[str, ...]
    model_types: tuple[str, ...] = ()


CLIP_TYPES = ("clip_text_model", "clip")  # "clip": a full CLIP config, whose text_config transformers takes
CLIP_TOKENIZER = Slot("transformers", ("CLIPTokenizer", "CLIPTokenizerFast"))
T5_TOKENIZER = Slot("transformers", ("T5TokenizerFast", "T5Tokenizer"))
T5 = Slot("transformers", ("T5EncoderModel",), ("t5",))
_COMMON = {
    "scheduler": Slot("diffusers", ("FlowMatchEulerDiscreteScheduler",)),
    "vae": Slot("diffusers", ("AutoencoderKL",)),
    "tokenizer": CLIP_TOKENIZER,
}
# family -> component folder -> what it may hold (the classes diffusers' pipelines declare for it)
SLOTS = {
    "sd3": {
        **_COMMON,
        "transformer": Slot("diffusers", (DIFFUSERS_TRANSFORMER["sd3"],)),
        "text_encoder": Slot("transformers", ("CLIPTextModelWithProjection",), CLIP_TYPES),
        "text_encoder_2": Slot("transformers", ("CLIPTextModelWithProjection",), CLIP_TYPES),
        "tokenizer_2": CLIP_TOKENIZER,
        "text_encoder_3": T5,
        "tokenizer_3": T5_TOKENIZER,
    },
    "flux": {
        **_COMMON,
        "transformer": Slot("diffusers", (DIFFUSERS_TRANSFORMER["flux"],)),
        "text_encoder": Slot("transformers", ("CLIPTextModel",), CLIP_TYPES),
        "text_encoder_2": T5,
        "tokenizer_2": T5_TOKENIZER,
    },
}
# family -> the slots a folder may leave out (declared [null, null] in model_index.json); all or none of them
OPTIONAL = {"sd3": ("text_encoder_3", "tokenizer_3"), "flux": ()}
# text encoder -> its tokenizer
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
# scheduler options whose grids we do not implement: (name, value that is fine)
UNSUPPORTED_SCHEDULER = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
}


def check_slot(index_path: Path, family: str, name: str, declared: tuple[str, str]) -> None:
    """Refuse a class that the component ``name`` of a ``family`` pipeline cannot be."""
    slot = SLOTS[family][name]
    library, cls = declared
    if library != slot.library or cls not in slot.classes:
        accepted = " or ".join(f"{slot.library}.{c}" for c in slot.classes)
        raise ValueError(
            f"{index_path}: {name} is a {library}.{cls}, but the {name} of a {PIPELINE_CLASS[family]} "
            f"can only be {accepted}; this folder is not a {PIPELINE_CLASS[family]} (other classes, and "
            "custom code, are never loaded)"
        )


def check_files(component: Path) -> dict[str, dict]:
    """Check every file of a component folder before a library reads it: no dangling link, no Git LFS pointer,
    valid JSON that asks for no custom code, safetensors headers whole. Returns the JSON files by name."""
    configs = {}
    for path in sorted(component.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(component).parts):
            continue  # .cache/ of huggingface_hub downloads, editor files
        if path.is_symlink() and not path.exists():
            raise FileNotFoundError(
                f"{path} is a link to {os.readlink(path)}, which does not exist; download the file again"
            )
        if not path.is_file():
            continue
        check_not_lfs_pointer(path)
        if path.suffix == ".json":
            configs[path.name] = data = read_json(path)
            if "auto_map" in data:
                raise ValueError(
                    f"{path} sets auto_map, which asks to run Python code shipped with the model; this "
                    "library never runs a model's own code: use a folder of the standard classes"
                )
            if path.name.endswith(".index.json"):
                read_shard_index(path)
        elif path.name.endswith(".safetensors"):
            read_safetensors_header(path)
    return configs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config_values(path: Path, config: dict, numbers: dict[str, str], flags: tuple[str, ...]) -> None:
    """Each key of ``numbers`` that ``config`` sets must be a finite number of its kind: "real", "positive",
    "nonzero" or "count" (an integer >= 1); each of ``flags`` true or false."""
    kinds = {
        "real": ("a finite number", _is_number),
        "positive": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
        "nonzero": ("a finite number other than 0", lambda v: _is_number(v) and v != 0),
        "count": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    }
    for key, kind in numbers.items():
        what, ok = kinds[kind]
        if key in config and config[key] is not None and not ok(config[key]):
            raise ValueError(f"{path}: {key} must be {what}, got {config[key]!r}; fix or remove it")
    for key in flags:
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"{path}: {key} must be true or false, got {config[key]!r}")


SCHEDULER_NUMBERS = {
    "shift": "positive",
    "base_shift": "real",
    "max_shift": "real",
    "base_image_seq_len": "count",
    "max_image_seq_len": "count",
    "num_train_timesteps": "count",
}


def check_scheduler(config: dict, path: Path | str = "the scheduler config") -> None:
    """Options we do not implement, and every number the sampling grid is built from."""
    for key, fine in UNSUPPORTED_SCHEDULER.items():
        if config.get(key) not in (fine, None):
            raise ValueError(
                f"{path} sets {key}={config[key]!r}, which this pipeline does not implement; "
                f"remove it (supported: shift, use_dynamic_shifting, base/max_shift, base/max_image_seq_len)"
            )
    _check_config_values(Path(path), config, SCHEDULER_NUMBERS, ("use_dynamic_shifting",))
    base, top = config.get("base_image_seq_len"), config.get("max_image_seq_len")
    if base is not None and top is not None and top <= base:
        raise ValueError(
            f"{path}: max_image_seq_len ({top}) must be greater than base_image_seq_len ({base}): the shift "
            "is interpolated between them"
        )


def check_component_config(folder: Path, family: str, name: str, configs: dict[str, dict]) -> None:
    """The config a component folder holds must be of the class its slot accepts, with sane values."""
    slot, where = SLOTS[family][name], folder / name
    if name.startswith("tokenizer"):
        config_name = "tokenizer_config.json"
    else:
        config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
    config = configs.get(config_name)
    if config is None:
        if name.startswith("tokenizer"):
            return  # tokenizer_config.json is optional
        raise FileNotFoundError(f"{where} has no {config_name}; copy the complete component folder")
    path = where / config_name
    if slot.model_types:
        key, found, accepted = "model_type", config.get("model_type"), slot.model_types
    elif name.startswith("tokenizer"):
        key, found, accepted = "tokenizer_class", config.get("tokenizer_class", slot.classes[0]), slot.classes
    else:
        key, found, accepted = "_class_name", config.get("_class_name", slot.classes[0]), slot.classes
    if found not in accepted:
        raise ValueError(
            f"{path}: {key} is {found!r}, but the {name} of a {PIPELINE_CLASS[family]} must be "
            f"{' or '.join(map(repr, accepted))}; this component folder is of another model"
        )
    if name == "scheduler":
        check_scheduler(config, path)
    elif name == "vae":
        _check_config_values(
            path, config, {"scaling_factor": "nonzero", "shift_factor": "real"}, ("force_upcast",)
        )


def check_tokenizer(folder: Path, name: str, tokenizer: Any, encoder: torch.nn.Module) -> None:
    """A tokenizer must fit its encoder: ids below the vocabulary size, CLIP's length within its positions."""
    config = encoder.config
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"{folder / TOKENIZER_OF[name]} has {len(tokenizer)} tokens but {folder / name} embeds only "
            f"{config.vocab_size} (config.json vocab_size): tokenizer and encoder are of different models"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and not 1 <= tokenizer.model_max_length <= positions:
        raise ValueError(
            f"{folder / TOKENIZER_OF[name]}: model_max_length is {tokenizer.model_max_length} but "
            f"{folder / name} has {positions} positions (max_position_embeddings); set model_max_length to "
            f"{positions} in tokenizer_config.json"
        )


def check_loading_info(where: Path, model: Any, info: dict) -> None:
    """Raise, as ``load_into`` does, when a library loaded a component with missing or unexpected keys."""
    result = LoadResult(
        missing=sorted(info.get("missing_keys") or ()),
        unexpected=sorted(info.get("unexpected_keys") or ()),
        mismatched=sorted(
            f"{k}: checkpoint {list(found)} vs model {list(wanted)}"
            for k, found, wanted in info.get("mismatched_keys") or ()
        ),
    )
    if result.missing or result.unexpected or result.mismatched:
        raise mismatch_error(result, type(model).__name__, where)
    if errors := info.get("error_msgs"):
        raise CheckpointError(f"loading {where} failed: {'; '.join(map(str, errors))}")
