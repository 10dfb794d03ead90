"""What a run writes besides checkpoints: the validation grid and the final diffusers folder.

``validation_grid`` renders the fixed validation prompts (rows) and seeds (columns) with the model being
trained, through the conditioner's pipeline, into one PNG per step; ``export_final`` writes the trained
transformer as a diffusers folder (with the VAE and text encoders when the run has them) and, for a LoRA run,
the adapter file beside it. A pipeline folder gets an ``mmdit_flow.json`` (``mmdit_flow.pipelines.defaults``)
whose size and ``max_sequence_length`` are those of the training, so that the pipeline samples as trained; the
rest (steps, guidance, vocabulary of the frozen text encoders) is the base model's. Both take the model as it
should be written: the trainer applies the EMA weights first when there are any.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from mmdit_flow.pipelines.defaults import ModelDefaults
from mmdit_flow.training.cache import Conditioner
from mmdit_flow.training.config import TrainConfig


def validation_grid(model: nn.Module, conditioner: Conditioner, config: TrainConfig, step: int) -> Path:
    """Images for the fixed prompts (rows) and seeds (columns) as one PNG in <output.dir>/validation/."""
    import numpy as np
    from PIL import Image

    o, pipe = config.output, conditioner.pipe
    was_training, transformer = model.training, pipe.transformer
    pipe.transformer = model.eval()
    try:
        rows = []
        for prompt in o.validation_prompts:
            images = pipe(
                [prompt] * len(o.validation_seeds), seed=list(o.validation_seeds), steps=o.validation_steps,
                guidance=o.validation_guidance, height=config.data.resolution, width=config.data.resolution,
                output="np", progress=False, max_sequence_length=config.model.max_sequence_length,
            )  # fmt: skip
            rows.append(np.concatenate(list(images), axis=1))  # [H, S * W, 3]
    finally:
        pipe.transformer = transformer
        model.train(was_training)
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    path = Path(o.dir) / "validation" / f"step-{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def export_final(
    model: nn.Module,
    conditioner: Conditioner | None,
    config: TrainConfig,
    *,
    student: dict[str, Any] | None = None,
) -> Path:
    """A diffusers folder in <output.dir>/final (LoRA merged; the LoRA file itself in <output.dir>/lora).

    ``student``: defaults of a few-step student (``objectives.student_defaults``: steps, guidance,
    distilled_steps) that replace the base model's in ``mmdit_flow.json``."""
    out = Path(config.output.dir)
    if config.lora.rank:
        from mmdit_flow.training.lora import merged_copy, save_lora

        save_lora(model, out / "lora" / "pytorch_lora_weights.safetensors")
        model = merged_copy(model)
    if conditioner is None:
        from mmdit_flow.weights import save_transformer

        return save_transformer(model, out / "final" / "transformer", format="diffusers").parent
    from mmdit_flow.pipelines.defaults import FILE
    from mmdit_flow.weights.io import write_json
    from mmdit_flow.weights.transformer import family_of_model

    components = conditioner.pipe.components
    saved = components.transformer, components.transformer_config
    components.transformer = model
    components.transformer_config = family_of_model(model)[0].config_to_diffusers(model.config)
    try:
        folder = conditioner.pipe.save_pretrained(out / "final")
    finally:
        components.transformer, components.transformer_config = saved
    defaults = dataclasses.replace(trained_defaults(conditioner.pipe.defaults, config), **(student or {}))
    write_json(defaults.to_json(), out / "final" / FILE)
    return folder


def trained_defaults(base: ModelDefaults, config: TrainConfig) -> ModelDefaults:
    """The base model's defaults with the size and T5 length of this training (a resolved config).

    ``trained_sizes`` spans the base model's and this run's image sides (every bucket side with buckets).
    """
    from mmdit_flow.training.data import make_buckets

    d = config.data
    buckets = make_buckets(d.resolution, d.bucket_step, d.max_aspect) if d.buckets else [(d.resolution,) * 2]
    sides = [s for b in buckets for s in b] + list(base.trained_sizes or ())
    return dataclasses.replace(
        base, height=d.resolution, width=d.resolution, max_sequence_length=config.model.max_sequence_length,
        trained_sizes=(min(sides), max(sides)), recorded=True,
    )  # fmt: skip
