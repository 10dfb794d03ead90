"""Two-dimensional data sets for the lab, drawn with a ``torch.Generator`` so that a seed fixes every point.

All sets are scaled to lie roughly in [-3, 3]^2 with a spread comparable to the N(0, I) noise they are
transported from, so that one network width and one learning rate suit them all.

- ``two_clusters``: the tutorial's two isotropic Gaussian clusters, N((-2, 0), 0.3^2 I) and
  N((2, 0), 0.3^2 I), in equal shares.
- ``8gaussians``: eight N(mu_k, 0.15^2 I) with mu_k = 2 (cos(k pi / 4), sin(k pi / 4)).
- ``moons``: the two interleaved half circles of scikit-learn's ``make_moons`` (noise 0.05), centred and
  scaled by 1.5.
- ``checkerboard``: uniform on the black squares of a 4 x 4 board covering [-2, 2]^2.
- ``spirals``: two interleaved Archimedean arms (radius proportional to angle, up to 2.7), noise 0.08.

One more set is not 2-D: ``so3_mixture``, a mixture of IGSO(3) distributions on the rotation group, drawn and
run by ``training.lab.so3`` (``SO3_DATASETS``; ``check_names`` accepts it, ``sample`` does not).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Sampler = Callable[[int, torch.Generator], torch.Tensor]


def _randn(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 2, generator=g)


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g)


def two_clusters(n: int, g: torch.Generator) -> torch.Tensor:
    """0.5 N((-2, 0), 0.3^2 I) + 0.5 N((2, 0), 0.3^2 I)."""
    side = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1  # [n] in {-1, 1}
    centre = torch.stack([2.0 * side, torch.zeros(n)], dim=1)
    return centre + 0.3 * _randn(n, g)


def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """(1/8) sum_k N(2 (cos(k pi/4), sin(k pi/4)), 0.15^2 I)."""
    k = torch.randint(0, 8, (n,), generator=g).float()
    angle = k * math.pi / 4
    centre = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centre + 0.15 * _randn(n, g)


def moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Outer arc (cos a, sin a) and inner arc (1 - cos a, 0.5 - sin a), a ~ U[0, pi], + N(0, 0.05^2 I)."""
    a = math.pi * _rand(n, g)
    upper = torch.randint(0, 2, (n,), generator=g).bool()
    x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    pts = torch.stack([x, y], dim=1) + 0.05 * _randn(n, g)
    return 1.5 * (pts - torch.tensor([0.5, 0.25]))


def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """Uniform on the squares [i, i+1] x [j, j+1] of [-2, 2]^2 with i + j even."""
    x = 4 * _rand(n, g) - 2
    row = torch.randint(0, 2, (n,), generator=g).float() * 2  # 0 or 2: which pair of rows
    y = _rand(n, g) + row - 2 + torch.remainder(torch.floor(x), 2)  # shift odd columns up by one
    return torch.stack([x, y], dim=1)


def spirals(n: int, g: torch.Generator) -> torch.Tensor:
    """Arms at angles theta + {0, pi}, radius 0.9 theta / pi, theta in [0.75 pi, 3 pi], + N(0, 0.08^2 I)."""
    theta = 3 * math.pi * (0.25 + 0.75 * torch.sqrt(_rand(n, g)))  # sqrt: even density along the arm
    arm = torch.randint(0, 2, (n,), generator=g).float() * math.pi
    radius = theta / (3 * math.pi) * 2.7
    pts = radius[:, None] * torch.stack([torch.cos(theta + arm), torch.sin(theta + arm)], dim=1)
    return pts + 0.08 * _randn(n, g)


DATASETS: dict[str, Sampler] = {
    "two_clusters": two_clusters,
    "8gaussians": eight_gaussians,
    "moons": moons,
    "checkerboard": checkerboard,
    "spirals": spirals,
}


SO3_DATASETS = ("so3_mixture",)  # rotations: run by training.lab.so3, not by the 2-D pipeline


def check_names(names: list[str], *, so3: bool = True) -> list[str]:
    """Return ``names`` unchanged, or raise ValueError naming the unknown ones and the valid choices (the
    SO(3) sets count as valid unless ``so3=False``)."""
    valid = sorted(DATASETS) + (list(SO3_DATASETS) if so3 else [])
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {valid}")
    if not names:
        raise ValueError(f"no dataset given; choose from {valid}")
    return names


def sample(
    name: str, n: int, *, generator: torch.Generator | None = None, seed: int | None = None
) -> torch.Tensor:
    """Draw ``n`` points [n, 2] (fp32, CPU) from the named 2-D data set; ``seed`` or ``generator`` fixes them.
    (Rotations of ``so3_mixture``: ``training.lab.so3.sample``.)"""
    check_names([name], so3=False)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    return DATASETS[name](n, generator).float()
