"""What a config leaves to the model, resolved once when a run starts; the image size checked against it.

``data.resolution`` and ``model.max_sequence_length`` left unset (None) mean "the model's", taken from the
first of:

1. the cache the run trains from (``data.cache_dir`` with an ``index.json``): what it was built with (its
   fingerprint's resolution; the length of its T5 embeddings);
2. the ``model.pretrained`` folder's ``mmdit_flow.json`` defaults (height / width, max_sequence_length; see
   ``mmdit_flow.pipelines.defaults``), so that a fine-tune trains as the model samples;
3. the transformer's native size, its ``sample_size`` x the VAE scale (``model.components`` or
   ``model.pretrained``; 8 without a VAE), and the T5 length the pipeline uses: 256 for SD3, 512 for
   Flux, at most the T5 tokenizer's ``model_max_length``.

``shipped:NAME`` folders become their paths. For a Flux model the default ``lora.target_modules`` (the
attention projections) becomes the same layers in Flux's names (``FLUX_LORA_TARGETS``). The resolved
config is what the run logs, saves as ``<output.dir>/config.yaml`` and exports.

``check_size`` runs before any image is encoded: every training image side (``data.resolution``, the largest
bucket, or the largest image of a cache) must fit the SD3 position table, at most
``pos_embed_max_size x patch_size x VAE scale`` pixels, and be a multiple of ``patch_size x VAE scale``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdit_flow.training.config import ConfigError, TrainConfig, model_folder

logger = logging.getLogger(__name__)

SD3_VAE_SCALE = 8  # SD3's and Flux's VAEs; used when the run has no VAE to read it from
T5_SLOT = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
# lora.target_modules' default (attention in and out projections) and the same layers in Flux's double blocks
SD3_LORA_TARGETS = ["attn.qkv", "attn.proj"]
FLUX_LORA_TARGETS = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj")
FLUX_PRESETS = {
    "flux_dev": "FLUX_DEV",
    "flux_schnell": "FLUX_SCHNELL",
}  # model.preset -> mmdit_flow.models.flux


@dataclass(frozen=True)
class ModelSize:
    """The image sides (pixels) a transformer takes, with the VAE that maps images to its latents."""

    native: int  # the side it is made for: sample_size x VAE scale
    multiple: int  # every side is a multiple of this: patch_size x VAE scale
    largest: int | None  # the position table's limit (SD3); None: no limit (Flux's rotary positions)
    table: int | None  # pos_embed_max_size, patches
    patch: int
    vae_scale: int


def model_size(model_config: Any, vae_scale: int) -> ModelSize:
    """From our transformer config (``SD3Config`` / ``FluxConfig``) and the VAE scale."""
    from mmdit_flow.pipelines.defaults import native_size

    table = getattr(model_config, "pos_embed_max_size", None)
    family = "sd3" if table is not None else "flux"
    patch = int(getattr(model_config, "patch_size", 2))  # Flux packs 2x2 latent patches
    native = native_size(family, {"sample_size": getattr(model_config, "sample_size", None)}, vae_scale)
    largest = table * patch * vae_scale if table is not None else None
    return ModelSize(native, patch * vae_scale, largest, table, patch, vae_scale)


def transformer_config(config: TrainConfig) -> Any:
    """The transformer's config, ``model.overrides`` applied (``pretrained_config`` for a folder), without
    loading its weights where the files allow (a preset, a diffusers folder); an original single file is
    loaded."""
    from mmdit_flow.weights.io import read_json

    m = config.model
    if m.preset is not None:
        if m.preset in FLUX_PRESETS:
            from mmdit_flow.models import flux

            base, kind = getattr(flux, FLUX_PRESETS[m.preset]), flux.FluxConfig
        else:
            from mmdit_flow.models.sd3 import PRESETS, SD3Config

            if m.preset not in PRESETS:
                names = ", ".join([*PRESETS, *FLUX_PRESETS])
                raise ValueError(f"model.preset: unknown preset {m.preset!r}; choose one of {names}")
            base, kind = SD3Config.preset(m.preset), SD3Config
        fields = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(m.overrides) - fields)
        if unknown:
            raise ValueError(
                f"model.overrides: unknown {kind.__name__} fields {unknown}; "
                f"valid: {', '.join(sorted(fields))}"
            )
        return dataclasses.replace(base, **m.overrides)
    path = Path(model_folder(m.pretrained))
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            from mmdit_flow.weights.transformer import family

            cfg = read_json(folder / "config.json")
            fam = "flux" if cfg.get("_class_name") == "FluxTransformer2DModel" else "sd3"
            return pretrained_config(family(fam).config_from_diffusers(cfg), config)
    from mmdit_flow.weights import load_transformer

    return pretrained_config(load_transformer(path, device="cpu").config, config)


PRETRAINED_OVERRIDES = ("guidance_embed",)  # the model.overrides a loaded model takes


def pretrained_config(folder_config: Any, config: TrainConfig) -> Any:
    """The config of the model a ``model.pretrained`` run trains: the folder's, with ``model.overrides``.

    Loaded weights keep their shapes, so the one override they take is ``guidance_embed: true`` on a Flux
    model without guidance embedding (schnell-like): the trainer adds a guidance embedding whose output
    layer is zero, so that the model starts as the folder's (``trainer.add_guidance_embedding``). On a Flux
    model that has one already it changes nothing (the trained embedding is kept)."""
    m = config.model
    if not m.overrides:
        return folder_config
    where = f"model.pretrained ({m.pretrained})"
    other = sorted(set(m.overrides) - set(PRETRAINED_OVERRIDES))
    if other:
        raise ConfigError(
            f"model.overrides {other} with {where}: a loaded model keeps the shapes of its weights; the one "
            "override it takes is guidance_embed: true (a Flux model without guidance embedding gains one). "
            f"Remove {other}, or train a preset from scratch (model.preset) with them"
        )
    value = m.overrides["guidance_embed"]
    if not hasattr(folder_config, "guidance_embed"):
        raise ConfigError(
            f"model.overrides.guidance_embed: {where} is an SD3 model; a guidance embedding (the guidance "
            "input of FLUX.1-dev) is added to Flux models only: remove model.overrides.guidance_embed "
            "(an SD3 guidance student learns one CFG scale, objective.teacher_guidance)"
        )
    if not isinstance(value, bool):
        raise ConfigError(f"model.overrides.guidance_embed must be true or false, got {value!r}")
    if folder_config.guidance_embed and not value:
        raise ConfigError(
            f"model.overrides.guidance_embed: false: {where} has a guidance embedding, and removing it "
            "would change what the model computes: remove model.overrides.guidance_embed"
        )
    if value and not folder_config.guidance_embed and config.lora.rank:
        raise ConfigError(
            f"model.overrides.guidance_embed: true with lora.rank {config.lora.rank}: the added guidance "
            "embedding starts at zero and LoRA would keep it frozen there, so the guidance input would "
            "never act; train the full model (lora.rank: 0)"
        )
    return dataclasses.replace(folder_config, guidance_embed=value)


def _vae_scale(components: str | None) -> int:
    if components is None or not (Path(components) / "vae" / "config.json").is_file():
        return SD3_VAE_SCALE
    from mmdit_flow.pipelines.vae import vae_scale
    from mmdit_flow.weights.io import read_json

    return vae_scale(read_json(Path(components) / "vae" / "config.json"))


def _t5_length(components: str | None, family: str) -> int:
    """The T5 length the pipeline uses when a call leaves it unset (``mmdit_flow.pipelines.text``)."""
    from mmdit_flow.pipelines.text import T5_MAX_LENGTH, FluxTextEncoder, SD3TextEncoder, sequence_length
    from mmdit_flow.weights.io import read_json

    default = (FluxTextEncoder if family == "flux" else SD3TextEncoder).default_max_sequence_length
    limit = T5_MAX_LENGTH
    if components is not None and (Path(components) / "model_index.json").is_file():
        tokenizer = Path(components) / T5_SLOT[family] / "tokenizer_config.json"
        if tokenizer.is_file():
            given = read_json(tokenizer).get("model_max_length")
            limit = min(limit, int(given)) if isinstance(given, (int, float)) else limit
    return sequence_length(None, default, limit)


def _cache_fingerprint(config: TrainConfig) -> tuple[dict[str, Any], Path | None]:
    if not config.data.cache_dir:
        return {}, None
    index = Path(config.data.cache_dir) / "index.json"
    if not index.is_file():
        return {}, None
    from mmdit_flow.weights.io import read_json

    return read_json(index).get("fingerprint", {}), index


def _cached_t5_length(folder: Path) -> int | None:
    """The T5 length of a cache's embeddings (its empty-prompt file), None when it has no T5 entry."""
    from mmdit_flow.weights.io import read_safetensors_header

    path = folder / "empty.safetensors"
    entry = read_safetensors_header(path).get("t5.hidden") if path.is_file() else None
    return int(entry["shape"][0]) if entry else None


