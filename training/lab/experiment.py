"""One lab run: train every model on one data set, measure quality against function evaluations, draw it.

Quality is the exact W2 distance (``metrics.w2``) between ``n_test`` samples and ``n_test`` held-out data
points. Function evaluations (NFE) are counted, not assumed: every call of the network is counted. A budget
B in ``nfes`` gives each solver the most steps whose evaluations fit in B (euler 1 per step, midpoint 2,
rk4 4, heun 2 per step minus 1 because its last step onto t = 0 is an Euler step); the evaluations actually
used are stored beside each number. Diffusion samplers take one evaluation per scheduler step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmdit_flow.training.lab import data as lab_data
from mmdit_flow.training.lab import report
from mmdit_flow.training.lab.metrics import w2
from mmdit_flow.training.lab.train import LabTrainConfig

logger = logging.getLogger(__name__)

NFES = (1, 2, 4, 8, 16, 32, 100)
FLOW_MODELS = ("1-RF", "2-RF", "OT-CFM")
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


@dataclass(frozen=True)
class LabConfig:
    """Everything that sets a lab run's numbers; ``quick()`` is the seconds-long smoke-test preset."""

    smoke: bool = False  # a smoke test: its numbers show that the lab runs, not what the methods do
    train: LabTrainConfig = field(default_factory=LabTrainConfig)
    reflow_steps: int = 1500  # fine-tuning steps of 2-RF, started from 1-RF
    couplings: int = 20_000  # (noise, ODE(noise)) pairs generated from 1-RF for reflow
    coupling_method: str = "rk4"
    coupling_steps: int = 8  # 32 evaluations
    pd_rounds: tuple[int, ...] = (16, 8, 4, 2, 1)  # progressive distillation from 1-RF: students' steps
    pd_steps: int = 500  # training steps of each round
    n_test: int = 1500  # held-out points and samples per W2
    nfes: tuple[int, ...] = NFES
    path_steps: int = 100  # steps of the trajectories that are drawn
    gif_frames: int = 40

    @classmethod
    def quick(cls) -> LabConfig:
        return cls(
            smoke=True,
            train=LabTrainConfig(steps=100, batch=256, hidden=64, depth=2),
            reflow_steps=50,
            couplings=2000,
            coupling_steps=5,
            pd_rounds=(4, 2, 1),
            pd_steps=30,
            n_test=300,
            nfes=(1, 2, 4, 8),
            path_steps=20,
            gif_frames=6,
        )


def steps_for_budget(method: str, budget: int) -> int:
    """The most steps of ``method`` whose evaluations fit in ``budget`` (0 when none does)."""
    if method not in EVALS_PER_STEP:
        raise ValueError(f"unknown solver method {method!r}; valid: {', '.join(EVALS_PER_STEP)}")
    if method == "heun":  # n steps cost 2n - 1 evaluations (last step is Euler)
        return (budget + 1) // 2
    return budget // EVALS_PER_STEP[method]


class Counted(torch.nn.Module):
    """Wraps a network and counts its forward calls (the NFE of whatever sampler drives it)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x, t)


@torch.no_grad()
def sample_flow(
    net: torch.nn.Module, noise: torch.Tensor, method: str, steps: int, *, grid: str = "linear"
) -> tuple[torch.Tensor, int]:
    """Integrate the learned ODE from noise (t = 1) to t = 0; returns (samples, evaluations used)."""
    from mmdit_flow.sampling import solve, timesteps

    counted = Counted(net)
    x = solve(counted, noise, timesteps(steps, grid=grid), method=method)
    return x, counted.calls


@torch.no_grad()
def sample_diffusion(
    net: torch.nn.Module, noise: torch.Tensor, sampler: str, steps: int, *, seed: int
) -> tuple[torch.Tensor, int]:
    """DDPM (ancestral) or DDIM (eta = 0) with diffusers' schedulers; returns (samples, evaluations used)."""
    from mmdit_flow.training.lab.diffusion import sample

    counted = Counted(net)
    x, _ = sample(counted, noise, steps, sampler=sampler, generator=torch.Generator().manual_seed(seed))
    return x, counted.calls


