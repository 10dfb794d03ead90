"""The lab's small network: an MLP on (x, t) shared by every model in the lab.

The same architecture is trained as a velocity field (flow matching, reflow, OT-CFM) and as a DDPM noise
predictor, so that the comparison measures the training objective and the sampler, not the network.
Time enters through the project's sinusoidal ``timestep_embedding`` (t in [0, 1]; it holds the factor 1000).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmdit_flow.models.layers import timestep_embedding


class TimeMLP(nn.Module):
    """f(x, t) = MLP([x, emb(t)]) with ``depth`` SiLU hidden layers of width ``hidden``; x [B, dim], t [B].

    The output has ``out_dim`` features (default ``dim``): the SO(3) lab reads 9 matrix entries and returns a
    3-vector (a body-frame velocity).
    """

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 3, time_dim: int = 64, out_dim: int | None = None
    ):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        if dim < 1 or hidden < 1 or depth < 1 or time_dim < 2 or out_dim < 1:
            raise ValueError(
                f"need dim, hidden, depth, out_dim >= 1 and time_dim >= 2; "
                f"got {dim}, {hidden}, {depth}, {out_dim}, {time_dim}"
            )
        self.time_dim = time_dim
        self.time_in = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU())
        self.x_in = nn.Linear(dim, hidden)
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if x.ndim != 2 or t.shape != (x.shape[0],):
            raise ValueError(
                f"expected x [B, dim] and t [B] or a scalar, got {tuple(x.shape)} and {tuple(t.shape)}"
            )
        h = self.x_in(x) + self.time_in(timestep_embedding(t, self.time_dim).to(x.dtype))
        return self.body(h)


def seeded_init(build: Callable[[], nn.Module], generator: torch.Generator | None) -> nn.Module:
    """``build()`` with its initial weights drawn from a seed taken from ``generator`` (the global RNG is left
    as it was); with no generator, from the global RNG. torch seeds its global RNG at random in each process,
    so without this two runs with one ``--seed`` would start from different weights."""
    if generator is None:
        return build()
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