def _folder_defaults(pretrained: str | None) -> Any:
    if pretrained is None or not (Path(pretrained) / "model_index.json").is_file():
        return None
    from mmdit_flow.pipelines.defaults import read_defaults

    return read_defaults(pretrained)


def _square(height: int, width: int, step: int) -> int:
    """One training side for a model whose default size is not square: a square of the same area."""
    return height if height == width else max(step, round(math.sqrt(height * width) / step) * step)


def resolve_config(config: TrainConfig, model_config: Any = None) -> tuple[TrainConfig, ModelSize]:
    """The config with every "the model's" value filled in (module docstring), and the model's sizes.

    ``model_config``: the transformer's config when the model is built already (else read from the files).
    """
    m, d = config.model, config.data
    pretrained = model_folder(m.pretrained) if m.pretrained else None
    components = model_folder(m.components, "model.components") if m.components else pretrained
    model_config = model_config if model_config is not None else transformer_config(config)
    size = model_size(model_config, _vae_scale(components))
    family = "sd3" if size.table is not None else "flux"
    cached, index = _cache_fingerprint(config)
    defaults = _folder_defaults(pretrained)
    resolution, length = d.resolution, m.max_sequence_length
    if resolution is None:
        if cached.get("resolution"):
            resolution, source = int(cached["resolution"]), f"the cache {index}"
        elif defaults is not None and defaults.recorded:
            resolution = _square(defaults.height, defaults.width, d.bucket_step)
            source = f"{pretrained}/mmdit_flow.json"
        else:
            resolution, source = size.native, "the transformer's native size (sample_size x VAE scale)"
        logger.info("data.resolution: %d px, from %s", resolution, source)
    if length is None:
        if index is not None and (cached_length := _cached_t5_length(index.parent)) is not None:
            length, source = cached_length, f"the T5 embeddings of the cache {index.parent}"
        elif defaults is not None and defaults.max_sequence_length is not None:
            length, source = defaults.max_sequence_length, f"{pretrained}/mmdit_flow.json"
        else:
            length, source = _t5_length(components, family), "the T5 tokenizer's default"
        logger.info("model.max_sequence_length: %d T5 tokens, from %s", length, source)
    model = dataclasses.replace(
        m,
        pretrained=pretrained,
        components=model_folder(m.components, "model.components") if m.components else None,
        max_sequence_length=length,
    )
    data = dataclasses.replace(d, resolution=resolution)
    lora = config.lora
    if family == "flux" and lora.target_modules == SD3_LORA_TARGETS:  # the default: the same layers in Flux
        lora = dataclasses.replace(lora, target_modules=list(FLUX_LORA_TARGETS))
    return dataclasses.replace(config, model=model, data=data, lora=lora), size


