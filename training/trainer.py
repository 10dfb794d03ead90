"""The training main around accelerate: ``accelerate launch -m mmdit_flow.training CONFIG.yaml [key=value]``.

One optimizer step (``train_step``) takes one step batch (see ``mmdit_flow.training.data``), split into
``grad_accum`` micro-batches of ``data.batch_size`` per process. Each micro-batch gives the flow-matching loss

    L = mean_b w(t_b) * mean_i (v_theta(x_t, t_b, txt_b, vec_b) - (noise_b - x0_b))_i^2,
    x_t = (1 - t) x0 + t noise,   t = shift(t0),  t0 ~ scheme

computed by ``mmdit_flow.flow.cfm_loss`` in fp32 (the network may run in bf16 under autocast; the weights stay
fp32). ``L / grad_accum`` is back-propagated, gradients synchronised across processes only on the last
micro-step, so k micro-steps equal one step on the combined batch. Then: a non-finite loss or gradient norm
on any process skips the step (logged; ``max_nonfinite`` in a row abort the run, naming the step); else the
gradients are clipped, AdamW steps, the LR schedule steps (it counts optimizer steps), the EMA weights follow.

Every random draw of a sample (timestep, noise, caption dropout per text encoder, crop, flip) comes from the
sample's own seed, a function of (run seed, step, position in the step batch): a run is the same whatever the
number of processes or micro-steps, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdit_flow.flow import cfm_loss, flux_mu, sample_t, shift_t
from mmdit_flow.training import objectives
from mmdit_flow.training.cache import CachedDataset, Conditioner, TextParts, combine, drop_captions
from mmdit_flow.training.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saved_record,
)
from mmdit_flow.training.config import TrainConfig, model_folder, save_config
from mmdit_flow.training.data import (
    BadFiles,
    ImageFolderDataset,
    Layout,
    ShardStream,
    StepSampler,
    collate,
    sample_seed,
    scan_folder,
)
from mmdit_flow.training.ema import EMA
from mmdit_flow.training.export import export_final, validation_grid
from mmdit_flow.training.resolve import (
    check_family,
    check_sharding,
    check_size,
    pretrained_config,
    resolve_config,
    transformer_config,
)
from mmdit_flow.training.run_info import check_resume, plan, run_record, stopped, wrote

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient."""


# ------------------------------------------------------------------------------------------ run state


