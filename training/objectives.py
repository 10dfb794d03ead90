"""What the trainer needs beyond flow matching: reflow, guidance and progressive distillation.

``objective.kind`` (docs/training.md, "Few-step students"):

- ``flow``: flow matching on the data (``flow.cfm_loss``).
- ``reflow``: the same loss on a couplings folder (``mmdit-flow couplings``, read through ``data.cache_dir``),
  with each latent's own noise; with ``objective.student_steps`` = N only at the times of the N-step sampling
  grid, which distils the couplings into an N-step sampler.
- ``guidance``: the student learns the teacher's CFG-guided velocity (``objective.teacher_guidance``) in one
  forward (``mmdit_flow.distill.guidance_loss``). A guidance-embedded Flux student (FLUX.1-dev's way) learns
  it at the scales of ``objective.guidance`` (one value or a range drawn per sample), each given to it as
  its guidance input.
- ``progressive``: one student step over a step of the N-step grid matches two teacher steps
  (``mmdit_flow.distill.progressive_loss``); a guided teacher distils guidance in the same round.

The math is in ``mmdit_flow.distill``; this module loads the frozen teacher, builds the student's time grid
from the scheduler the exported student folder gets, and says what the student's ``mmdit_flow.json`` records
(its steps and guidance, so that the pipeline samples it as it was made).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdit_flow.distill import grid_midpoints, guidance_loss, progressive_loss
from mmdit_flow.flow import VelocityFn
from mmdit_flow.training.cache import CachedDataset, TextParts, combine
from mmdit_flow.training.config import ConfigError, TrainConfig, model_folder

__all__ = [
    "Grid",
    "Teacher",
    "embedded_guidance",
    "guidance_loss",
    "prepare",
    "progressive_loss",
    "student_defaults",
]

logger = logging.getLogger(__name__)


@dataclass
class Grid:
    """The student's N-step sampling grid: times ``ts`` [N + 1] (1 down to 0) and interval midpoints [N]."""

    steps: int
    shift: float
    ts: torch.Tensor
    mids: torch.Tensor

    @classmethod
    def for_scheduler(cls, steps: int, shift: float) -> Grid:
        from mmdit_flow.sampling import timesteps

        ts = timesteps(steps, shift=shift, grid="scheduler")
        return cls(steps, shift, ts, grid_midpoints(ts, shift))

    def sub_grids(self) -> tuple[int, ...]:
        """The step counts n <= N whose grids evaluate the model only at times of this one: a student trained
        to reach each time's straight-line target (reflow on the grid) samples in any of them. With this
        scheduler's grid (ending at sigma_min, then 0) the 4-step grid holds the 2- and 1-step ones."""
        from mmdit_flow.sampling import timesteps

        def inside(n: int) -> bool:
            times = timesteps(n, shift=self.shift, grid="scheduler")[:-1]
            return bool((times[:, None] - self.ts[None, :-1]).abs().min(1).values.max() < 1e-6)

        return tuple(n for n in range(1, self.steps + 1) if inside(n))

    def times(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_i, midpoint, t_(i+1)) for step indices [B]."""
        return self.ts[index], self.mids[index], self.ts[index + 1]


TEACHER_EMBEDDED_GUIDANCE = 1.0  # the guidance input of a guidance-embedded Flux teacher under CFG


@dataclass
class Teacher:
    """A frozen transformer and the CFG scale of its target velocity."""

    model: nn.Module
    guidance: float
    folder: Path

    def velocity_fn(
        self,
        accelerator: Any,
        empty: TextParts,
        layout: str,
        batch: int,
        scale: torch.Tensor | None = None,
    ) -> VelocityFn:
        """The teacher's (guided) velocity, ``fn(x, t, txt, vec)``, under the run's autocast, in fp32.

        ``scale``: per-sample CFG scales [B] in place of ``guidance`` (a guidance-embedded Flux student
        learns the teacher's CFG velocity at the scale it is given as its guidance input). A guidance-embedded
        teacher gets ``TEACHER_EMBEDDED_GUIDANCE`` as its own guidance input: its conditional and
        unconditional velocities without distilled guidance, which CFG then combines."""
        from mmdit_flow.sampling import cfg

        embedded = getattr(getattr(self.model, "config", None), "guidance_embed", False)
        extra = {"guidance": TEACHER_EMBEDDED_GUIDANCE} if embedded else {}

        def fn(x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return self.model(x, t, txt, vec, **extra).float()

        if scale is None and self.guidance == 1.0:
            return fn
        txt, vec = combine(empty, layout)  # the empty prompt, as the pipeline's negative: [1, ...]
        w = self.guidance if scale is None else scale
        return cfg(fn, w, txt=txt.expand(batch, *txt.shape[1:]), vec=vec.expand(batch, -1))


def _scheduler_shift(folder: str, key: str) -> float:
    from mmdit_flow.weights.io import read_json

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ConfigError(
            f"objective.student_steps needs the scheduler the student is sampled with; {path} does not "
            f"exist ({key} must be a diffusers pipeline folder)"
        )
    config = read_json(path)
    if config.get("use_dynamic_shifting", False):
        raise ConfigError(
            f"{path} uses a resolution-dependent shift (use_dynamic_shifting); students are distilled on a "
            "fixed grid: use a scheduler with a static shift"
        )
    return float(config.get("shift", 1.0))


def load_teacher(config: TrainConfig, device: torch.device) -> Teacher:
    from mmdit_flow.weights import load_transformer

    o = config.objective
    folder = Path(model_folder(o.teacher, "objective.teacher"))
    if not folder.is_dir():
        raise ConfigError(
            f"objective.teacher {str(folder)!r} does not exist; for a progressive round it is the previous "
            "round's final folder (<its output.dir>/final): run that round first"
        )
    path = folder / "transformer" if (folder / "transformer").is_dir() else folder
    model = load_transformer(path, device="cpu", dtype=torch.float32).to(device).eval()
    model.requires_grad_(False)
    scales = o.guidance if o.kind == "guidance" and o.guidance is not None else [o.teacher_guidance]
    logger.info("teacher %s (CFG scale %s)", folder, " to ".join(f"{g:g}" for g in scales))
    return Teacher(model, o.teacher_guidance, folder)


def prepare(config: TrainConfig, dataset: Any, device: torch.device) -> tuple[Teacher | None, Grid | None]:
    """The teacher and the student grid that ``objective`` needs, each checked against the config."""
    o = config.objective
    couplings = isinstance(dataset, CachedDataset) and dataset.couplings is not None
    if o.kind == "reflow" and not couplings:
        raise ConfigError(
            "objective.kind reflow trains on couplings: set data.cache_dir to a folder written by "
            "`mmdit-flow couplings` (this run's data holds no noise to pair with)"
        )
    if o.kind != "reflow" and couplings:
        logger.warning(
            "data.cache_dir %s holds couplings, but objective.kind %s draws fresh noise: their noise is "
            "unused (set objective.kind=reflow to train on the pairs)", config.data.cache_dir, o.kind,
        )  # fmt: skip
    teacher = load_teacher(config, device) if o.teacher is not None else None
    grid = None
    if o.student_steps:
        folder, key = config.model.components or config.model.pretrained, "model.components"
        if folder is None and teacher is not None:
            folder, key = str(teacher.folder), "objective.teacher"
        if folder is None:
            raise ConfigError(
                "objective.student_steps needs the scheduler of the student's pipeline: set model.components"
            )
        grid = Grid.for_scheduler(o.student_steps, _scheduler_shift(model_folder(folder, key), key))
    return teacher, grid


def student_defaults(config: TrainConfig, dataset: Any, grid: Grid | None = None) -> dict[str, Any]:
    """What the student's ``mmdit_flow.json`` records beyond the base model's defaults: its step count
    and ``distilled_steps`` for a grid-trained student (a reflow student also every smaller grid whose times
    it was trained at, ``Grid.sub_grids``; a progressive one only its own, since its steps span its grid's
    intervals), guidance 1 for a student that learned a guided velocity (a guided teacher or guided
    couplings), so that one forward per step is the default. A guidance-embedded Flux student's guidance is
    its guidance input instead (``embedded_guidance``), which the pipelines feed to the model without CFG;
    its steps stay the base model's."""
    o = config.objective
    out: dict[str, Any] = {}
    if o.student_steps:
        out["steps"], out["distilled_steps"] = o.student_steps, (o.student_steps,)
        if o.kind == "reflow" and grid is not None:
            out["distilled_steps"] = grid.sub_grids()
    couplings = getattr(dataset, "couplings", None) if o.kind == "reflow" else None
    if o.kind == "guidance" and o.guidance is not None:  # a guidance-embedded Flux student
        out["guidance"] = embedded_guidance(o.guidance)
    elif o.teacher_guidance != 1.0 or (couplings is not None and float(couplings["guidance"]) != 1.0):
        out["guidance"] = 1.0
    return out


def embedded_guidance(scales: list[float]) -> float:
    """The guidance a guidance-distilled Flux student samples with by default (its guidance input, no CFG):
    the one scale it learned, or for a range [low, high] Flux's default 3.5 if the range holds it, else the
    nearer end."""
    from mmdit_flow.pipelines.defaults import FAMILY_GUIDANCE

    low, high = scales[0], scales[-1]
    return float(min(max(FAMILY_GUIDANCE["flux"], low), high))
