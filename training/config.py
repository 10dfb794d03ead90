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
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from mmdit_flow.shipped import SHIPPED, package_folder, shipped
from mmdit_flow.shipped import model_folder as shipped_folder

# each repeats a list stated in mmdit_flow (this module must not import torch); tests/test_train_config.py
# checks that they agree
Scheme = Literal["uniform", "logit_normal", "mode", "cosmap"]  # mmdit_flow.flow.SCHEMES
Weighting = Literal["none", "cosmap", "sigma_sqrt"]  # mmdit_flow.flow.WEIGHTINGS
AttentionBackend = Literal["sdpa", "math", "xformers", "reference"]  # mmdit_flow.attention.BACKENDS
LRSchedule = Literal["constant", "linear", "cosine"]  # what trainer.lr_factor computes
MixedPrecision = Literal["no", "bf16", "fp16"]  # a subset of accelerate's PrecisionType
ObjectiveKind = Literal["flow", "reflow", "guidance", "progressive"]  # what trainer.micro_loss computes
DISTILLATION = ("guidance", "progressive")  # the kinds that learn from a teacher model
TRACKERS = (
    "tensorboard",
    "wandb",
    "comet_ml",
    "aim",
    "mlflow",
    "clearml",
    "dvclive",
)  # accelerate LoggerType


@dataclass
class ModelConfig:
    preset: str | None = None  # train from scratch: an SD3Config preset name, or flux_dev / flux_schnell
    pretrained: str | None = None  # a diffusers folder (or its transformer/ subfolder): fine-tune
    # SD3Config / FluxConfig fields replaced; with `pretrained` only guidance_embed (training/resolve.py)
    overrides: dict[str, Any] = field(default_factory=dict)
    components: str | None = None  # diffusers folder with vae/ and text encoders; defaults to `pretrained`
    max_sequence_length: int | None = None  # T5 tokens; None: the model's (see training/resolve.py)
    gradient_checkpointing: bool = False
    attention_backend: AttentionBackend = "sdpa"  # "math": fastest for short sequences on the CPU
    compile: bool = False  # torch.compile the transformer in place (state-dict keys unchanged); needs a C++
    # compiler on the CPU; tiny-shapes loop: 1.18x the steps/s of eager in bf16 on this CPU (docs/quality.md)


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: full fine-tune; > 0: train LoRA adapters of this rank only
    alpha: float | None = None  # scale is alpha / rank; None means alpha = rank
    # suffixes of the linear layers to adapt; this default (attention in / out) means Flux's double blocks'
    # img_attn / txt_attn qkv and proj for a Flux model (training/resolve.py)
    target_modules: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    dropout: float = 0.0


@dataclass
class DataConfig:
    path: str | None = None  # image folder: sidecar .txt captions or metadata.jsonl
    shards: list[str] = field(default_factory=list)  # webdataset tar shards (brace patterns allowed)
    cache_dir: str | None = None  # latents + text embeddings written by `mmdit-flow cache`
    resolution: int | None = None  # image side in pixels; None: the model's (see training/resolve.py)
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
    # flow: flow matching on data; reflow: on a couplings folder (data.cache_dir, `mmdit-flow couplings`),
    # with its noise; guidance / progressive: distil `teacher` (docs/training.md, "Few-step students")
    kind: ObjectiveKind = "flow"
    teacher: str | None = None  # guidance / progressive: the teacher's diffusers folder (or shipped:NAME)
    teacher_guidance: float = 1.0  # CFG scale of the teacher's target velocity (1: none)
    student_steps: int = 0  # progressive: the student's steps (the teacher takes two per step); reflow:
    # > 0 trains only at the times of that many-step sampling grid (distillation of the couplings)
    scheme: Scheme = "logit_normal"
    shift: float = 1.0  # t <- shift t / (1 + (shift - 1) t); SD3 trains with 3.0
    weighting: Weighting = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    caption_dropout: dict[str, float] = field(default_factory=dict)  # text encoder name -> probability
    # Flux only (docs/training.md, "Flux"). guidance: the guidance input of a guidance-embedded model, one
    # value (None: 3.5, as diffusers' Flux scripts) or a range [low, high] drawn uniformly per sample
    guidance: list[float] | None = None
    # resolution-dependent shift: t <- shift t / (1 + (shift - 1) t) with shift = exp(mu), mu linear in the
    # image tokens (H / 2)(W / 2) from base_shift at base_seq_len to max_shift at max_seq_len (diffusers'
    # calculate_shift); replaces objective.shift, which must stay 1
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096


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
    lr_schedule: LRSchedule = "constant"
    min_lr_ratio: float = 0.0


@dataclass
class PrecisionConfig:
    mixed_precision: MixedPrecision = "no"  # weights stay fp32 in every case
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