@dataclass
class TrainState:
    """Counters saved in every checkpoint (as JSON, in ``train_state.json``)."""

    step: int = 0  # step batches consumed: optimizer steps plus skipped ones
    optimizer_steps: int = 0
    skipped: int = 0
    nonfinite_in_row: int = 0
    bad_files: dict[str, str] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        if set(state) != names:
            raise ValueError(f"train state has fields {sorted(state)}, expected {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, value)


# ------------------------------------------------------------------------------------- model, optimizer


def build_model(config: TrainConfig) -> nn.Module:
    """A preset SD3 or Flux transformer (``model.overrides`` applied) in fp32, or ``model.pretrained``'s
    (with ``model.overrides: {guidance_embed: true}``, a Flux model without guidance embedding gains one
    that leaves it unchanged: ``add_guidance_embedding``)."""
    m = config.model
    if m.preset is not None:
        from mmdit_flow.models.flux import FluxConfig, FluxTransformer
        from mmdit_flow.models.sd3 import SD3Transformer

        shapes = transformer_config(config)
        model = (FluxTransformer if isinstance(shapes, FluxConfig) else SD3Transformer)(shapes)
    else:
        from mmdit_flow.weights import load_transformer

        path = Path(model_folder(m.pretrained))
        if (path / "transformer").is_dir():
            path = path / "transformer"
        model = load_transformer(path, device="cpu", dtype=torch.float32)
        wanted = pretrained_config(model.config, config)  # checks model.overrides against the folder
        if getattr(wanted, "guidance_embed", False) != getattr(model.config, "guidance_embed", False):
            model = add_guidance_embedding(model)
            n = sum(p.numel() for p in model.guidance_in.parameters())
            logger.info(
                "model.overrides.guidance_embed: added a guidance embedding to %s (guidance_in, %d "
                "parameters, its output layer zero: the model starts as the folder's at every guidance)",
                path, n,
            )  # fmt: skip
        elif m.overrides:
            logger.info(
                "model.overrides.guidance_embed: %s has guidance_embed=%s already",
                path,
                wanted.guidance_embed,
            )
    model.gradient_checkpointing = m.gradient_checkpointing
    return model.float().train()


def add_guidance_embedding(model: nn.Module) -> nn.Module:
    """A guidance-embedded copy of a Flux ``model`` without one, equal to it for every guidance input.

    Flux adds the guidance embedding ``guidance_in(g)`` to the timestep embedding (as diffusers'
    ``CombinedTimestepGuidanceTextProjEmbeddings`` does), so a ``guidance_in`` whose output layer is zero
    (weight and bias) adds exactly 0; its input layer is initialised as ``FluxTransformer`` initialises its
    embedders, so the output layer gets gradients from the first step. Every other tensor is ``model``'s own
    (shared, not copied); the keys must match exactly."""
    from mmdit_flow.models.flux import FluxTransformer

    if model.config.guidance_embed:
        raise ValueError("add_guidance_embedding: the model has a guidance embedding already")
    device = next(model.parameters()).device
    with torch.device("meta"):
        student = FluxTransformer(dataclasses.replace(model.config, guidance_embed=True))
    result = student.load_state_dict(model.state_dict(), strict=False, assign=True)
    added = {f"guidance_in.{k}" for k in student.guidance_in.state_dict()}
    if result.unexpected_keys or set(result.missing_keys) != added:
        raise RuntimeError(
            "add_guidance_embedding: the guidance-embedded Flux model expects exactly the keys of the model "
            f"plus {sorted(added)}; missing {sorted(set(result.missing_keys) - added)}, unexpected "
            f"{sorted(result.unexpected_keys)}"
        )
    embedder = student.guidance_in.to_empty(device=device)
    with torch.no_grad():
        nn.init.normal_(embedder.in_layer.weight, std=0.02)
        nn.init.zeros_(embedder.in_layer.bias)
        nn.init.zeros_(embedder.out_layer.weight)
        nn.init.zeros_(embedder.out_layer.bias)
    student.attention_backend = model.attention_backend
    return student.train(model.training)


def lr_factor(step: int, schedule: Any) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then constant, linear or cosine decay."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    span = max(1, schedule.max_steps - schedule.warmup_steps)
    p = min(1.0, (step - schedule.warmup_steps) / span)
    low = schedule.min_lr_ratio
    if schedule.lr_schedule == "linear":
        return 1 - (1 - low) * p
    if schedule.lr_schedule == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule.lr_schedule == "constant":
        return 1.0
    raise ValueError(f"schedule.lr_schedule: unknown schedule {schedule.lr_schedule!r}")


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    o = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (with LoRA, check lora.target_modules)")
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config.schedule))
    return opt, sched


# ------------------------------------------------------------------------------------------- the step


@dataclass
class Context:
    """What a step needs besides the batch."""

    accelerator: Any
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    config: TrainConfig
    state: TrainState
    layout: str  # text layout: "sd3" | "flux"
    encoders: tuple[str, ...]
    empty: TextParts  # each encoder's embedding of "", [1, ...]
    conditioner: Conditioner | None = None  # None when training from a cache
    ema: EMA | None = None
    record: dict[str, Any] | None = None  # what kind of run this is, saved in every checkpoint
    teacher: objectives.Teacher | None = None  # guidance and progressive distillation
    grid: objectives.Grid | None = None  # the student's sampling grid (objective.student_steps > 0)


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and processes (nan when skipped for a non-finite loss)
    grad_norm: float
    lr: float
    skipped: bool


