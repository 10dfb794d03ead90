"""The training configuration: one typed dataclass, loaded from YAML and overridden with ``key=value``.

Sections: ``model`` (a preset to train from scratch, or a diffusers folder to fine-tune), ``lora``, ``data``,
``objective`` (timestep scheme, shift, weighting, caption dropout), ``optimizer``, ``schedule``,
``precision``, ``ema``, ``output``. Every value is checked against its type; names with a fixed set of
choices are ``Literal`` types, and a bad value raises a ``ValueError`` that names the key and the choices.

    config = load_config("train.yaml", ["optimizer.lr=3e-4", "data.resolution=256"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

Scheme = Literal["uniform", "logit_normal", "mode", "cosmap"]
Weighting = Literal["none", "cosmap", "sigma_sqrt"]
AttentionBackend = Literal["sdpa", "math", "xformers", "reference"]  # mmdit_flow.attention.BACKENDS


@dataclass
class ModelConfig:
    preset: str | None = None  # an SD3Config preset name: train from scratch
    pretrained: str | None = None  # a diffusers folder (or its transformer/ subfolder): fine-tune
    overrides: dict[str, Any] = field(default_factory=dict)  # SD3Config fields replaced on the preset
    components: str | None = None  # diffusers folder with vae/ and text encoders; defaults to `pretrained`
    max_sequence_length: int = 256  # T5 tokens
    gradient_checkpointing: bool = False
    attention_backend: AttentionBackend = "sdpa"  # "math": fastest for short sequences on the CPU
    compile: bool = False  # torch.compile the transformer in place (state-dict keys unchanged); needs a C++
    # compiler on the CPU; tiny-shapes loop: 1.18x the steps/s of eager in bf16 on this CPU (docs/quality.md)


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: full fine-tune; > 0: train LoRA adapters of this rank only
    alpha: float | None = None  # scale is alpha / rank; None means alpha = rank
    target_modules: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    dropout: float = 0.0


@dataclass
class DataConfig:
    path: str | None = None  # image folder: sidecar .txt captions or metadata.jsonl
    shards: list[str] = field(default_factory=list)  # webdataset tar shards (brace patterns allowed)
    cache_dir: str | None = None  # latents + text embeddings written by `mmdit-flow cache`
    resolution: int = 512
    buckets: bool = False  # aspect-ratio buckets of about resolution^2 pixels
    bucket_step: int = 64
    max_aspect: float = 2.0
    crop: Literal["center", "random"] = "center"
    flip: bool = False  # random horizontal flips
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGBA composited on this
    caption_column: str = "text"
    batch_size: int = 1  # per process and micro-step
    num_workers: int = 0
    max_bad_fraction: float = 0.05  # stop the run when a larger share of the files is unreadable
    max_image_pixels: int = 89_478_485  # refuse bigger images (decompression bombs); PIL's default


@dataclass
class ObjectiveConfig:
    scheme: Scheme = "logit_normal"
    shift: float = 1.0  # t <- shift t / (1 + (shift - 1) t); SD3 trains with 3.0
    weighting: Weighting = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    caption_dropout: dict[str, float] = field(default_factory=dict)  # text encoder name -> probability


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-steps per optimizer step


@dataclass
class ScheduleConfig:
    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class PrecisionConfig:
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # weights stay fp32 in every case
    allow_tf32: bool = True


@dataclass
class EMAConfig:
    decay: float = 0.0  # 0 disables EMA weights
    every: int = 1


@dataclass
class OutputConfig:
    dir: str = "runs/train"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True
    validation_every: int = 0  # 0 disables the validation grid
    validation_prompts: list[str] = field(default_factory=list)
    validation_seeds: list[int] = field(default_factory=lambda: [0])
    validation_steps: int = 28
    validation_guidance: float = 5.0
    save_final: bool = True  # a diffusers folder in <dir>/final


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    max_nonfinite: int = 10  # abort after this many non-finite losses in a row

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------- validation


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def validate(c: TrainConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    m, d = c.model, c.data
    if (m.preset is None) == (m.pretrained is None):
        raise ValueError(
            "set exactly one of model.preset (train from scratch) and model.pretrained "
            f"(fine-tune a diffusers folder); got preset={m.preset!r}, pretrained={m.pretrained!r}"
        )
    sources = [s for s in ("path", "shards", "cache_dir") if getattr(d, s)]
    if d.path and d.shards:
        raise ValueError("set one of data.path (image folder) and data.shards (webdataset), not both")
    if not sources:
        raise ValueError("no training data: set data.path, data.shards or data.cache_dir")
    for key, value in [
        ("data.resolution", d.resolution),
        ("model.max_sequence_length", m.max_sequence_length),
        ("data.batch_size", d.batch_size),
        ("data.bucket_step", d.bucket_step),
        ("data.max_image_pixels", d.max_image_pixels),
        ("optimizer.lr", c.optimizer.lr),
        ("optimizer.grad_accum", c.optimizer.grad_accum),
        ("schedule.max_steps", c.schedule.max_steps),
        ("objective.shift", c.objective.shift),
        ("objective.logit_std", c.objective.logit_std),
        ("output.checkpoint_every", c.output.checkpoint_every),
        ("output.keep_checkpoints", c.output.keep_checkpoints),
        ("output.log_every", c.output.log_every),
        ("output.validation_steps", c.output.validation_steps),
        ("ema.every", c.ema.every),
        ("max_nonfinite", c.max_nonfinite),
    ]:
        _positive(key, value)
    for key, value in [
        ("lora.rank", c.lora.rank),
        ("data.num_workers", d.num_workers),
        ("optimizer.grad_clip", c.optimizer.grad_clip),
        ("optimizer.weight_decay", c.optimizer.weight_decay),
        ("schedule.warmup_steps", c.schedule.warmup_steps),
        ("output.validation_every", c.output.validation_every),
    ]:
        _positive(key, value, zero_ok=True)
    if d.resolution % d.bucket_step:
        raise ValueError(
            f"data.resolution ({d.resolution}) must be a multiple of data.bucket_step ({d.bucket_step})"
        )
    if d.max_aspect < 1:
        raise ValueError(f"data.max_aspect must be >= 1, got {d.max_aspect}")
    if not 0 <= d.max_bad_fraction <= 1:
        raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
    if len(d.background) != 3 or not all(0 <= v <= 255 for v in d.background):
        raise ValueError(f"data.background must be three integers in [0, 255] (R, G, B), got {d.background}")
    if len(c.optimizer.betas) != 2 or not all(0 <= b < 1 for b in c.optimizer.betas):
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {c.optimizer.betas}")
    if not 0 <= c.ema.decay < 1:
        raise ValueError(f"ema.decay must be in [0, 1) (0 disables EMA), got {c.ema.decay}")
    if not 0 <= c.schedule.min_lr_ratio <= 1:
        raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {c.schedule.min_lr_ratio}")
    if not 0 <= c.lora.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {c.lora.dropout}")
    if c.lora.rank and not c.lora.target_modules:
        raise ValueError(
            "lora.target_modules is empty: name the modules to adapt, e.g. ['attn.qkv', 'attn.proj']"
        )
    for name, p in c.objective.caption_dropout.items():
        if not 0 <= p <= 1:
            raise ValueError(f"objective.caption_dropout.{name} must be a probability in [0, 1], got {p}")
    trackers = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive")
    for t in c.output.trackers:
        if t not in trackers:
            raise ValueError(f"output.trackers: unknown tracker {t!r}; choose from {', '.join(trackers)}")


# ------------------------------------------------------------------------------------------ dict -> config


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing numeric strings), naming ``key`` on error."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(key, value, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / off / yes / on as a bool
            spelled = [c for c in _BOOL_WORDS[value] if c in choices]
            value = spelled[0] if spelled else value
        if value not in choices:
            raise ValueError(
                f"{key}: {value!r} is not a valid choice; choose from {', '.join(map(repr, choices))}"
            )
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `key=x` on the command line for a one-item list
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(
        f"{key}: unsupported annotation {_type_name(tp)}"
    )  # a bug in this file, not in the config


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {full!r}{hint}; valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _convert(full, value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from nested plain values (what YAML gives), every key and value checked."""
    return _build(TrainConfig, data)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` overrides (values parsed as YAML) on a nested dict, in place."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=3e-4)")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} holds a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
            )
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def save_config(config: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
