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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# model_index.json "_class_name" -> family
FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# family -> (required component folders, optional ones)
LAYOUT = {
    "sd3": (
        ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
        ("text_encoder_3", "tokenizer_3"),
    ),
    "flux": (
        ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
        (),
    ),
}
PIPELINE_CLASS = {family: name for name, family in FAMILIES.items()}
DIFFUSERS_TRANSFORMER = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
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
    index = json.loads(index_path.read_text())
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(
            f"{index_path} describes a {name!r}; supported pipelines are {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name], index


def _present(folder: Path, index: dict, name: str) -> bool:
    """Is a component declared (not [null, null]) and on disk?"""
    entry = index.get(name)
    return bool(entry and entry[0] is not None) and (folder / name).is_dir()


def check_layout(folder: Path, family: str, index: dict, allow_pickle: bool) -> list[str]:
    """The component folders to load; raise naming a missing one, or one that holds only pickle weights."""
    required, optional = LAYOUT[family]
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks the component folder(s) {', '.join(missing)} that a {PIPELINE_CLASS[family]} "
            "needs; copy the complete pipeline folder"
        )
    names = list(required) + [name for name in optional if _present(folder, index, name)]
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


def check_scheduler(config: dict) -> None:
    for key, fine in UNSUPPORTED_SCHEDULER.items():
        if config.get(key) not in (fine, None):
            raise ValueError(
                f"the scheduler config sets {key}={config[key]!r}, which this pipeline does not implement; "
                f"remove it (supported: shift, use_dynamic_shifting, base/max_shift, base/max_image_seq_len)"
            )


def load_components(
    folder: Path, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool, offload: bool
) -> Components:
    """Load every component of a pipeline folder onto ``device`` (or the CPU when offloading)."""
    import transformers
    from diffusers import AutoencoderKL

    from mmdit_flow.weights import load_transformer

    family, index = read_index(folder)
    names = check_layout(folder, family, index, allow_pickle)
    place = torch.device("cpu") if offload else device
    safe = None if allow_pickle else True  # use_safetensors: None lets the libraries fall back to pickle
    t5_dtype = torch.float32 if dtype == torch.float16 else dtype

    transformer = load_transformer(
        folder / "transformer", device=place, dtype=dtype, allow_pickle=allow_pickle
    )
    transformer_config = json.loads((folder / "transformer" / "config.json").read_text())
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    check_scheduler(scheduler_config)

    upcast = bool(AutoencoderKL.load_config(folder / "vae").get("force_upcast", False))
    vae_dtype = torch.float32 if upcast else dtype
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=safe, torch_dtype=vae_dtype)
    vae = vae.to(place).eval()

    encoders, tokenizers = {}, {}
    for name in names:
        if name.startswith("text_encoder"):
            cls = getattr(transformers, index[name][1])
            is_t5 = "T5" in index[name][1]
            model = cls.from_pretrained(
                folder / name, use_safetensors=safe, dtype=t5_dtype if is_t5 else dtype
            )
            encoders[name] = model.to(place).eval()
        elif name.startswith("tokenizer"):
            tokenizers[name] = getattr(transformers, index[name][1]).from_pretrained(folder / name)
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