def _sides(config: TrainConfig) -> tuple[int, str]:
    """The largest image side the run trains at, in pixels, and what sets it (for the error)."""
    from mmdit_flow.training.data import make_buckets

    d = config.data
    cached, index = _cache_fingerprint(config)
    if index is not None:
        from mmdit_flow.weights.io import read_json

        records = read_json(index).get("records", [])
        side = max((max(r["size"]) for r in records), default=d.resolution)
        return side, f"the cache {index} holds images of up to {side} px (built with data.resolution)"
    if d.buckets:
        side = max(max(b) for b in make_buckets(d.resolution, d.bucket_step, d.max_aspect))
        return side, f"data.resolution {d.resolution} with data.buckets gives buckets up to {side} px a side"
    return d.resolution, f"data.resolution is {d.resolution} px"


def check_size(config: TrainConfig, size: ModelSize) -> None:
    """Raise a ``ConfigError`` naming ``data.resolution`` when the training images do not fit the model."""
    side, what = _sides(config)
    model = config.model.pretrained or f"preset {config.model.preset}"
    if size.largest is not None and side > size.largest:
        raise ConfigError(
            f"{what}, but the model ({model}) takes images of at most {size.largest} px a side "
            f"(position table {size.table} patches x patch {size.patch} x VAE scale {size.vae_scale}); "
            f"it is made for {size.native} px. Set data.resolution to at most {size.largest}, "
            "or leave it unset to train at the model's size"
        )
    if side % size.multiple:
        raise ConfigError(
            f"{what}, but this model needs image sides that are multiples of {size.multiple} px (patch "
            f"{size.patch} x VAE scale {size.vae_scale}); set data.resolution (and data.bucket_step) to "
            f"multiples of {size.multiple}, e.g. {size.native}"
        )


def check_family(config: TrainConfig, model_config: Any) -> None:
    """Raise a ``ConfigError`` for Flux-only objective keys on a model that does not take them, and for
    objective kinds a Flux model does not support with its guidance input or resolution-dependent shift."""
    o = config.objective
    flux = hasattr(model_config, "guidance_embed")
    embedded = flux and model_config.guidance_embed
    model = config.model.pretrained or f"preset {config.model.preset}"
    if o.guidance is not None and not embedded:
        what = "a Flux model without guidance embedding (schnell-like)" if flux else "an SD3 model"
        hint = " (its guidance student learns one CFG scale: objective.teacher_guidance)"
        raise ConfigError(
            f"objective.guidance is the guidance input of a guidance-embedded Flux model (FLUX.1-dev); the "
            f"model ({model}) is {what}, which takes none: remove objective.guidance"
            f"{hint if o.kind == 'guidance' else ''}"
        )
    if o.dynamic_shift and not flux:
        raise ConfigError(
            f"objective.dynamic_shift is Flux's resolution-dependent shift; the model ({model}) is an SD3 "
            "model: remove it and set objective.shift (SD3 trains with 3.0)"
        )
    if flux and o.kind in ("progressive", "reflow"):
        _check_flux_grid_kinds(o, embedded, model)
    if embedded and o.kind == "guidance":
        _check_flux_guidance(o, model)
    if o.teacher is not None:
        _check_teacher_family(o.teacher, "flux" if flux else "sd3", model)


