"""What a run tells its user, and what a checkpoint records of the run that wrote it.

Before the first step the trainer logs its plan (``plan``): what is trained (full or LoRA, trainable and total
parameters), the data (images, or streamed shards), steps and images per step, precision, and where it
writes; at the end, what it wrote (``wrote``); on a stop, how to resume (``stopped``).

Every checkpoint's ``train_state.json`` holds ``run_record``: full or LoRA (rank, alpha, targets), the model's
source, and the names and shapes of the trainable tensors (as a digest). A resume compares it with the
current config's record before loading anything (``check_resume``), so that resuming a LoRA run from a full
run's checkpoints (or the reverse, or with another model shape) says what changed instead of listing the
missing and unexpected keys of a state dict.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from torch import nn

from mmdit_flow.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def _count(n: int) -> str:
    """3_100_000 -> '3.10M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run_record(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """What a checkpoint of this run must match to be resumed (see the module docstring)."""
    m, lora = config.model, config.lora
    trainable = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    digest = hashlib.sha256(repr(sorted(trainable)).encode()).hexdigest()[:16]
    lo = {"rank": lora.rank, "alpha": lora.alpha or float(lora.rank), "target_modules": lora.target_modules}
    source = {"pretrained": m.pretrained} if m.pretrained else {"preset": m.preset, "overrides": m.overrides}
    o = config.objective
    objective: dict[str, Any] = {
        "kind": o.kind,
        "teacher_guidance": o.teacher_guidance,
        "student_steps": o.student_steps,
    }
    if o.guidance is not None:  # Flux's guidance input (a value or a range): what the model learns to take
        objective["guidance"] = [float(g) for g in o.guidance]
    return {
        "objective": objective,
        "training": "lora" if lora.rank else "full",
        "lora": lo if lora.rank else None,
        "model": source,
        "trainable": {
            "tensors": len(trainable),
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "digest": digest,
        },
    }


def describe(record: dict[str, Any]) -> str:
    """'a full fine-tune of X' / 'LoRA rank 4 (alpha 4, on attn.qkv, attn.proj) of X' / 'full training of
    preset sd3_medium from scratch'."""
    model = record["model"]
    source = f"of {model['pretrained']}" if "pretrained" in model else f"of preset {model['preset']}"
    if record["training"] == "lora":
        lo = record["lora"]
        return (
            f"LoRA rank {lo['rank']} (alpha {lo['alpha']:g}, on {', '.join(lo['target_modules'])}) {source}"
        )
    if "pretrained" in model:
        return f"a full fine-tune {source}"
    return f"full training {source} from scratch"


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], root: Path) -> None:
    """Refuse to resume from checkpoints that another kind of run wrote; see the module docstring."""
    if saved is None:  # a checkpoint from before records were kept: the state-dict check is all there is
        return
    fix = f"use another output.dir, or remove the checkpoints in {root} to start over"
    flow = {"kind": "flow", "teacher_guidance": 1.0, "student_steps": 0}  # records from before objectives
    if saved.get("objective", flow) != current["objective"]:
        was, now = saved.get("objective", flow), current["objective"]
        raise ConfigError(
            f"the checkpoints in {root} were written with objective {was}, this config has {now} "
            f"(objective.kind, teacher_guidance, student_steps, guidance): {fix}"
        )
    if (saved["training"], saved["lora"]) != (current["training"], current["lora"]):
        raise ConfigError(
            f"the checkpoints in {root} were written by {describe(saved)}; this config trains "
            f"{describe(current)}: {fix}"
        )
    was, now = saved["trainable"], current["trainable"]
    if was["digest"] != now["digest"]:
        raise ConfigError(
            f"the checkpoints in {root} were written for a model with {was['parameters']} trainable "
            f"parameters in {was['tensors']} tensors ({describe(saved)}); this config's model has "
            f"{now['parameters']} in {now['tensors']} ({describe(current)}): the model changed "
            f"(model.preset, model.overrides or model.pretrained); {fix}"
        )
    if saved["model"] != current["model"]:
        logger.warning(
            "the checkpoints in %s were written from %s, this config names %s (same shapes): resuming "
            "with the checkpoint's weights",
            root, saved["model"], current["model"],
        )  # fmt: skip


def plan(
    config: TrainConfig,
    model: nn.Module,
    *,
    data: str,
    processes: int,
    start_step: int,
) -> str:
    """The lines logged before the first step: what is trained, on what, how long, how, and where it goes."""
    c, out = config, Path(config.output.dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    record = run_record(config, model)
    per_step = c.data.batch_size * processes * c.optimizer.grad_accum
    start = f"resuming at step {start_step}" if start_step else "from step 0"
    precision = c.precision.mixed_precision
    precision = f"{precision} autocast, fp32 weights" if precision != "no" else "fp32"
    writes = [
        f"config in {out / 'config.yaml'}",
        f"checkpoints every {c.output.checkpoint_every} steps in {out / 'checkpoints'}",
    ]
    if c.output.trackers:
        writes.append(f"{', '.join(c.output.trackers)} logs in {out / 'logs'}")
    if c.output.save_final:
        writes.append(f"the final model in {out / 'final'}")
        if c.lora.rank:
            writes.append(f"the LoRA in {out / 'lora'}")
    if c.output.validation_every:
        writes.append(f"validation grids every {c.output.validation_every} steps in {out / 'validation'}")
    lines = [
        f"training {describe(record)}",
        f"  parameters  {_count(trainable)} trainable of {_count(total)} ({trainable} of {total})",
        f"  data        {data}, {c.data.resolution} px{' buckets' if c.data.buckets else ''}, "
        f"{c.model.max_sequence_length} T5 tokens",
        f"  steps       {c.schedule.max_steps} ({start}), {per_step} images a step "
        f"(batch {c.data.batch_size} x {processes} process{'es' if processes > 1 else ''} "
        f"x {c.optimizer.grad_accum} accumulation), "
        f"lr {c.optimizer.lr:g} {c.schedule.lr_schedule}",
        f"  precision   {precision}",
        f"  writes      {'; '.join(writes)}",
    ]
    return "\n".join(lines)


def wrote(config: TrainConfig, final: Path | None, last_checkpoint: Path | None) -> str:
    """The line logged at the end of a run: where everything went."""
    out = Path(config.output.dir)
    parts = [f"config in {out / 'config.yaml'}"]
    if last_checkpoint is not None:
        parts.append(f"last checkpoint {last_checkpoint}")
    if final is not None:
        parts.append(f"final model {final} (TextToImagePipeline.from_pretrained({str(final)!r}))")
        if config.lora.rank:
            parts.append(f"LoRA {out / 'lora' / 'pytorch_lora_weights.safetensors'}")
    return "done: " + "; ".join(parts)


def stopped(signal_name: str, step: int, checkpoint: Path) -> str:
    """The line logged when a signal stops the run."""
    return (
        f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}. Run the same command again to "
        f"resume from it (a run resumes from the newest checkpoint in {checkpoint.parent})"
    )
