"""Patch embedding and the cropped 2-D sin-cos position table of SD3 (MMDiT).

Glossary: ``p`` patch size, ``h, w`` the latent size in patches, ``M`` ``pos_embed_max_size`` (the side of the
square position table), ``D`` the hidden size. Tokens are in row-major (h, w) order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(pos w_i), cos(pos w_i)], w_i = 10000^(-i / (dim / 2)); pos [N] -> [N, dim], computed in fp64."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None]  # [N, dim / 2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)


def sincos_2d_table(dim: int, size: int, base_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The [size * size, dim] position table: token (i, j) -> [sincos(j s), sincos(i s)], s = base / size.

    Positions are scaled so that the table spans [0, base_size) with base_size = sample_size / patch_size;
    the first half of the channels encodes the column, the second half the row (as SD3 was trained).
    """
    # positions in fp32 before the fp64 frequencies, exactly as the checkpoints' tables were made
    pos = torch.arange(size, dtype=torch.float32, device=device) / (size / base_size)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [size, size] each
    emb_col = sincos_1d(cols.reshape(-1), dim // 2)  # [size * size, dim / 2]
    emb_row = sincos_1d(rows.reshape(-1), dim // 2)
    return torch.cat([emb_col, emb_row], dim=-1).float()


def crop_table(table: torch.Tensor, max_size: int, h: int, w: int) -> torch.Tensor:
    """The centred h x w window of the [1, M * M, D] position table, as [1, h * w, D]."""
    top, left = (max_size - h) // 2, (max_size - w) // 2
    grid = table.view(1, max_size, max_size, -1)  # [1, M, M, D]
    return grid[:, top : top + h, left : left + w].reshape(1, h * w, -1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: x [B, C, H, W] -> [B, (H / p) * (W / p), D].

    The weight is a stride-p convolution's ([D, C, p, p], as checkpoints store it), applied as one GEMM over
    the unfolded patches: the same numbers, with tokens contiguous in (h, w) order and no transposed copy.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, h, w = self.patch_size, H // self.patch_size, W // self.patch_size
        patches = x.view(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
        patches = patches.reshape(B, h * w, C * p * p)
        return F.linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)


def unpatchify(x: torch.Tensor, h: int, w: int, patch_size: int) -> torch.Tensor:
    """Tokens back to latents: [B, h * w, p * p * C] -> [B, C, h * p, w * p]."""
    B, _, n = x.shape
    p = patch_size
    x = x.view(B, h, w, p, p, n // (p * p))  # [B, h, w, p, p, C]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, n // (p * p), h * p, w * p)
