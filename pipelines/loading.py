"""Reading and writing diffusers pipeline folders (SD3 / SD3.5 and Flux) for ``TextToImagePipeline``.

A folder holds ``model_index.json`` and one subfolder per component. The text encoders, tokenizers and VAE
load through their own transformers / diffusers classes; the transformer through
``mmdit_flow.weights.load_transformer``.
Folders whose weights are only pickle files are refused unless ``allow_pickle=True``.

Precision: CUDA defaults to bfloat16, the CPU to float32. T5 never runs in float16 (it overflows): asked for
float16, it runs in float32. The VAE stays in float32 when its config sets ``force_upcast``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
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

logger = logging.getLogger(__name__)

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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEMO_FOLDER = "tiny-shapes"


@dataclass
class Components:
    """Everything a pipeline folder holds, loaded. ``text_encoder_3`` / ``tokenizer_3`` may be None (SD3)."""

    family: str
    transformer: torch.nn.Module
    transformer_config: dict
    scheduler_config: dict
    vae: Any
    text_encoders: dict[str, Any] = field(default_factory=dict)  # "text_encoder", "_2", "_3" -> model
    tokenizers: dict[str, Any] = field(default_factory=dict)  # "tokenizer", "_2", "_3" -> tokenizer


def default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA in bfloat16 when available, else the CPU in float32."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return device, dtype


def demo_folder() -> Path:
    """The shipped demo model; a clear error while it is not shipped yet."""
    import mmdit_flow.weights

    folder = Path(mmdit_flow.weights.__file__).parent / DEMO_FOLDER
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo model ({folder}) is not shipped yet; pass the path of a diffusers SD3 or Flux "
            "folder: TextToImagePipeline.from_pretrained('path/to/folder')"
        )
    return folder


def read_index(folder: Path) -> tuple[str, dict]:
    """(family, model_index dict) of a pipeline folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a diffusers SD3 or Flux pipeline folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no model_index.json; pass a diffusers pipeline folder (the one that holds "
            "model_index.json, transformer/, vae/, text_encoder/ ...), not a component subfolder"
        )
    index = read_json(index_path)
    name = index.get("_class_name")
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(
            f"{index_path} describes a {name!r}; supported pipelines are {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name], index


def _declared(index_path: Path, index: dict, name: str) -> tuple[str, str] | None:
    """The (library, class) model_index.json gives a component, or None for [null, null] / no entry."""
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ValueError(
            f"{index_path}: {name} is {entry!r}, expected [library, class name] such as "
            '["transformers", "CLIPTextModelWithProjection"], or [null, null]'
        )
    return entry[0], entry[1]


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


def check_layout(folder: Path, family: str, index: dict, allow_pickle: bool) -> list[str]:
    """The component folders to load, each declared with a class its slot accepts; raise naming a missing one,
    a declared one whose folder is absent, or one that holds only pickle weights."""
    index_path = folder / "model_index.json"
    declared = {name: _declared(index_path, index, name) for name in SLOTS[family]}
    required = [name for name in SLOTS[family] if name not in OPTIONAL[family]]
    if undeclared := [name for name in required if declared[name] is None]:
        raise ValueError(
            f"{index_path} declares no {', '.join(undeclared)}, which a {PIPELINE_CLASS[family]} needs; "
            "copy the complete pipeline folder with its model_index.json"
        )
    for name, entry in declared.items():
        if entry is not None:
            check_slot(index_path, family, name, entry)
    names = [name for name, entry in declared.items() if entry is not None]
    if missing := [name for name in names if not (folder / name).is_dir()]:
        raise FileNotFoundError(
            f"{folder} lacks the component folder(s) {', '.join(missing)} that its model_index.json declares "
            f"(a {PIPELINE_CLASS[family]} needs them); copy the complete pipeline folder, or set an optional "
            "component to [null, null] in model_index.json to run without it"
        )
    optional = [name for name in OPTIONAL[family] if declared[name] is not None]
    if optional and len(optional) != len(OPTIONAL[family]):
        raise ValueError(
            f"{index_path} declares {', '.join(optional)} but not "
            f"{', '.join(n for n in OPTIONAL[family] if n not in optional)}: an encoder needs its tokenizer; "
            "declare both or set both to [null, null]"
        )
    for name in sorted(n for n in set(index) - set(SLOTS[family]) if not n.startswith("_")):
        if _declared(index_path, index, name) is not None:
            logger.info("%s: %s is not used by this pipeline and is ignored", folder, name)
    for name in OPTIONAL[family]:
        if declared[name] is None and (folder / name).is_dir():
            logger.info("%s: %s is [null, null] in model_index.json, so its folder is ignored", folder, name)
    for name in names:
        if name.startswith(("tokenizer", "scheduler")):
            continue
        files = [p.name for p in (folder / name).iterdir()]
        has_safe = any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files)
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) or ".bin.index" in f]
        if not has_safe and pickles and not allow_pickle:
            raise ValueError(
                f"{folder / name} holds only pickle weights ({', '.join(sorted(pickles))}), which can run "
                "code when loaded; convert them to safetensors, or pass allow_pickle=True if you trust "
                "the source"
            )
    return names


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
    """Each key of ``numbers`` that ``config`` sets must be a finite number of its kind: "real", "positive"
    or "count" (an integer >= 1); each of ``flags`` true or false."""
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
    config_name = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(
        name.rstrip("_23"), "config.json"
    )
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


