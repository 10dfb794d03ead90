"""Training the lab's models: rectified flow, k-rectified flow (reflow), OT-CFM and the DDPM baseline.

All share one loop (``fit``: Adam, cosine learning-rate decay to zero, fresh data every step) and one network
(``TimeMLP``); they differ only in which pairs (x0, noise) the loss sees:

- 1-rectified flow: x0 ~ data, noise ~ N(0, I) independent; ``mmdit_flow.flow.cfm_loss``.
- k-rectified flow: pairs (noise, ODE_{k-1}(noise)) from the previous model
  (``mmdit_flow.reflow.make_couplings``), fine-tuned from that model (Liu et al. 2022, sec. 2.3); the same
  ``cfm_loss``.
- OT-CFM: minibatches re-paired by an exact optimal-transport assignment (``mmdit_flow.reflow.ot_coupling``,
  Tong et al. 2023) within chunks of ``ot_batch`` points (the Hungarian solver is cubic in the chunk size,
  and Tong et al. use 256 on 2-D data); the same ``cfm_loss``.
- DDPM: the epsilon-prediction loss of ``training.lab.diffusion``.
- Progressive distillation (Salimans & Ho 2022): a student for N Euler steps on the linear grid, whose one
  step matches two of its teacher's (``mmdit_flow.distill.progressive_loss``), fine-tuned from the teacher;
  rounds chain N -> N / 2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmdit_flow.training.lab.data import Sampler
from mmdit_flow.training.lab.net import TimeMLP, seeded_init


@dataclass(frozen=True)
class LabTrainConfig:
    """Optimisation settings for one lab model; ``steps`` optimizer steps on batches of ``batch`` points."""

    steps: int = 2000
    batch: int = 1024
    lr: float = 2e-3
    hidden: int = 256
    depth: int = 3
    scheme: str = "uniform"  # training-time density (mmdit_flow.flow.sample_t)
    ot_batch: int = 256  # OT-CFM: points per exact assignment

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 2 or self.lr <= 0 or self.ot_batch < 2:
            raise ValueError(
                f"need steps >= 1, batch >= 2, lr > 0, ot_batch >= 2; "
                f"got {self.steps}, {self.batch}, {self.lr}, {self.ot_batch}"
            )

    def make_net(self, generator: torch.Generator | None = None) -> TimeMLP:
        """A fresh 2-D network, its weights drawn from ``generator`` when given (``net.seeded_init``)."""
        return seeded_init(lambda: TimeMLP(dim=2, hidden=self.hidden, depth=self.depth), generator)


LossFn = Callable[[torch.nn.Module, torch.Generator], torch.Tensor]


def fit(
    net: torch.nn.Module,
    loss_fn: LossFn,
    config: LabTrainConfig,
    *,
    generator: torch.Generator,
    steps: int | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Minimise ``loss_fn(net, generator)`` with Adam and a cosine decay; returns the loss of every step."""
    from tqdm.auto import tqdm

    steps = config.steps if steps is None else steps
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    net.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in bar:
        loss = loss_fn(net, generator)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{desc}: non-finite loss {loss.item()} at step {len(losses)}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / 100:.4f}")
    net.eval()
    return losses


def train_rectified_flow(
    data: Sampler,
    config: LabTrainConfig,
    *,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "1-RF",
) -> TimeMLP:
    """1-rectified flow: plain conditional flow matching with independent (x0, noise)."""
    from mmdit_flow.flow import cfm_loss

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        return cfm_loss(net, data(config.batch, g), generator=g, scheme=config.scheme)

    net = config.make_net(generator)
    fit(net, loss_fn, config, generator=generator, desc=desc, progress=progress)
    return net


def train_ot_cfm(
    data: Sampler,
    config: LabTrainConfig,
    *,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "OT-CFM",
) -> TimeMLP:
    """OT-CFM: flow matching on minibatches re-paired by the exact OT assignment between x0 and noise."""
    from mmdit_flow.flow import cfm_loss
    from mmdit_flow.reflow import ot_coupling

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        x0 = data(config.batch, g)
        noise = torch.randn(x0.shape, generator=g)
        paired = [
            ot_coupling(a, b)
            for a, b in zip(x0.split(config.ot_batch), noise.split(config.ot_batch), strict=True)
        ]
        return cfm_loss(net, x0, noise=torch.cat(paired), generator=g, scheme=config.scheme)

    net = config.make_net(generator)
    fit(net, loss_fn, config, generator=generator, desc=desc, progress=progress)
    return net


def train_reflow(
    base: TimeMLP,
    noise: torch.Tensor,
    x0: torch.Tensor,
    config: LabTrainConfig,
    *,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "2-RF",
) -> TimeMLP:
    """k-rectified flow: fine-tune a copy of ``base`` on the fixed coupling (noise [N, 2], x0 [N, 2])."""
    from mmdit_flow.flow import cfm_loss

    if noise.shape != x0.shape:
        raise ValueError(
            f"noise and x0 must pair up one to one, got {tuple(noise.shape)} and {tuple(x0.shape)}"
        )

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, x0.shape[0], (config.batch,), generator=g)
        return cfm_loss(net, x0[idx], noise=noise[idx], generator=g, scheme=config.scheme)

    net = copy.deepcopy(base)
    fit(net, loss_fn, config, generator=generator, desc=desc, progress=progress)
    return net


def train_progressive(
    teacher: TimeMLP,
    data: Sampler,
    config: LabTrainConfig,
    student_steps: int,
    *,
    generator: torch.Generator,
    steps: int | None = None,
    progress: bool = True,
    desc: str = "PD",
) -> TimeMLP:
    """One round of progressive distillation: a copy of ``teacher`` trained to sample in ``student_steps``
    Euler steps of the linear grid what the teacher draws in twice as many."""
    from mmdit_flow.distill import grid_midpoints, progressive_loss
    from mmdit_flow.sampling import timesteps

    if student_steps < 1:
        raise ValueError(f"student_steps must be >= 1, got {student_steps}")
    ts = timesteps(student_steps, grid="linear")
    mids = grid_midpoints(ts)
    frozen = copy.deepcopy(teacher).requires_grad_(False)

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        x0 = data(config.batch, g)
        noise = torch.randn(x0.shape, generator=g)
        i = torch.randint(0, student_steps, (config.batch,), generator=g)
        return progressive_loss(net, frozen, x0, noise, ts[i], mids[i], ts[i + 1])

    net = copy.deepcopy(teacher)
    fit(net, loss_fn, config, generator=generator, steps=steps, desc=desc, progress=progress)
    return net


def train_ddpm(
    data: Sampler,
    config: LabTrainConfig,
    *,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "DDPM",
) -> TimeMLP:
    """The same network as an epsilon predictor, noised by diffusers' ``DDPMScheduler.add_noise``."""
    from mmdit_flow.training.lab.diffusion import ddpm_loss, make_scheduler

    scheduler = make_scheduler("ddpm")

    def loss_fn(net: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        return ddpm_loss(net, data(config.batch, g), scheduler, generator=g)

    net = config.make_net(generator)
    fit(net, loss_fn, config, generator=generator, desc=desc, progress=progress)
    return net
