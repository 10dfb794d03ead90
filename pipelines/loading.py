"""Reading and writing diffusers pipeline folders (SD3 / SD3.5 and Flux) for ``TextToImagePipeline``.

A folder holds ``model_index.json`` and one subfolder per component. The text encoders, tokenizers and VAE
load through their own transformers / diffusers classes; the transformer through
``mmdit_flow.weights.load_transformer``. Before anything loads, ``model_index.json`` must declare, for each
component, a class its slot accepts, every declared component must be on disk (an optional one, T5 in SD3,
runs without only when declared ``[null, null]``), and every file passes ``component_checks``; every
component then loads strictly. Nothing is fetched from the network and no code from the folder runs.
Folders whose weights are only pickle files are refused unless ``allow_pickle=True``.

Precision: CUDA defaults to bfloat16, the CPU to float32. T5 never runs in float16 (it overflows): asked for
float16, it runs in float32. The VAE stays in float32 when its config sets ``force_upcast``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmdit_flow.pipelines.component_checks import (
    DIFFUSERS_TRANSFORMER,
    FAMILIES,
    OPTIONAL,
    PIPELINE_CLASS,
    SLOTS,
    TOKENIZER_OF,
    check_component_config,
    check_files,
    check_loading_info,
    check_slot,
    check_tokenizer,
)
from mmdit_flow.weights.io import read_json, write_json

logger = logging.getLogger(__name__)

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
        if index[name] not in (None, [None, None]):
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
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **components.scheduler_config}
    write_json(config, folder / "scheduler" / "scheduler_config.json")
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    for name, model in components.text_encoders.items():
        model.save_pretrained(folder / name)
    for name, tokenizer in components.tokenizers.items():
        tokenizer.save_pretrained(folder / name)
    write_json(model_index(components), folder / "model_index.json")  # last: the folder is complete
    return folder