def sample_draws(
    seeds: torch.Tensor,
    shape: tuple[int, ...],
    objective: Any,
    encoders: tuple[str, ...],
    grid: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per sample, from its own generator: t [B] (scheme, then shift), noise [B, *shape], dropout flags.

    With ``grid`` = N > 0 the first value is instead the index [B] (int64) of a step of the N-step sampling
    grid, uniform over the N steps (``objectives.Grid`` turns it into times). ``caption_dropout``:
    ``{encoder: p}`` or ``{all: p}`` drop each encoder independently; ``{joint: p}`` also drops all of a
    sample's encoders together with probability ``p``.
    """
    ts, drops, noises, joints = [], [], [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        if grid:
            ts.append(torch.randint(grid, (1,), generator=g))
        else:
            t = sample_t(
                1, objective.scheme, generator=g, mean=objective.logit_mean, std=objective.logit_std,
                scale=objective.mode_scale,
            )  # fmt: skip
            ts.append(shift_t(t, objective.shift) if objective.shift != 1.0 else t)
        drops.append(torch.rand(len(encoders), generator=g))
        noises.append(torch.randn(shape, generator=g))
        if "joint" in objective.caption_dropout:  # drawn last, so configs without it keep their draws
            joints.append(torch.rand(1, generator=g))
    drop = torch.stack(drops)  # [B, E]
    p = torch.tensor(
        [objective.caption_dropout.get(n, objective.caption_dropout.get("all", 0.0)) for n in encoders]
    )
    flags = drop < p
    if joints:  # every encoder of the sample empty at once: the unconditional case that CFG uses
        flags |= torch.stack(joints) < objective.caption_dropout["joint"]
    return torch.cat(ts), torch.stack(noises), {n: flags[:, i] for i, n in enumerate(encoders)}


DEFAULT_GUIDANCE = 3.5  # diffusers' train_dreambooth_flux.py --guidance_scale default (and FLUX.1-dev's)


def sample_guidance(seeds: torch.Tensor, objective: Any) -> torch.Tensor:
    """The guidance input [B] of a guidance-embedded (Flux dev) model: ``objective.guidance``'s one value
    (3.5 unset), or a value drawn uniformly from its range [low, high] by each sample's own generator (a
    stream of its own, so that the other draws do not change with it)."""
    values = objective.guidance or [DEFAULT_GUIDANCE]
    if len(values) == 1:
        return torch.full((len(seeds),), float(values[0]))
    low, high = values
    u = [
        torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(int(s), "guidance"))) for s in seeds
    ]
    return low + (high - low) * torch.cat(u)


def flux_shift(t: torch.Tensor, image_tokens: int, objective: Any) -> torch.Tensor:
    """``objective.dynamic_shift``: t shifted by exp(mu), mu linear in the image tokens (the line through
    (base_seq_len, base_shift) and (max_seq_len, max_shift), diffusers' ``calculate_shift``)."""
    o = objective
    return shift_t(
        t, math.exp(flux_mu(image_tokens, o.base_seq_len, o.max_seq_len, o.base_shift, o.max_shift))
    )


def model_inputs(
    model: nn.Module, x0: torch.Tensor, t: torch.Tensor, seeds: torch.Tensor, objective: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The family-specific parts of a step: for Flux, ``t`` with the resolution-dependent shift (when set)
    and the guidance input of a guidance-embedded model; unchanged t and no extra input for SD3."""
    config = getattr(model, "config", None)
    if not hasattr(config, "guidance_embed"):  # SD3
        return t, {}
    if objective.dynamic_shift:
        t = flux_shift(t, (x0.shape[-2] // 2) * (x0.shape[-1] // 2), objective)
    if not config.guidance_embed:
        return t, {}
    return t, {"guidance": sample_guidance(seeds, objective).to(x0.device, torch.float32)}


def micro_loss(ctx: Context, batch: dict[str, Any]) -> torch.Tensor:
    """The fp32 loss of one micro-batch: flow matching (``objective.kind`` flow, reflow) or distillation."""
    device, o = ctx.accelerator.device, ctx.config.objective
    if "latents" in batch:
        x0, parts = batch["latents"].to(device).float(), batch["text"]
    else:
        with torch.no_grad():
            x0 = ctx.conditioner.encode_images(batch["pixels"].to(ctx.conditioner.device)).to(device)
            parts = ctx.conditioner.encode_text(batch["caption"])
    steps = ctx.grid.steps if ctx.grid is not None else 0
    t, noise, drop = sample_draws(batch["seed"], tuple(x0.shape[1:]), o, ctx.encoders, grid=steps)
    if o.kind == "reflow":
        noise = batch["noise"]  # the coupling's own noise, paired with its latent
    parts = {n: {k: v.to(device) for k, v in kinds.items()} for n, kinds in parts.items()}
    txt, vec = combine(drop_captions(parts, ctx.empty, drop), ctx.layout)

    extra: dict[str, torch.Tensor] = {}
    if ctx.grid is None:  # t drawn freely (flow, reflow, guidance): Flux's shift and guidance input apply
        t, extra = model_inputs(getattr(ctx.model, "module", ctx.model), x0, t, batch["seed"], o)  # DDP

    def velocity(x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        with ctx.accelerator.autocast():
            return ctx.model(x, t, txt, vec, **extra).float()

    noise = noise.to(device)
    if o.kind in ("flow", "reflow"):
        t = ctx.grid.ts[t] if ctx.grid is not None else t
        return cfm_loss(velocity, x0, t=t.to(device), noise=noise, weighting=o.weighting, txt=txt, vec=vec)
    # a guidance-embedded student's guidance input is the CFG scale of its target
    teacher = ctx.teacher.velocity_fn(ctx.accelerator, ctx.empty, ctx.layout, len(x0), extra.get("guidance"))
    if o.kind == "guidance":
        return objectives.guidance_loss(velocity, teacher, x0, noise, t.to(device), txt=txt, vec=vec)
    t, t_mid, t_next = ctx.grid.times(t)
    return objectives.progressive_loss(velocity, teacher, x0, noise, t, t_mid, t_next, txt=txt, vec=vec)


def split_micro(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """A process's step batch -> its micro-batches of ``size`` samples (nested dicts split alike)."""
    n = len(batch["seed"])

    def part(value: Any, i: int) -> Any:
        if isinstance(value, dict):
            return {k: part(v, i) for k, v in value.items()}
        if isinstance(value, (torch.Tensor, list)) and len(value) == n:
            return value[i : i + size]
        return value

    return [{k: part(v, i) for k, v in batch.items() if k != "bad"} for i in range(0, n, size)]


def train_step(ctx: Context, batch: dict[str, Any]) -> StepResult:
    """One optimizer step on this process's share of a step batch (see the module docstring)."""
    acc, cfg, state = ctx.accelerator, ctx.config, ctx.state
    micro = split_micro(batch, cfg.data.batch_size)
    losses = []
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(ctx.model):
            loss = micro_loss(ctx, mb)
            acc.backward(loss / len(micro))
        losses.append(loss.detach())
    local = torch.stack(losses).mean()
    flags = torch.stack([local.nan_to_num(0.0), (~torch.isfinite(local)).float()]).to(acc.device)
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    mean_loss = float(flags[0]) / acc.num_processes
    nonfinite = bool(flags[1] > 0)
    grad_norm = float("nan")
    if not nonfinite:
        max_norm = cfg.optimizer.grad_clip or float("inf")
        grad_norm = float(acc.clip_grad_norm_(ctx.model.parameters(), max_norm))
        nonfinite = not math.isfinite(grad_norm)
    lr = ctx.optimizer.param_groups[0]["lr"]
    if nonfinite:
        ctx.optimizer.zero_grad(set_to_none=True)
        state.skipped += 1
        state.nonfinite_in_row += 1
        logger.warning(
            "step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped (%d in a row)",
            state.step + 1, float(local), grad_norm, state.nonfinite_in_row,
        )  # fmt: skip
        if state.nonfinite_in_row >= cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient, the last at "
                f"step {state.step + 1}; lower optimizer.lr, use bf16 instead of fp16, or check the data"
            )
        state.step += 1
        return StepResult(float("nan"), grad_norm, lr, True)
    ctx.optimizer.step()
    if not acc.optimizer_step_was_skipped:  # fp16 loss scaling may skip on overflow
        ctx.scheduler.step()
        state.optimizer_steps += 1
        if ctx.ema is not None and state.optimizer_steps % cfg.ema.every == 0:
            ctx.ema.update(acc.unwrap_model(ctx.model))
    ctx.optimizer.zero_grad(set_to_none=True)
    state.nonfinite_in_row = 0
    state.step += 1
    return StepResult(mean_loss, grad_norm, lr, False)


# ------------------------------------------------------------------------------------------------ data


def make_loader(config: TrainConfig, layout: Layout, start_step: int) -> tuple[Any, BadFiles, Any]:
    """(DataLoader of this process's step batches from ``start_step`` on, bad-file tally, dataset)."""
    d = config.data
    loader_kw = {"num_workers": d.num_workers, "persistent_workers": d.num_workers > 0}
    if d.cache_dir and (Path(d.cache_dir) / "index.json").is_file():
        dataset: Any = CachedDataset(d.cache_dir)
        bad = BadFiles(total=len(dataset), max_fraction=d.max_bad_fraction)
    elif d.cache_dir and not d.path:
        raise ValueError(
            f"data.cache_dir {d.cache_dir!r} holds no cache; run `mmdit-flow cache CONFIG` first"
        )
    elif d.path:
        if d.cache_dir:
            raise ValueError(
                f"data.cache_dir {d.cache_dir!r} holds no finished cache: run `mmdit-flow cache CONFIG` "
                "first, or unset data.cache_dir to train from the images"
            )
        records, bad = scan_folder(d.path, d)
        bad.check()
        dataset = ImageFolderDataset(records, d)
    else:
        stream = ShardStream(d.shards, d, layout, config.seed, start_step)
        bad = BadFiles(total=0, max_fraction=d.max_bad_fraction)
        return torch.utils.data.DataLoader(stream, batch_size=None, **loader_kw), bad, stream
    sampler = StepSampler(dataset.groups, layout, config.seed, start_step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kw)
    return loader, bad, dataset


# ------------------------------------------------------------------------------------------ signals


class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and exits. A second Ctrl-C stops at once.

    One message per stop: only the main process speaks (a launcher signals every process), and only for
    the first signal.
    """

    def __init__(self, speak: bool = True) -> None:
        self.signum: int | None = None
        self.speak = speak
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first, self.signum = self.signum is None, signum
        if first and self.speak:
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            logger.warning(
                "received %s: saving a checkpoint after this step%s", signal.Signals(signum).name, again
            )

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


# -------------------------------------------------------------------------------------------------- main


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    conditioner: Conditioner | None = None,
    on_step: Callable[[int, StepResult], None] | None = None,
) -> int:
    """Train (or resume) as ``config`` says; returns the exit code (0 done, 128 + signal when stopped).

    Values the config leaves to the model (``data.resolution``, ``model.max_sequence_length``) are resolved
    first (``mmdit_flow.training.resolve``) and the image size checked against the model, before anything
    is encoded; the resolved config is what is logged, saved and exported.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    out = Path(config.output.dir)
    acc = Accelerator(
        mixed_precision=config.precision.mixed_precision,
        log_with=list(config.output.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    check_sharding(acc.distributed_type)
    if config.precision.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(config.seed)
    model = model if model is not None else build_model(config)
    cfg, size = resolve_config(config, getattr(model, "config", None))
    check_size(cfg, size)
    check_family(cfg, getattr(model, "config", None))
    components = cfg.model.components or cfg.model.pretrained
    needs_encoders = not cfg.data.cache_dir or cfg.output.validation_every or cfg.output.save_final
    if conditioner is None and components and needs_encoders:
        conditioner = Conditioner.from_pretrained(
            components, device=acc.device, max_sequence_length=cfg.model.max_sequence_length
        )
    if conditioner is None and not cfg.data.cache_dir:
        raise ValueError("training from images needs the VAE and text encoders: set model.components")
    if cfg.output.validation_every and (conditioner is None or not cfg.output.validation_prompts):
        raise ValueError("output.validation_every needs model.components and output.validation_prompts")

    model = model.float().train()
    model.attention_backend = cfg.model.attention_backend  # the config decides, for a given model too
    if cfg.lora.rank:
        from mmdit_flow.training.lora import add_lora

        model = add_lora(model, cfg.lora)
    record = run_record(cfg, model)
    if cfg.model.compile:  # in place: parameters, state-dict keys, EMA and checkpoints are unchanged
        model.compile()
    ema = EMA(model, cfg.ema.decay) if cfg.ema.decay else None
    optimizer, scheduler = make_optimizer(model, cfg)
    model, optimizer = acc.prepare(model, optimizer)
    state = TrainState()

    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        check_resume(saved_record(resume), record, ckpt_root)  # before any state dict is read
        load_checkpoint(acc, resume, state=own_state(state, scheduler), ema=ema)
        logger.info("resumed from %s at step %d", resume, state.step)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        acc.init_trackers("mmdit-flow", config=_flat(dataclasses.asdict(cfg)))

    layout = Layout(cfg.data.batch_size, acc.num_processes, acc.process_index, cfg.optimizer.grad_accum)
    loader, bad, dataset = make_loader(cfg, layout, state.step)
    bad.paths.update(state.bad_files)
    if isinstance(dataset, CachedDataset):
        text_layout, encoders, empty = dataset.layout, tuple(dataset.encoders), dataset.empty
    else:
        text_layout, encoders = conditioner.layout, conditioner.names
        empty = conditioner.encode_text([""])
    empty = {n: {k: v.to(acc.device) for k, v in kinds.items()} for n, kinds in empty.items()}
    unknown = set(cfg.objective.caption_dropout) - set(encoders) - {"all", "joint"}
    if unknown:
        raise ValueError(
            f"objective.caption_dropout names {sorted(unknown)}; the text encoders are {', '.join(encoders)} "
            "(or 'all' for each of them, 'joint' for all of them at once)"
        )
    if acc.is_main_process:
        what = _data_description(cfg, dataset)
        unwrapped = acc.unwrap_model(model)
        logger.info("%s", plan(cfg, unwrapped, data=what, processes=acc.num_processes, start_step=state.step))
    teacher, grid = objectives.prepare(cfg, dataset, acc.device)
    ctx = Context(
        acc, model, optimizer, scheduler, cfg, state, text_layout, encoders, empty, conditioner, ema, record,
        teacher, grid,
    )  # fmt: skip
    code = _loop(ctx, loader, bad, tqdm, on_step)
    acc.wait_for_everyone()
    final = None
    if code == 0 and cfg.output.save_final and acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        with ema.applied(unwrapped) if ema else contextlib.nullcontext():
            final = export_final(
                unwrapped, conditioner, cfg, student=objectives.student_defaults(cfg, dataset, grid)
            )
    if code == 0 and acc.is_main_process:
        logger.info("%s", wrote(cfg, final, latest_checkpoint(ckpt_root)))
    # let go of the DDP wrapper while the process group lives: its reducer holds the group, and freed after
    # end_training destroyed it, gloo's destructor waited forever for threads of a peer that had exited
    del ctx, model, optimizer
    acc.free_memory()
    acc.wait_for_everyone()
    acc.end_training()
    return code


def _data_description(config: TrainConfig, dataset: Any) -> str:
    d = config.data
    if isinstance(dataset, CachedDataset):
        return f"{len(dataset)} cached images in {d.cache_dir}"
    if d.path:
        return f"{len(dataset)} images in {d.path}"
    return (
        f"streamed shards ({len(d.shards)} pattern{'s' if len(d.shards) > 1 else ''}: {', '.join(d.shards)})"
    )


def _loop(ctx: Context, loader: Any, bad: BadFiles, tqdm: Any, on_step: Any) -> int:
    acc, cfg, state, o = ctx.accelerator, ctx.config, ctx.state, ctx.config.output
    bar = tqdm(
        total=cfg.schedule.max_steps, initial=state.step, disable=not (acc.is_main_process and o.progress),
        desc="train", unit="step",
    )  # fmt: skip
    images_per_step = cfg.data.batch_size * acc.num_processes * cfg.optimizer.grad_accum
    batches = iter(loader)
    with StopRequest(speak=acc.is_main_process) as stop:
        while state.step < cfg.schedule.max_steps:
            start = time.perf_counter()
            batch = next(batches)
            for path, reason in batch.get("bad", []):
                bad.add(path, reason)
            bad.total += int(batch.get("seen", 0))
            state.bad_files = dict(bad.paths)
            result = train_step(ctx, batch)
            speed = images_per_step / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", img_s=f"{speed:.1f}")
            if state.step % o.log_every == 0 or state.step == cfg.schedule.max_steps:
                logs = {
                    "loss": result.loss,
                    "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "images_per_s": speed,
                }
                acc.log(
                    {**logs, "skipped_steps": state.skipped, "bad_files": len(bad.paths)}, step=state.step
                )
            if on_step is not None:
                on_step(state.step, result)
            too_many = bool(bad.paths) and bad.fraction > bad.max_fraction
            flags = torch.tensor([float(stop.signum is not None), float(too_many)])
            if acc.num_processes > 1:
                flags = acc.reduce(flags.to(acc.device), reduction="sum").cpu()
            if flags[1] > 0:
                save(ctx)
                bad.check()  # raises with the details on the process that saw them
                raise RuntimeError("another process found too many unreadable images; see its log")
            if state.step % o.checkpoint_every == 0 or flags[0] > 0:
                save(ctx)
            if o.validation_every and state.step % o.validation_every == 0 and acc.is_main_process:
                model = acc.unwrap_model(ctx.model)
                with ctx.ema.applied(model) if ctx.ema else contextlib.nullcontext():
                    path = validation_grid(model, ctx.conditioner, cfg, state.step)
                logger.info("validation grid: %s", path)
            if flags[0] > 0:
                bar.close()
                signum = int(stop.signum or signal.SIGTERM)  # another process was signalled: SIGTERM
                if acc.is_main_process:
                    name = signal.Signals(signum).name
                    logger.warning("%s", stopped(name, state.step, checkpoint_path(out_dir(cfg), state.step)))
                return 128 + signum
    bar.close()
    if state.step % o.checkpoint_every:
        save(ctx)
    if bad.paths:
        logger.warning("%s", bad.summary())
    return 0


def out_dir(config: TrainConfig) -> Path:
    return Path(config.output.dir) / "checkpoints"


def own_state(state: TrainState, scheduler: Any) -> dict[str, Any]:
    """What a checkpoint's ``train_state.json`` holds, by name."""
    return {"counters": state, "lr_scheduler": scheduler}


def save(ctx: Context) -> None:
    """A checkpoint of the current step (called on every process)."""
    keep, state = ctx.config.output.keep_checkpoints, own_state(ctx.state, ctx.scheduler)
    save_checkpoint(
        ctx.accelerator, out_dir(ctx.config), ctx.state.step, keep=keep, state=state, ema=ctx.ema,
        record=ctx.record,
    )  # fmt: skip
