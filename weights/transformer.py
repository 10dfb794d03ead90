"""Load and save a transformer (SD3 / SD3.5 MMDiT or Flux) in any of the formats people have on disk.

Formats read by ``load_transformer``:
- a diffusers transformer folder: ``config.json`` (its ``_class_name`` picks the family) and safetensors
  weights, possibly sharded with an index;
- a diffusers pipeline folder (``model_index.json``): its ``transformer/`` subfolder;
- a file written by ``save_transformer``: its metadata holds the family, our config and the key names;
- an original single file: SD3 / SD3.5 (keys under ``model.diffusion_model.``; an all-in-one file's text
  encoders and VAE are skipped) or BFL Flux; the family is the one whose ``KeyFormat.is_original`` accepts it.

The model is built on the meta device (no memory, no initialisation), its parameters and persistent buffers
are assigned from the checkpoint (strictly: missing, unexpected or mis-shaped keys raise), then moved to
``device``. Non-persistent buffers (tables a model computes in ``__init__``) are not in any checkpoint; when a
family has them they are taken from a second construction with parameters on meta and real buffers, so they
are exactly what ``__init__`` computes. (Neither SD3, whose position table is persistent, nor Flux, which
computes RoPE in ``forward``, has any today; the path is kept tested with a toy family.)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdit_flow.weights.formats import KeyFormat, StateDict
from mmdit_flow.weights.io import (
    Checkpoint,
    CheckpointError,
    load_into,
    parameters_on_meta,
    read_checkpoint,
    read_json,
    save_file,
    save_folder,
    write_json,
)

logger = logging.getLogger(__name__)

# family name -> module defining ``FAMILY`` (imported on first use), or a KeyFormat itself
FAMILIES: dict[str, str | KeyFormat] = {
    "sd3": "mmdit_flow.weights.sd3_keys",
    "flux": "mmdit_flow.weights.flux_keys",
}
# where an all-in-one single file (SD3 / SD3.5, ComfyUI) keeps the transformer beside text encoders and VAE
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."
# prefix of the transformer's keys in the original single file we write, per family ("" when none)
ORIGINAL_PREFIX = {"sd3": DIFFUSION_MODEL_PREFIX}
FORMATS = ("diffusers", "original")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# metadata keys of the files we write
META_FAMILY, META_CONFIG, META_KEYS = "mmdit_flow.family", "mmdit_flow.config", "mmdit_flow.keys"


def family(name: str) -> KeyFormat:
    """The ``KeyFormat`` of a registered family ("sd3" | "flux")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    entry = FAMILIES[name]
    return entry if isinstance(entry, KeyFormat) else importlib.import_module(entry).FAMILY


def _all_families() -> list[KeyFormat]:
    return [family(name) for name in FAMILIES]


def family_of_model(model: nn.Module) -> tuple[KeyFormat, nn.Module]:
    """The family of ``model`` and the model itself, looking inside ``torch.compile`` (``_orig_mod``) and
    DistributedDataParallel / FSDP (``module``) wrappers."""
    for fam in _all_families():
        if isinstance(model, fam.model_cls):
            return fam, model
    for attr in ("_orig_mod", "module"):
        if isinstance(inner := getattr(model, attr, None), nn.Module):
            return family_of_model(inner)
    known = ", ".join(f.model_cls.__name__ for f in _all_families())
    raise ValueError(f"a {type(model).__name__} is not a transformer of a known family ({known})")


# ------------------------------------------------------------------------------------------------ loading


@dataclasses.dataclass
class _Resolved:
    """A checkpoint turned into our names: family, config and state dict, plus where it came from."""

    family: KeyFormat
    config: Any
    state_dict: StateDict
    source: Path