def load_components(
    folder: Path, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool, offload: bool
) -> Components:
    """Load every component of a pipeline folder onto ``device`` (or the CPU when offloading)."""
    import transformers
    from diffusers import AutoencoderKL

    from mmdit_flow.weights import load_transformer

    family, index = read_index(folder)
    names = check_layout(folder, family, index, allow_pickle)
    configs = {}
    for name in names:
        configs[name] = check_files(folder / name)
        check_component_config(folder, family, name, configs[name])
    place = torch.device("cpu") if offload else device
    # use_safetensors: None lets the libraries fall back to pickle (read with weights_only=True)
    # ignore_mismatched_sizes: the libraries then report shape mismatches (by name) instead of raising bare
    common = {
        "use_safetensors": None if allow_pickle else True,
        "local_files_only": True,
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
    }
    t5_dtype = torch.float32 if dtype == torch.float16 else dtype

    transformer = load_transformer(
        folder / "transformer", device=place, dtype=dtype, allow_pickle=allow_pickle
    )
    transformer_config = configs["transformer"]["config.json"]
    scheduler_config = configs["scheduler"]["scheduler_config.json"]

    upcast = bool(configs["vae"]["config.json"].get("force_upcast", False))
    vae, info = AutoencoderKL.from_pretrained(
        folder / "vae", torch_dtype=torch.float32 if upcast else dtype, **common
    )
    check_loading_info(folder / "vae", vae, info)
    vae = vae.to(place).eval()

    encoders, tokenizers = {}, {}
    for name in names:
        if SLOTS[family][name].library != "transformers":
            continue
        cls = getattr(transformers, index[name][1])  # one of the classes check_slot accepts
        if name.startswith("text_encoder"):
            model, info = cls.from_pretrained(
                folder / name,
                dtype=t5_dtype if cls is transformers.T5EncoderModel else dtype,
                **common,
            )
            check_loading_info(folder / name, model, info)
            encoders[name] = model.to(place).eval()
        else:
            tokenizers[name] = cls.from_pretrained(folder / name, local_files_only=True)
    for name, model in encoders.items():
        check_tokenizer(folder, name, tokenizers[TOKENIZER_OF[name]], model)
    return Components(family, transformer, transformer_config, scheduler_config, vae, encoders, tokenizers)


def model_index(components: Components) -> dict:
    """The model_index.json diffusers writes for these components."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": PIPELINE_CLASS[components.family],
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", DIFFUSERS_TRANSFORMER[components.family]],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for name, obj in {**components.text_encoders, **components.tokenizers}.items():
        index[name] = ["transformers", type(obj).__name__]
    if components.family == "sd3":
        for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
            index.setdefault(name, [None, None])
    else:
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
    return dict(sorted(index.items()))


def save_components(components: Components, folder: Path) -> Path:
    """Write a diffusers pipeline folder (safetensors) that diffusers' own pipelines load."""
    from mmdit_flow.weights import save_transformer

    folder.mkdir(parents=True, exist_ok=True)
    save_transformer(components.transformer, folder / "transformer", format="diffusers")
    (folder / "scheduler").mkdir(exist_ok=True)
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **components.scheduler_config}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    for name, model in components.text_encoders.items():
        model.save_pretrained(folder / name)
    for name, tokenizer in components.tokenizers.items():
        tokenizer.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(model_index(components), indent=2))
    return folder