class ConfigError(ValueError):
    """The config does not fit the model, the data or the checkpoints it meets at the start of a run; the
    message names the key to change. ``mmdit-flow train`` prints it without a traceback."""


# ------------------------------------------------------------------------------------ shipped names
# `model.pretrained: shipped:tiny-shapes`, `mmdit-flow train shipped:lora_tiny_shapes` (mmdit_flow.shipped)


def example_configs() -> dict[str, Path]:
    """Name -> file of every example training config that comes with mmdit-flow (``training/examples``)."""
    root = package_folder("mmdit_flow.training") / "examples"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def model_folder(value: str, key: str = "model.pretrained") -> str:
    """The path a ``model.pretrained`` / ``model.components`` value names (``mmdit_flow.shipped``:
    ``shipped:NAME`` is the folder of a shipped model; anything else is a path, returned unchanged)."""
    return shipped_folder(value, key)


# ---------------------------------------------------------------------------------------------- validation


def _number(
    key: str,
    value: float,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_ok: bool = True,
    high_ok: bool = True,
) -> None:
    """Raise unless ``value`` is finite and within the bounds, naming ``key``."""
    finite = isinstance(value, int) or math.isfinite(value)  # an int may be too large for a float
    ok = finite and (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
    if not ok:

        def show(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"

        if low > -math.inf and high < math.inf:
            where = f" in {'[' if low_ok else '('}{show(low)}, {show(high)}{']' if high_ok else ')'}"
        elif low > -math.inf:
            where = f" {'>=' if low_ok else '>'} {show(low)}"
        else:
            where = f" {'<=' if high_ok else '<'} {show(high)}" if high < math.inf else ""
        raise ValueError(f"{key} must be a finite number{where}, got {value}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    _number(key, value, 0, low_ok=zero_ok)


def _finite_everywhere(value: Any, key: str) -> None:
    """Every float anywhere in the config (lists, mappings, ``model.overrides``) is finite."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _finite_everywhere(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite_everywhere(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite_everywhere(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")


def validate(c: TrainConfig) -> None:
    """Every number finite and in range, and the cross-field checks that the types alone cannot express."""
    m, d, o = c.model, c.data, c.objective
    if (m.preset is None) == (m.pretrained is None):
        raise ValueError(
            "set exactly one of model.preset (train from scratch) and model.pretrained "
            f"(fine-tune a diffusers folder); got preset={m.preset!r}, pretrained={m.pretrained!r}"
        )
    for key, value in [("model.pretrained", m.pretrained), ("model.components", m.components)]:
        if value is not None:
            model_folder(value, key)  # a shipped name must exist
    sources = [s for s in ("path", "shards", "cache_dir") if getattr(d, s)]
    if d.path and d.shards:
        raise ValueError("set one of data.path (image folder) and data.shards (webdataset), not both")
    if not sources:
        raise ValueError("no training data: set data.path, data.shards or data.cache_dir")
    for key, value in [
        ("data.resolution", d.resolution),
        ("model.max_sequence_length", m.max_sequence_length),
    ]:
        if value is not None:  # None: the model's, resolved when a run starts
            _positive(key, value)
    for key, value in [
        ("data.batch_size", d.batch_size),
        ("data.bucket_step", d.bucket_step),
        ("data.max_image_pixels", d.max_image_pixels),
        ("optimizer.lr", c.optimizer.lr),
        ("optimizer.eps", c.optimizer.eps),
        ("optimizer.grad_accum", c.optimizer.grad_accum),
        ("schedule.max_steps", c.schedule.max_steps),
        ("objective.shift", o.shift),
        ("objective.logit_std", o.logit_std),
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
        ("output.validation_guidance", c.output.validation_guidance),
    ]:
        _positive(key, value, zero_ok=True)
    if c.lora.alpha is not None:
        _positive("lora.alpha", c.lora.alpha)
    _number("objective.logit_mean", o.logit_mean)
    if o.scheme == "mode":  # the map t(u) is monotone only for these scales (mmdit_flow.flow.sample_t)
        _number("objective.mode_scale", o.mode_scale, -1.0, 2.0 / (math.pi - 2.0))
    _number("data.max_aspect", d.max_aspect, 1.0)
    _number("data.max_bad_fraction", d.max_bad_fraction, 0.0, 1.0)
    _number("ema.decay", c.ema.decay, 0.0, 1.0, high_ok=False)
    _number("schedule.min_lr_ratio", c.schedule.min_lr_ratio, 0.0, 1.0)
    _number("lora.dropout", c.lora.dropout, 0.0, 1.0, high_ok=False)
    _number("seed", c.seed, 0, 2**32, high_ok=False)  # numpy's seeding limit (accelerate's set_seed)
    for i, seed in enumerate(c.output.validation_seeds):
        _number(f"output.validation_seeds[{i}]", seed, 0, 2**64, high_ok=False)  # torch.Generator's
    if d.resolution is not None and d.resolution % d.bucket_step:
        raise ValueError(
            f"data.resolution ({d.resolution}) must be a multiple of data.bucket_step ({d.bucket_step})"
        )
    if len(d.background) != 3 or not all(0 <= v <= 255 for v in d.background):
        raise ValueError(f"data.background must be three integers in [0, 255] (R, G, B), got {d.background}")
    if len(c.optimizer.betas) != 2 or not all(0 <= b < 1 for b in c.optimizer.betas):
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {c.optimizer.betas}")
    if c.lora.rank and not c.lora.target_modules:
        raise ValueError(
            "lora.target_modules is empty: name the modules to adapt, e.g. ['attn.qkv', 'attn.proj']"
        )
    for name, p in o.caption_dropout.items():
        _number(f"objective.caption_dropout.{name}", p, 0.0, 1.0)
    _check_objective(o)
    for t in c.output.trackers:
        if t not in TRACKERS:
            raise ValueError(f"output.trackers: unknown tracker {t!r}; choose from {', '.join(TRACKERS)}")
    _finite_everywhere(c, "")


def _check_objective(o: ObjectiveConfig) -> None:
    """The keys each objective kind needs, and none that it would silently ignore."""
    if o.guidance is not None:
        if len(o.guidance) not in (1, 2):
            raise ValueError(
                f"objective.guidance must be one number (e.g. 3.5) or a range [low, high], got {o.guidance}"
            )
        for i, g in enumerate(o.guidance):
            _positive(f"objective.guidance[{i}]", g, zero_ok=True)
        if len(o.guidance) == 2 and o.guidance[0] > o.guidance[1]:
            raise ValueError(f"objective.guidance range [low, high] needs low <= high, got {o.guidance}")
    if o.dynamic_shift:
        if o.shift != 1.0:
            raise ValueError(
                "objective.dynamic_shift replaces objective.shift (the shift then follows the image size); "
                f"remove objective.shift (it is {o.shift:g})"
            )
        _positive("objective.base_seq_len", o.base_seq_len)
        _number("objective.max_seq_len", o.max_seq_len, o.base_seq_len, low_ok=False)
        _number("objective.base_shift", o.base_shift)
        _number("objective.max_shift", o.max_shift)
    _positive("objective.teacher_guidance", o.teacher_guidance, zero_ok=True)
    _positive("objective.student_steps", o.student_steps, zero_ok=True)
    if o.kind in DISTILLATION:
        if o.teacher is None:
            raise ValueError(
                f"objective.kind {o.kind} distils a teacher: set objective.teacher to its diffusers folder"
            )
        model_folder(o.teacher, "objective.teacher")
        if o.caption_dropout and o.teacher_guidance != 1.0:
            raise ValueError(
                "objective.caption_dropout with a guided teacher (objective.teacher_guidance "
                f"{o.teacher_guidance:g}): the guided target has no unconditional counterpart to learn; "
                "remove objective.caption_dropout"
            )
    elif o.teacher is not None or o.teacher_guidance != 1.0:
        raise ValueError(
            "objective.teacher and objective.teacher_guidance are used by the kinds "
            f"{' and '.join(DISTILLATION)}, not by {o.kind}; remove them or set objective.kind"
        )
    if o.kind == "progressive" and o.student_steps < 1:
        raise ValueError(
            "objective.kind progressive needs objective.student_steps: the student's number of steps "
            "(the teacher takes two for each), e.g. 4"
        )
    if o.kind in ("flow", "guidance") and o.student_steps:
        raise ValueError(
            f"objective.student_steps is used by the kinds progressive and reflow, not by {o.kind}; remove it"
        )


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


def _yaml_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    break
                if first is not None:
                    raise ValueError(
                        f"line {line}: key {key!r} is given twice in one mapping (first on line {first}); "
                        "keep one of them"
                    )
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _parse_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: builds plain values only


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` overrides (values parsed as YAML) on a nested dict, in place."""
    given: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=3e-4)")
        *parents, leaf = key.split(".")
        if not all(parents) or not leaf:
            raise ValueError(f"override {item!r}: {key!r} has an empty part; write e.g. optimizer.lr=3e-4")
        if key in given:
            raise ValueError(f"override {key} is given twice on the command line; give it once")
        given.add(key)
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} holds a value, not a section")
            node = child
        try:
            node[leaf] = _parse_yaml(raw) if raw.strip() else None
        except ValueError as err:
            raise ValueError(f"override {item!r}: {err}") from err
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``path`` may name a shipped example config: ``shipped:finetune_tiny_shapes`` (see ``example_configs``).
    A key written twice in one mapping of the file (or twice among the overrides) is an error.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if str(path).startswith(SHIPPED):
            path = shipped(str(path), example_configs(), "example config", "the config")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            data = _parse_yaml(path.read_text(encoding="utf-8")) or {}
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
            )
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def save_config(config: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
