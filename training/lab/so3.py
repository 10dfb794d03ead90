"""The lab on the rotation group: flows from uniform rotations to a mixture of IGSO(3) components.

The same experiment as the 2-D sets (``training.lab.experiment``), with the math of ``mmdit_flow.so3``:

- data ``so3_mixture`` (``MIXTURE``): three IGSO(3) components around fixed rotations 2.3-2.9 rad apart;
- 1-RF: Riemannian conditional flow matching (``so3.cfm_loss``: geodesic from data to uniform noise, target
  the body velocity log(r0^T noise)) with the lab's loop (``train.fit``) and network (``TimeMLP``, fed the 9
  matrix entries, returning a body-frame velocity);
- 2-RF: 1-RF fine-tuned on its own couplings (uniform noise, ODE(noise)), as in the Euclidean lab;
- quality: W2 on SO(3) (``metrics.w2_so3``: squared rotation angle as ground cost) between samples and
  held-out data at each NFE budget, the solvers being ``so3.solve``'s Runge-Kutta-Munthe-Kaas methods;
- straightness (``straightness``), the log-likelihood of held-out data under each flow
  (``so3.log_likelihood``) against the exact mixture log-density, and the figures (rotated axes on the
  sphere, angle distributions).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdit_flow import so3
from mmdit_flow.training.lab import experiment, train
from mmdit_flow.training.lab.metrics import w2_so3
from mmdit_flow.training.lab.net import TimeMLP, seeded_init
from mmdit_flow.training.lab.train import LabTrainConfig

MODELS = ("1-RF", "2-RF")
AXES_POINTS = 500  # rotations per panel of the axes figure (three dots each)
SAMPLER_GRID = 2048  # points of so3.igso3's inverse-CDF table: 8x faster than its default 8192 on a CPU


# ----------------------------------------------------------------------------------------------------
# the data


@dataclass(frozen=True)
class Mixture:
    """sum_k weight_k IGSO(3)(sigma_k) around exp(mean_k): means as axis-angle vectors (radians)."""

    means: tuple[tuple[float, float, float], ...]
    sigmas: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        k = len(self.means)
        if k < 1 or len(self.sigmas) != k or len(self.weights) != k:
            raise ValueError(
                f"means, sigmas and weights need one entry per component; got {k}, {len(self.sigmas)}, "
                f"{len(self.weights)}"
            )
        if any(len(m) != 3 for m in self.means):
            raise ValueError(f"each mean is an axis-angle vector of 3 numbers; got {self.means}")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError(f"weights must be positive and sum to 1; got {self.weights}")
        if any(not (math.isfinite(s) and s >= so3.SIGMA_MIN) for s in self.sigmas):
            raise ValueError(f"sigmas must be >= {so3.SIGMA_MIN}; got {self.sigmas}")

    def mean_rotations(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The component means as rotation matrices [K, 3, 3]."""
        return so3.exp(torch.tensor(self.means, dtype=torch.float64)).to(dtype)

    def sample(
        self, n: int, generator: torch.Generator, *, labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n rotations [n, 3, 3] (fp32): a component per draw from ``weights``, then ``so3.igso3`` around its
        mean (a ``SAMPLER_GRID``-point angle table); with ``labels`` also the components [n]."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        which = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        out = torch.empty(n, 3, 3, dtype=torch.float64)
        for k, mean in enumerate(self.mean_rotations()):
            mask = which == k
            out[mask] = so3.igso3(
                int(mask.sum()), self.sigmas[k], mean=mean, generator=generator, dtype=torch.float64,
                grid=SAMPLER_GRID,
            )  # fmt: skip
        return (out.float(), which) if labels else out.float()

    def log_prob(self, r: torch.Tensor) -> torch.Tensor:
        """The exact log-density [N] (nats, Riemannian volume) of rotations r [N, 3, 3], in fp64."""
        r = r.double()
        terms = [
            math.log(w) + so3.igso3_log_prob(r, s, mean=m)
            for w, s, m in zip(self.weights, self.sigmas, self.mean_rotations(), strict=True)
        ]
        return torch.logsumexp(torch.stack(terms), dim=0)

    def nearest(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(angle [N] to the nearest component mean, that component [N]) for rotations r [N, 3, 3]."""
        means = self.mean_rotations()
        angles = so3.distance(means[None], r.double()[:, None])  # [N, K]
        return angles.min(dim=1)

    def own_angle_pdf(self, w: torch.Tensor) -> torch.Tensor:
        """sum_k weight_k igso3_angle_pdf(w; sigma_k): the density of a draw's angle to its own component's
        mean, which is its angle to the nearest mean whenever the components do not overlap (here)."""
        return sum(
            wt * so3.igso3_angle_pdf(w.double(), s) for wt, s in zip(self.weights, self.sigmas, strict=True)
        )


# pairwise 2.30, 2.36 and 2.94 rad apart: 7.7 sigma or more of the widest component to the midpoint
MIXTURE = Mixture(
    means=((0.0, 0.0, 0.0), (2.2, 0.6, -0.3), (-0.5, 1.9, 1.3)),
    sigmas=(0.2, 0.25, 0.3),
    weights=(0.5, 0.3, 0.2),
)
DATASETS: dict[str, Mixture] = {"so3_mixture": MIXTURE}


def sample(
    name: str, n: int, *, generator: torch.Generator | None = None, seed: int | None = None
) -> torch.Tensor:
    """Draw ``n`` rotations [n, 3, 3] (fp32) from the named SO(3) data set; ``seed`` or ``generator`` fixes
    them."""
    if name not in DATASETS:
        raise ValueError(f"unknown SO(3) dataset {name!r}; choose from {sorted(DATASETS)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    return DATASETS[name].sample(n, generator)


# ----------------------------------------------------------------------------------------------------
# the model and its training


class RotationVelocity(nn.Module):
    """v(R, t) = TimeMLP(the 9 entries of R, t): a body-frame velocity [B, 3]; R [B, 3, 3], t [B]."""

    def __init__(self, hidden: int = 256, depth: int = 3):
        super().__init__()
        self.net = TimeMLP(dim=9, hidden=hidden, depth=depth, out_dim=3)

    def forward(self, r: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if r.ndim != 3 or r.shape[1:] != (3, 3):
            raise ValueError(f"expected rotations [B, 3, 3], got {tuple(r.shape)}")
        return self.net(r.reshape(r.shape[0], 9).float(), t).to(r.dtype)


def make_net(config: LabTrainConfig, generator: torch.Generator | None = None) -> RotationVelocity:
    """A fresh velocity network, its weights drawn from ``generator`` when given (``net.seeded_init``)."""
    return seeded_init(lambda: RotationVelocity(hidden=config.hidden, depth=config.depth), generator)


def train_rectified_flow(
    mixture: Mixture, config: LabTrainConfig, *, generator: torch.Generator, progress: bool = True,
    desc: str = "SO(3) 1-RF",
) -> RotationVelocity:  # fmt: skip
    """1-RF on SO(3): ``so3.cfm_loss`` with fresh mixture draws and uniform noise every step."""

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        return so3.cfm_loss(net, mixture.sample(config.batch, g), generator=g, scheme=config.scheme)

    net = make_net(config, generator)
    train.fit(net, loss_fn, config, generator=generator, desc=desc, progress=progress)
    return net


def train_reflow(
    base: RotationVelocity, noise: torch.Tensor, x0: torch.Tensor, config: LabTrainConfig, *,
    generator: torch.Generator, progress: bool = True, desc: str = "SO(3) 2-RF",
) -> RotationVelocity:  # fmt: skip
    """2-RF on SO(3): a copy of ``base`` fine-tuned on the fixed coupling (noise [N, 3, 3], x0 [N, 3, 3])."""
    if noise.shape != x0.shape:
        raise ValueError(
            f"noise and x0 must pair up one to one, got {tuple(noise.shape)} and {tuple(x0.shape)}"
        )

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, x0.shape[0], (config.batch,), generator=g)
        return so3.cfm_loss(net, x0[idx], noise=noise[idx], generator=g, scheme=config.scheme)

    net = copy.deepcopy(base)
    train.fit(net, loss_fn, config, generator=generator, desc=desc, progress=progress)
    return net


# ----------------------------------------------------------------------------------------------------
# sampling and measurements


@torch.no_grad()
def sample_flow(
    net: torch.nn.Module, noise: torch.Tensor, method: str, steps: int, *, grid: str = "linear"
) -> tuple[torch.Tensor, int]:
    """Integrate the learned ODE on SO(3) from noise (t = 1) to t = 0; returns (rotations, evaluations)."""
    from mmdit_flow.sampling import timesteps

    counted = experiment.Counted(net)
    r = so3.solve(counted, noise, timesteps(steps, grid=grid), method=method)
    return r, counted.calls


@torch.no_grad()
def trajectory(net: torch.nn.Module, noise: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The Euler states [steps + 1] x [N, 3, 3] from noise (t = 1) to t = 0 on the linear grid."""
    from mmdit_flow.sampling import timesteps

    ts = timesteps(steps, grid="linear").tolist()
    states = [noise]
    for i in range(steps):
        states.append(so3.solve(net, states[-1], ts[i : i + 2], method="euler"))
    return states


@torch.no_grad()
def straightness(net: torch.nn.Module, noise: torch.Tensor, steps: int) -> float:
    """Liu et al.'s straightness on SO(3): S = integral_0^1 E |log(R0^T noise) - v(R_t, t)|^2 dt along the
    generated Euler path R_t (R0 its end). On a geodesic the body velocity is log(R0^T noise) at every t, so
    S = 0 exactly for a flow whose paths are geodesics; the Riemann sum is the Euclidean lab's."""
    from mmdit_flow.sampling import timesteps

    ts = timesteps(steps, grid="linear").tolist()
    states = trajectory(net, noise, steps)
    chord = so3.velocity_target(states[-1], noise)  # [N, 3]
    total = 0.0
    for i in range(steps):
        v = net(states[i], torch.full((noise.shape[0],), ts[i]))
        total += abs(ts[i + 1] - ts[i]) * (chord - v).pow(2).sum(1).mean().item()
    return total


def log_likelihoods(
    nets: dict[str, torch.nn.Module], test: torch.Tensor, mixture: Mixture, steps: tuple[int, ...]
) -> dict[str, Any]:
    """Mean log-likelihood (nats) of held-out rotations under each flow (``so3.log_likelihood``, rk4 with each
    of ``steps``, 4 evaluations a step) against the exact mixture log-density; the gap mean(exact - flow) is
    an estimate of KL(target || flow), given with its standard error."""
    r = test.double()
    truth = mixture.log_prob(r)
    out: dict[str, Any] = {
        "n": int(r.shape[0]),
        "exact": truth.mean().item(),
        "uniform": -so3.LOG_VOLUME,
        "models": {},
    }
    for model in nets:
        out["models"][model] = {}
        for n in steps:
            ll = so3.log_likelihood(nets[model], r, steps=n, method="rk4")
            gap = truth - ll
            out["models"][model][str(n)] = {
                "mean": ll.mean().item(),
                "kl": gap.mean().item(),
                "kl_se": (gap.std() / math.sqrt(len(gap))).item(),
                "nfe": 4 * n,
            }
    return out


# ----------------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class SO3LabConfig:
    """Everything that sets the SO(3) lab's numbers; ``quick()`` is the seconds-long smoke-test preset."""

    smoke: bool = False
    train: LabTrainConfig = field(default_factory=lambda: LabTrainConfig(steps=2000, batch=512))
    reflow_steps: int = 1500
    couplings: int = 10_000
    coupling_method: str = "rk4"
    coupling_steps: int = 8  # 32 evaluations
    n_test: int = 1000  # held-out rotations and samples per W2
    nfes: tuple[int, ...] = experiment.NFES
    path_steps: int = 100  # Euler steps for the straightness and the figures' converged samples
    ll_samples: int = 500  # held-out rotations for the log-likelihood
    ll_steps: tuple[int, ...] = (8, 32)  # rk4 steps of the likelihood ODE: two, to show it has converged

    @classmethod
    def quick(cls) -> SO3LabConfig:
        return cls(
            smoke=True,
            train=LabTrainConfig(steps=150, batch=256, hidden=64, depth=2),
            reflow_steps=60,
            couplings=1000,
            coupling_steps=4,
            n_test=300,
            nfes=(1, 2, 4, 8),
            path_steps=20,
            ll_samples=100,
            ll_steps=(4, 8),
        )


def train_models(
    mixture: Mixture, config: SO3LabConfig, gens: dict[str, torch.Generator], progress: bool, name: str
) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """1-RF, then its couplings (uniform noise, ODE(noise)), then 2-RF; returns nets and seconds per stage."""
    from mmdit_flow.sampling import timesteps

    seconds: dict[str, float] = {}
    nets: dict[str, torch.nn.Module] = {}
    g = gens["train"]
    nets["1-RF"] = experiment._timed(
        seconds, "1-RF", train_rectified_flow, mixture, config.train, generator=g, progress=progress,
        desc=f"{name} 1-RF",
    )  # fmt: skip
    start = time.perf_counter()
    noise = so3.uniform(config.couplings, generator=gens["couplings"])
    with torch.no_grad():
        x0 = so3.solve(
            nets["1-RF"],
            noise,
            timesteps(config.coupling_steps, grid="linear"),
            method=config.coupling_method,
        )
    seconds["couplings"] = round(time.perf_counter() - start, 2)
    reflow_cfg = dataclasses.replace(config.train, steps=config.reflow_steps)
    nets["2-RF"] = experiment._timed(
        seconds, "2-RF", train_reflow, nets["1-RF"], noise, x0, reflow_cfg, generator=g, progress=progress,
        desc=f"{name} 2-RF",
    )  # fmt: skip
    return nets, seconds


def targets(rows: list[dict[str, Any]], straight: dict[str, float], nfes: tuple[int, ...]) -> dict[str, Any]:
    """The reflow claims on the manifold: 2-RF at one Euler step within 1.5 x of 1-RF at the largest budget
    (the Euclidean lab's rule), and 2-RF straighter than 1-RF."""
    top = max(nfes)
    checks = {
        "reflow_one_step": (
            experiment._lookup(rows, "2-RF", "euler", 1),
            1.5 * experiment._lookup(rows, "1-RF", "euler", top),
            f"2-RF euler@1 <= 1.5 x 1-RF euler@{top}",
        ),
        "reflow_straighter": (straight["2-RF"], straight["1-RF"], "straightness 2-RF <= 1-RF"),
    }
    return {
        name: {"value": value, "threshold": bound, "met": bool(value <= bound), "rule": rule}
        for name, (value, bound, rule) in checks.items()
    }


def run_dataset(
    name: str, config: SO3LabConfig, *, seed: int, index: int, out: Path, progress: bool = True
) -> dict[str, Any]:
    """Train, evaluate and draw one SO(3) data set; returns its JSON-ready results (figures under ``out``)."""
    mixture = DATASETS[name]
    gens = experiment._generators(seed, index)
    start = time.perf_counter()
    test = mixture.sample(config.n_test, gens["test"])
    ll_test = mixture.sample(config.ll_samples, gens["test"])
    floor = w2_so3(mixture.sample(config.n_test, gens["floor"]), test)
    nets, seconds = train_models(mixture, config, gens, progress, name)
    noise = so3.uniform(config.n_test, generator=gens["noise"])

    eval_start = time.perf_counter()
    rows = experiment._flow_rows(
        nets, noise, test, config.nfes, models=MODELS, sample=sample_flow, metric=w2_so3, scheduler_grid=False
    )
    straight = {m: straightness(nets[m], noise, config.path_steps) for m in MODELS}
    seconds["evaluate"] = round(time.perf_counter() - eval_start, 2)
    ll_start = time.perf_counter()
    likelihood = log_likelihoods(nets, ll_test, mixture, config.ll_steps)
    seconds["likelihood"] = round(time.perf_counter() - ll_start, 2)

    plot_start = time.perf_counter()
    figures = draw(name, nets, mixture, test, rows, floor, config, gens["plots"], out)
    seconds["plots"] = round(time.perf_counter() - plot_start, 2)
    seconds["total"] = round(time.perf_counter() - start, 2)
    return {
        "kind": "so3",
        "mixture": dataclasses.asdict(mixture),
        "nfes": list(config.nfes),
        "n_test": config.n_test,
        "floor_w2": floor,
        "rows": rows,
        "straightness": straight,
        "log_likelihood": likelihood,
        "targets": targets(rows, straight, config.nfes),
        "seconds": seconds,
        "figures": [str(p.relative_to(out)) for p in figures],
    }


@torch.no_grad()
def draw(
    name: str,
    nets: dict[str, torch.nn.Module],
    mixture: Mixture,
    test: torch.Tensor,
    rows: list[dict[str, Any]],
    floor: float,
    config: SO3LabConfig,
    g: torch.Generator,
    out: Path,
) -> list[Path]:
    """The SO(3) figures: rotated axes on the sphere, angle distributions, W2 against NFE."""
    from mmdit_flow.training.lab import plots

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    noise = so3.uniform(len(test), generator=g)
    top = config.path_steps
    one = {m: sample_flow(nets[m], noise, "euler", 1)[0] for m in MODELS}
    many = {m: trajectory(nets[m], noise, top)[-1] for m in MODELS}
    panels = {
        "noise: uniform": noise,
        "1-RF, 1 Euler step": one["1-RF"],
        "2-RF, 1 Euler step": one["2-RF"],
        "target (held-out)": test,
        f"1-RF, {top} Euler steps": many["1-RF"],
        f"2-RF, {top} Euler steps": many["2-RF"],
    }
    w = torch.linspace(0, math.pi, 400, dtype=torch.float64)
    before = {"noise (uniform)": so3.angle(noise.double())}
    after = {label: mixture.nearest(r)[0] for label, r in panels.items() if label != "noise: uniform"}
    return [
        plots.axes_on_sphere(
            {label: r[:AXES_POINTS] for label, r in panels.items()}, folder / "axes_on_sphere.png",
            title=f"{name}: images of the x (red), y (green), z (blue) axes under each rotation "
            "(Mollweide, equal-area)",
        ),
        plots.angle_histograms(
            [
                ("before: angle of R (to the identity)", before, {"uniform (1 - cos w) / pi":
                                                                 (w, (1 - torch.cos(w)) / math.pi)}),
                ("after: angle to the nearest mixture mean", after, {"target: sum_k w_k IGSO(3) angle pdf":
                                                                    (w, mixture.own_angle_pdf(w))}),
            ],
            folder / "angles.png",
            title=f"{name}: rotation-angle distributions",
        ),
        plots.quality_vs_nfe(
            rows, floor, folder / "quality_vs_nfe.png",
            title=f"{name}: W2 on SO(3) (geodesic cost) to held-out data",
            models_title="1-RF vs 2-RF (Euler, linear grid)",
        ),
    ]  # fmt: skip
