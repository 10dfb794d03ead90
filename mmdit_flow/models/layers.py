"""Layers shared by the SD3 MMDiT and Flux backbones.

Glossary: ``x`` image tokens, ``txt`` text tokens, ``vec`` the pooled conditioning vector (timestep + pooled
text [+ guidance]), ``t`` the flow time in [0, 1] (1 = noise).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# SD3 and Flux checkpoints were trained with timesteps 1000 * t; this is the one place that factor lives.
TIME_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(1000 t f_i), sin(1000 t f_i)] with f_i = max_period^(-i / (dim / 2)); t [B] -> [B, dim] fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = TIME_SCALE * t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: embeds the sinusoidal timestep, the pooled text vector or the guidance
    scale."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype (bf16-safe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class MLP(nn.Module):
    """The transformer feed-forward: Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ModulationOut(NamedTuple):
    """One sub-layer's adaLN parameters, each [B, 1, dim]: x + gate * f(modulate(norm(x), shift, scale))."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """adaLN modulation: SiLU(vec) -> Linear -> ``n`` chunks of [B, 1, dim] (shift, scale, gate, ...)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)

    def triples(self, vec: torch.Tensor) -> tuple[ModulationOut, ...]:
        """The chunks as (shift, scale, gate) per sub-layer, in the order the checkpoints store them."""
        if self.n % 3:
            raise ValueError(f"a modulation of {self.n} chunks does not split into (shift, scale, gate)")
        chunks = self(vec)
        return tuple(ModulationOut(*chunks[i : i + 3]) for i in range(0, self.n, 3))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift."""
    return torch.addcmul(shift, x, 1 + scale)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (adaLN supplies them)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)