def _row(model: str, sampler: str, grid: str | None) -> dict[str, Any]:
    label = f"{model} {sampler}" + (f" ({grid} grid)" if grid == "scheduler" else "")
    return {"model": model, "sampler": sampler, "grid": grid, "label": label, "w2": {}, "nfe_used": {}}


def _flow_rows(
    nets: dict[str, torch.nn.Module],
    noise: torch.Tensor,
    test: torch.Tensor,
    nfes: tuple[int, ...],
    *,
    models: tuple[str, ...] = FLOW_MODELS,
    sample: Any = sample_flow,
    metric: Any = w2,
    scheduler_grid: bool = True,
) -> list[dict[str, Any]]:
    """W2 (``metric``) of every (model, solver) at every budget, sampled with ``sample`` (the SO(3) lab
    passes its own sampler and metric); with ``scheduler_grid`` also Euler on the scheduler grid."""
    rows = []
    plan = [(m, s, "linear") for m in models for s in EVALS_PER_STEP]
    if scheduler_grid:
        plan += [(m, "euler", "scheduler") for m in models]  # the grid comparison (issue 2, sec. 3)
    for model, method, grid in plan:
        row, last = _row(model, method, grid), 0
        for budget in nfes:
            steps = steps_for_budget(method, budget)
            if steps == last:  # cannot run in this budget, or the same run as the smaller budget (heun)
                continue
            last = steps
            x, used = sample(nets[model], noise, method, steps, grid=grid)
            if used > budget:
                raise RuntimeError(f"{method} with {steps} steps used {used} > {budget} evaluations")
            row["w2"][str(budget)], row["nfe_used"][str(budget)] = metric(x, test), used
        rows.append(row)
    return rows


def _diffusion_rows(
    net: torch.nn.Module, noise: torch.Tensor, test: torch.Tensor, nfes: tuple[int, ...], seed: int
) -> list[dict[str, Any]]:
    rows = []
    for sampler in ("ddim", "ddpm"):
        row = _row("DDPM", sampler, None)
        for budget in nfes:
            x, used = sample_diffusion(net, noise, sampler, budget, seed=seed)
            row["w2"][str(budget)], row["nfe_used"][str(budget)] = w2(x, test), used
        rows.append(row)
    return rows


def _lookup(
    rows: list[dict[str, Any]], model: str, sampler: str, budget: int, grid: str | None = "linear"
) -> float:
    for row in rows:
        if (row["model"], row["sampler"], row["grid"]) == (model, sampler, grid):
            return row["w2"].get(str(budget), math.nan)
    return math.nan