def _config_from_json(fam: KeyFormat, text: str, source: Path) -> Any:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source}: the {META_CONFIG} metadata is not valid JSON ({err})") from err
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    if unknown := sorted(values.keys() - fields):
        raise CheckpointError(
            f"{source}: its {fam.name} config has fields this version does not know ({', '.join(unknown)}); "
            "it was probably written by a newer mmdit-flow: upgrade"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return fam.config_cls(**values)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: its stored {fam.name} config is invalid: {err}") from err


def config_to_json(config: Any) -> str:
    """Our config dataclass as the JSON string stored in a file's metadata."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _strip_original(sd: StateDict, source: Path) -> StateDict:
    """Keys of the transformer alone: ``model.diffusion_model.*`` stripped when present, the rest skipped."""
    prefix = DIFFUSION_MODEL_PREFIX
    if not any(k.startswith(prefix) for k in sd):
        return sd
    kept = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if skipped := Counter(k.split(".")[0] + ".*" for k in sd if not k.startswith(prefix)):
        parts = ", ".join(f"{other}: {n}" for other, n in sorted(skipped.items()))
        logger.info("%s: loading the transformer only; skipped other components (%s)", source, parts)
    return kept


def _from_single(ckpt: Checkpoint, source: Path) -> _Resolved:
    """Resolve a single file (or a folder's weights without config.json)."""
    meta = ckpt.metadata
    if META_FAMILY in meta:  # written by save_transformer
        if meta[META_FAMILY] not in FAMILIES:
            raise CheckpointError(
                f"{source} holds a {meta[META_FAMILY]!r} model; this version reads {', '.join(FAMILIES)}"
            )
        fam = family(meta[META_FAMILY])
        config = _config_from_json(fam, meta.get(META_CONFIG, "{}"), source)
        keys = meta.get(META_KEYS, "original")
        if keys == "diffusers":
            return _Resolved(fam, config, fam.from_diffusers(ckpt.state_dict, config), source)
        sd = {k.removeprefix(ORIGINAL_PREFIX.get(fam.name, "")): v for k, v in ckpt.state_dict.items()}
        return _Resolved(fam, config, fam.from_original(sd, config), source)
    sd = _strip_original(ckpt.state_dict, source)
    for fam in _all_families():
        if fam.is_original(sd):
            try:
                config = fam.config_from_original(sd)
            except ValueError as err:
                raise CheckpointError(
                    f"{source}: cannot infer the {fam.name} config from its keys: {err}"
                ) from err
            logger.info("%s: original %s checkpoint", source, fam.name)
            return _Resolved(fam, config, fam.from_original(sd, config), source)
    sample = ", ".join(sorted(sd)[:5])
    hint = (
        "; it looks like diffusers weights: pass the folder that holds them with their config.json"
        if any(k.startswith("transformer_blocks.") for k in sd)
        else ""
    )
    raise CheckpointError(
        f"{source} is not a checkpoint of a known family ({', '.join(FAMILIES)}): found {len(sd)} tensors "
        f"such as {sample or 'none'}{hint}"
    )


def _from_diffusers_folder(folder: Path, allow_pickle: bool) -> _Resolved:
    config_path = folder / "config.json"
    config = read_json(config_path)
    name = config.get("_class_name")
    matches = [fam for fam in _all_families() if fam.diffusers_class_name == name]
    if not matches:
        known = ", ".join(f.diffusers_class_name for f in _all_families())
        raise CheckpointError(f"{config_path} describes a {name!r}; load_transformer reads {known}")
    fam = matches[0]
    try:
        our_config = fam.config_from_diffusers(config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    ckpt = read_checkpoint(folder, allow_pickle=allow_pickle)
    return _Resolved(fam, our_config, fam.from_diffusers(ckpt.state_dict, our_config), ckpt.files[0])


def _resolve(path: Path, allow_pickle: bool) -> _Resolved:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a diffusers transformer or pipeline folder or a .safetensors file"
        )
    if path.is_dir() and (path / "model_index.json").is_file():
        components = sorted(k for k in read_json(path / "model_index.json") if not k.startswith("_"))
        if not (path / "transformer").is_dir():
            raise CheckpointError(
                f"{path} is a diffusers pipeline without a transformer/ folder (components: "
                f"{', '.join(components)}); pass the folder of a text-to-image pipeline such as SD3 or Flux"
            )
        path = path / "transformer"
    if path.is_dir() and (path / "config.json").is_file():
        return _from_diffusers_folder(path, allow_pickle)
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
    return _from_single(ckpt, ckpt.files[0])


def _build(fam: KeyFormat, config: Any) -> nn.Module:
    """``fam.model_cls(config)`` on the meta device, its non-persistent buffers materialised."""
    with torch.device("meta"):
        model = fam.model_cls(config)
    persistent = model.state_dict().keys()
    computed = [name for name, _ in model.named_buffers() if name not in persistent]
    if computed:
        with parameters_on_meta():
            real = dict(fam.model_cls(config).named_buffers())
        for name in computed:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = real[name]
    return model


def load_transformer(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    attention_backend: str | None = None,
) -> nn.Module:
    """Load an SD3 / SD3.5 / Flux transformer from a diffusers folder or an original single file.

    ``dtype=None`` keeps the checkpoint's dtype; ``device=None`` leaves the model on the CPU. Pickle
    checkpoints need ``allow_pickle=True`` (read with ``torch.load(weights_only=True)``). The model is
    returned in eval mode.
    """
    resolved = _resolve(Path(path), allow_pickle)
    model = _build(resolved.family, resolved.config)
    load_into(model, resolved.state_dict, strict=True, dtype=dtype, source=resolved.source)
    if device is not None:
        model.to(device)
    if attention_backend is not None:  # "sdpa" | "math" | "xformers" | "reference", checked by the model
        model.attention_backend = attention_backend
    return model.eval()


# ------------------------------------------------------------------------------------------------ saving


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.32.0"


def save_transformer(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "diffusers",
    max_shard_size: int | str | None = None,
) -> Path:
    """Save ``model`` so that it loads back, keeping its dtype, and return the path written.

    ``format="diffusers"``: the folder ``path`` with ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (sharded with an index when larger than ``max_shard_size``, e.g.
    ``"5GB"``), which diffusers'
    ``SD3Transformer2DModel`` / ``FluxTransformer2DModel.from_pretrained`` load. ``format="original"``: one
    ``.safetensors`` file in the original key names (SD3 under ``model.diffusion_model.``). Both store the
    family and our config in the file metadata.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    fam, model = family_of_model(model)
    config = model.config
    sd = model.state_dict()
    meta = {META_FAMILY: fam.name, META_CONFIG: config_to_json(config), META_KEYS: format}
    path = Path(path)
    if format == "original":
        if max_shard_size is not None:
            raise ValueError(
                "format='original' writes one file; drop max_shard_size or use format='diffusers'"
            )
        if not path.name.endswith(".safetensors") or path.is_dir():
            raise ValueError(
                f"format='original' writes one file: give a path ending in .safetensors, not {path}"
            )
        prefix = ORIGINAL_PREFIX.get(fam.name, "")
        original = {prefix + k: v for k, v in fam.to_original(sd, config).items()}
        return save_file(original, path, metadata=meta)
    if path.is_file():
        raise ValueError(f"format='diffusers' writes a folder, but {path} is a file; choose a folder path")
    save_folder(
        fam.to_diffusers(sd, config),
        path,
        weights_name=WEIGHTS_NAME,
        metadata=meta,
        max_shard_size=max_shard_size,
    )
    config_json = {
        "_class_name": fam.diffusers_class_name,
        "_diffusers_version": _diffusers_version(),
        **fam.config_to_diffusers(config),
    }
    write_json(config_json, path / "config.json")
    return path