def _check_flux_grid_kinds(o: Any, embedded: bool, model: str) -> None:
    if embedded:
        raise ConfigError(
            f"objective.kind {o.kind} is not supported for a guidance-embedded Flux model ({model}) yet: its "
            "student would need a guidance input that matches its targets (progressive: every round's "
            "teacher is the previous guidance-embedded student; reflow: the couplings' CFG scale), which is "
            "not wired. Distil guidance with objective.kind guidance (and objective.guidance), or use a Flux "
            "model without guidance embedding"
        )
    if o.dynamic_shift:
        raise ConfigError(
            f"objective.kind {o.kind} does not support objective.dynamic_shift yet (it does flow and "
            "guidance): progressive and a reflow grid train at the times of the student's scheduler grid, "
            "which has a static shift. Remove objective.dynamic_shift and set objective.shift"
        )


def _check_flux_guidance(o: Any, model: str) -> None:
    """Guidance distillation of a guidance-embedded Flux student: ``objective.guidance`` holds the CFG
    scales, each the student's guidance input (``objective.teacher_guidance`` would be a second copy)."""
    if o.teacher_guidance != 1.0:
        raise ConfigError(
            f"objective.teacher_guidance {o.teacher_guidance:g}: for a guidance-embedded Flux student "
            f"({model}) the teacher's CFG scale is objective.guidance, which is also the student's guidance "
            f"input; set objective.guidance: {o.teacher_guidance:g} (or a range [low, high]) and remove "
            "objective.teacher_guidance"
        )
    if o.guidance is None:
        raise ConfigError(
            f"objective.kind guidance on a guidance-embedded Flux model ({model}) needs objective.guidance: "
            "the CFG scale of the teacher's target, given to the student as its guidance input; one value "
            "(e.g. 3.5) or a range [low, high] drawn per sample (e.g. [1.0, 5.0])"
        )
    if o.caption_dropout and any(g != 1.0 for g in o.guidance):
        raise ConfigError(
            f"objective.caption_dropout with guidance distillation at objective.guidance {o.guidance}: the "
            "guided target has no unconditional counterpart to learn; remove objective.caption_dropout"
        )


def _check_teacher_family(teacher: str, family: str, model: str) -> None:
    """A teacher's text inputs and latents are those of its family: it must be the student's."""
    from mmdit_flow.weights.io import read_json

    folder = Path(model_folder(teacher, "objective.teacher"))
    for path in (folder / "transformer" / "config.json", folder / "config.json"):
        if path.is_file():
            theirs = "flux" if read_json(path).get("_class_name") == "FluxTransformer2DModel" else "sd3"
            if theirs != family:
                raise ConfigError(
                    f"objective.teacher {teacher} is {'a Flux' if theirs == 'flux' else 'an SD3'} model and "
                    f"the student ({model}) {'a Flux' if family == 'flux' else 'an SD3'} one; a teacher "
                    "takes the student's latents and text embeddings: distil a teacher of the same family"
                )
            return


def check_sharding(distributed_type: Any, environ: Mapping[str, str] | None = None) -> None:
    """Raise a ``ConfigError`` when ``accelerate launch`` was asked for FSDP or DeepSpeed but the
    accelerator did not take it (``distributed_type``, accelerate's ``DistributedType``).

    accelerate (1.x) turns FSDP on only for processes on accelerators (GPU, XPU, NPU, ...) and DeepSpeed
    only off the CPU; on CPU processes it ignores both without a word and trains unsharded (DDP or one
    process), which would hold the whole model in every process.
    """
    env = os.environ if environ is None else environ
    asked = [
        name
        for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if env.get(var, "false").lower() in ("1", "true", "yes")
    ]
    got = str(getattr(distributed_type, "value", distributed_type))
    if asked and got.upper() not in {a.upper() for a in asked}:
        raise ConfigError(
            f"{asked[0]} was asked for (accelerate launch / accelerate config), but accelerate set up {got}: "
            f"it shards only on accelerators (GPU, XPU, NPU, ...), and these processes run on the CPU, so "
            "the model would be trained unsharded in every process. Launch on GPUs, or drop "
            f"{asked[0]} from the accelerate config to train with DDP knowingly"
        )