def targets(rows: list[dict[str, Any]], nfes: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """The issue's three targets, each with the numbers it compares and whether it holds.

    - 2-RF at 1 Euler step <= 1.5 x (1-RF at the largest budget, Euler);
    - 1-RF Euler at 8 evaluations < DDIM at 8;
    - 1-RF rk4 at 8 evaluations <= 1.1 x (1-RF Euler at the largest budget): "reaches" allows 10 %, about the
      spread of W2 between independent finite samples.
    """
    few, top = report.few_and_top(nfes)
    ref = _lookup(rows, "1-RF", "euler", top)
    checks = {
        "reflow_one_step": (
            _lookup(rows, "2-RF", "euler", 1),
            1.5 * ref,
            f"2-RF euler@1 <= 1.5 x 1-RF euler@{top}",
        ),
        "fm_beats_ddim": (
            _lookup(rows, "1-RF", "euler", few),
            _lookup(rows, "DDPM", "ddim", few, None),
            f"1-RF euler@{few} < DDIM@{few}",
        ),
        "rk4_reaches_euler": (
            _lookup(rows, "1-RF", "rk4", few),
            1.1 * ref,
            f"1-RF rk4@{few} <= 1.1 x 1-RF euler@{top}",
        ),
    }
    return {
        name: {"value": value, "threshold": bound, "met": bool(value <= bound), "rule": rule}
        for name, (value, bound, rule) in checks.items()
    }


def _generators(seed: int, index: int) -> dict[str, torch.Generator]:
    """Independent, seed-determined streams for training, held-out data, evaluation noise and plots."""
    base = 1000 * seed + 10 * index
    names = ("train", "test", "floor", "noise", "couplings", "plots")
    return {name: torch.Generator().manual_seed(base + i) for i, name in enumerate(names)}


def _timed(results: dict[str, float], name: str, fn: Any, *args: Any, **kw: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args, **kw)
    results[name] = round(time.perf_counter() - start, 2)
    return out


def train_models(
    name: str, config: LabConfig, gens: dict[str, torch.Generator], progress: bool
) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """Train 1-RF, 2-RF (reflow of 1-RF), OT-CFM, the DDPM baseline and the progressive-distillation students
    of 1-RF (``PD-N`` for N in ``config.pd_rounds``, each round's student the next one's teacher); returns
    nets and seconds per model."""
    from mmdit_flow.reflow import make_couplings
    from mmdit_flow.sampling import timesteps
    from mmdit_flow.training.lab import train

    sampler, g, cfg = lab_data.DATASETS[name], gens["train"], config.train
    seconds: dict[str, float] = {}
    nets: dict[str, torch.nn.Module] = {}
    nets["1-RF"] = _timed(
        seconds,
        "1-RF",
        train.train_rectified_flow,
        sampler,
        cfg,
        generator=g,
        progress=progress,
        desc=f"{name} 1-RF",
    )
    noise = torch.randn(config.couplings, 2, generator=gens["couplings"])
    start = time.perf_counter()
    with torch.no_grad():
        pair_noise, pair_x0 = make_couplings(
            nets["1-RF"],
            noise,
            timesteps(config.coupling_steps, grid="linear"),
            method=config.coupling_method,
        )
    seconds["couplings"] = round(time.perf_counter() - start, 2)
    reflow_cfg = dataclasses.replace(cfg, steps=config.reflow_steps)
    nets["2-RF"] = _timed(
        seconds,
        "2-RF",
        train.train_reflow,
        nets["1-RF"],
        pair_noise,
        pair_x0,
        reflow_cfg,
        generator=g,
        progress=progress,
        desc=f"{name} 2-RF",
    )
    nets["OT-CFM"] = _timed(
        seconds,
        "OT-CFM",
        train.train_ot_cfm,
        sampler,
        cfg,
        generator=g,
        progress=progress,
        desc=f"{name} OT-CFM",
    )
    nets["DDPM"] = _timed(
        seconds, "DDPM", train.train_ddpm, sampler, cfg, generator=g, progress=progress, desc=f"{name} DDPM"
    )
    start, teacher = time.perf_counter(), nets["1-RF"]
    for n in config.pd_rounds:
        teacher = nets[f"PD-{n}"] = train.train_progressive(
            teacher, sampler, cfg, n, generator=g, steps=config.pd_steps, progress=progress,
            desc=f"{name} PD-{n}",
        )  # fmt: skip
    seconds["PD"] = round(time.perf_counter() - start, 2)
    return nets, seconds


def _progressive_row(
    nets: dict[str, torch.nn.Module], noise: torch.Tensor, test: torch.Tensor, config: LabConfig
) -> dict[str, Any]:
    """W2 of each progressive-distillation student at its own step count (one student per NFE)."""
    row = _row("PD", "euler", "linear")
    row["label"] = "PD (progressive distillation of 1-RF), euler"
    for n in sorted(config.pd_rounds):
        x, used = sample_flow(nets[f"PD-{n}"], noise, "euler", n)
        row["w2"][str(n)], row["nfe_used"][str(n)] = w2(x, test), used
    return row


@torch.no_grad()
def straightness_of(nets: dict[str, torch.nn.Module], noise: torch.Tensor, steps: int) -> dict[str, float]:
    """Liu et al.'s straightness (0 = straight paths) of each flow model, on the evaluation noise."""
    from mmdit_flow.reflow import straightness
    from mmdit_flow.sampling import timesteps

    ts = timesteps(steps, grid="linear")
    return {model: straightness(nets[model], noise, ts, method="euler") for model in FLOW_MODELS}


def run_dataset(
    name: str, config: LabConfig, *, seed: int, index: int, out: Path, progress: bool = True
) -> dict[str, Any]:
    """Train, evaluate and draw one data set; returns its JSON-ready results (figures go under ``out``)."""

    gens = _generators(seed, index)
    start = time.perf_counter()
    sampler = lab_data.DATASETS[name]
    test = sampler(config.n_test, gens["test"])
    floor = w2(sampler(config.n_test, gens["floor"]), test)
    nets, seconds = train_models(name, config, gens, progress)
    noise = torch.randn(config.n_test, 2, generator=gens["noise"])

    eval_start = time.perf_counter()
    rows = _flow_rows(nets, noise, test, config.nfes)
    rows += _diffusion_rows(nets["DDPM"], noise, test, config.nfes, seed)
    if config.pd_rounds:
        rows.append(_progressive_row(nets, noise, test, config))
    straight = straightness_of(nets, noise, config.path_steps)
    seconds["evaluate"] = round(time.perf_counter() - eval_start, 2)

    plot_start = time.perf_counter()
    figures = draw(name, nets, test, rows, floor, config, gens["plots"], out)
    seconds["plots"] = round(time.perf_counter() - plot_start, 2)
    seconds["total"] = round(time.perf_counter() - start, 2)
    logger.info("lab: %s done in %.1f s", name, seconds["total"])
    return {
        "floor_w2": floor,
        "rows": rows,
        "straightness": straight,
        "targets": targets(rows, config.nfes),
        "seconds": seconds,
        "figures": [str(p.relative_to(out)) for p in figures],
    }


@torch.no_grad()
def draw(
    name: str,
    nets: dict[str, torch.nn.Module],
    test: torch.Tensor,
    rows: list[dict[str, Any]],
    floor: float,
    config: LabConfig,
    g: torch.Generator,
    out: Path,
) -> list[Path]:
    """All figures of one data set: particles, velocity field, paths, reflow paths, quality curves, GIF."""
    from mmdit_flow.sampling import solve, timesteps
    from mmdit_flow.training.lab import plots
    from mmdit_flow.training.lab.diffusion import sample

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    noise = torch.randn(1500, 2, generator=g)
    ts = timesteps(config.path_steps, grid="linear")
    trajs = {m: solve(nets[m], noise, ts, method="euler", trajectory=True).xs for m in FLOW_MODELS}
    ddim = torch.stack(sample(nets["DDPM"], noise, config.path_steps, sampler="ddim", trajectory=True)[1])
    one_step = {
        m: solve(nets[m], noise[:300], timesteps(1), method="euler", trajectory=True).xs for m in FLOW_MODELS
    }
    return [
        plots.particles(
            trajs["1-RF"], ts, folder / "particles.png", title=f"{name}: 1-rectified flow, noise to data"
        ),
        plots.velocity_field(
            nets["1-RF"], test, folder / "velocity_field.png", title=f"{name}: learned velocity"
        ),
        plots.paths(
            {"flow matching (1-RF, Euler)": trajs["1-RF"], "diffusion (DDIM, probability flow)": ddim},
            folder / "paths_fm_vs_diffusion.png",
            title=f"{name}: straight vs curved paths",
        ),
        plots.paths(
            {"1-RF": trajs["1-RF"], "2-RF (after reflow)": trajs["2-RF"], "OT-CFM": trajs["OT-CFM"]},
            folder / "paths_reflow.png",
            title=f"{name}: paths before and after reflow",
        ),
        plots.paths(
            {f"{m}, one Euler step": one_step[m] for m in FLOW_MODELS},
            folder / "one_step.png",
            title=f"{name}: where one step lands",
        ),
        *_progressive_paths(name, nets, noise, config, folder),
        plots.quality_vs_nfe(
            rows, floor, folder / "quality_vs_nfe.png", title=f"{name}: W2 to held-out data"
        ),
        plots.flow_gif(
            {"1-RF": trajs["1-RF"], "2-RF": trajs["2-RF"], "DDIM": ddim},
            ts,
            folder / "flow.gif",
            title=name,
            frames=config.gif_frames,
        ),
    ]


def _progressive_paths(
    name: str, nets: dict[str, torch.nn.Module], noise: torch.Tensor, config: LabConfig, folder: Path
) -> list[Path]:
    """1-RF against its progressive-distillation student at the student's few steps (4 or the nearest)."""
    from mmdit_flow.sampling import solve, timesteps
    from mmdit_flow.training.lab import plots

    if not config.pd_rounds:
        return []
    n = min(config.pd_rounds, key=lambda k: (abs(k - 4), k))
    ts = timesteps(n, grid="linear")
    trajs = {
        f"1-RF, {n} Euler steps": solve(nets["1-RF"], noise, ts, method="euler", trajectory=True).xs,
        f"PD-{n} (distilled), {n} Euler steps": solve(nets[f"PD-{n}"], noise, ts, method="euler",
                                                      trajectory=True).xs,
    }  # fmt: skip
    return [plots.paths(trajs, folder / "paths_progressive.png", title=f"{name}: {n} steps, before and after "
                        "progressive distillation")]  # fmt: skip


def run_lab(
    datasets: list[str],
    out: Path,
    config: LabConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
    so3_config: Any = None,
) -> dict[str, Any]:
    """Run every data set in turn and write the figures, ``results.json`` and ``results.md`` under ``out``.

    SO(3) data sets (``data.SO3_DATASETS``) run through ``training.lab.so3`` with ``so3_config`` (an
    ``SO3LabConfig``; default: its ``quick()`` preset when ``config.smoke``, else the full one).

    The tables are rewritten after every data set; on Ctrl-C (``KeyboardInterrupt``, re-raised) they are
    written once more with the finished data sets and a note naming the ones that did not run.
    """
    lab_data.check_names(datasets)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": command,
        "config": {**dataclasses.asdict(config), "seed": seed, "datasets": datasets},
        "threads": torch.get_num_threads(),
        "datasets": {},
    }
    order = list(lab_data.DATASETS) + list(lab_data.SO3_DATASETS)
    if any(name in lab_data.SO3_DATASETS for name in datasets):
        from mmdit_flow.training.lab import so3 as lab_so3

        if so3_config is None:
            so3_config = lab_so3.SO3LabConfig.quick() if config.smoke else lab_so3.SO3LabConfig()
        results["config"]["so3"] = dataclasses.asdict(so3_config)
    try:
        for name in datasets:
            if name in lab_data.SO3_DATASETS:
                results["datasets"][name] = lab_so3.run_dataset(
                    name, so3_config, seed=seed, index=order.index(name), out=out, progress=progress
                )
            else:
                results["datasets"][name] = run_dataset(
                    name, config, seed=seed, index=order.index(name), out=out, progress=progress
                )
            results["seconds"] = round(time.perf_counter() - start, 1)
            report.write(results, out)  # after every data set: a stopped run keeps what it has
    except KeyboardInterrupt:
        if results["datasets"]:  # with none finished, leave an earlier run's tables in ``out`` alone
            results["stopped"] = [name for name in datasets if name not in results["datasets"]]
            results["seconds"] = round(time.perf_counter() - start, 1)
            report.write(results, out)
        raise
    return results
