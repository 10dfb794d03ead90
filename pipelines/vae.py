"""Latents <-> images with diffusers' ``AutoencoderKL``, the way SD3 and Flux use it.

The transformer works on normalised latents ``z = (vae_latent - shift_factor) * scaling_factor``; decoding
undoes that: ``vae_latent = z / scaling_factor + shift_factor``. Images are [B, 3, H, W] in [0, 1] (the VAE
itself works in [-1, 1]). The VAE is kept in fp32 when its config sets ``force_upcast`` (set at load time by
the pipeline). Latents that are not finite are refused before decoding (diffusers decodes them silently into
black images), and so are decoded images that are not finite (a VAE overflowing in float16).

Tiled decoding (``set_tiling``) is ours, not diffusers' ``tiled_decode``: diffusers cuts the last row and
column of tiles at the border, so on a VAE whose tile is a large share of the image (the shipped tiny-shapes
VAE: 64 px tiles, 128 px images) those short tiles decode with little context and leave bands at the bottom
and right edges. Here every tile is whole (the last one ends at the border, the starts spread evenly), with
at least the VAE's overlap between neighbours, and the overlaps are blended by linear ramps whose weights sum
to one. The tile side and overlap are diffusers' settings on the VAE (``tile_latent_min_size``, from the
config's ``sample_size``, and ``tile_overlap_factor``), so they can be changed as in diffusers.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class NonFiniteLatentsError(RuntimeError):
    """The sampler produced NaN or inf latents; decoding them would give a black or garbage image."""


class NonFiniteImagesError(RuntimeError):
    """The VAE decoded finite latents to NaN or inf pixels (it overflowed, or its weights are broken)."""


def vae_scale(config: Any) -> int:
    """Image pixels per latent pixel of a VAE config: 2 ** (number of blocks - 1)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def rows_with(bad: torch.Tensor) -> list[int]:
    """The batch indices of the rows of ``bad`` [B, ...] that hold any True."""
    return sorted({int(i) for i in bad.flatten(1).any(dim=1).nonzero().flatten()})


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of whole tiles of side ``tile`` covering [0, size), neighbours sharing >= ``overlap``."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))  # tiles needed for that overlap
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(starts: list[int], i: int, tile: int, scale: int) -> torch.Tensor:
    """Blend weights [tile * scale] of tile i along one axis: rising over the overlap with the previous
    tile, falling over the overlap with the next, 1 elsewhere (a pixel's weights over its tiles sum to 1)."""
    w = torch.ones(tile * scale)
    before = (starts[i - 1] + tile - starts[i]) * scale if i > 0 else 0
    after = (starts[i] + tile - starts[i + 1]) * scale if i + 1 < len(starts) else 0
    if before > 0:
        w[:before] = (torch.arange(before) + 0.5) / before
    if after > 0:
        w[-after:] = torch.minimum(w[-after:], (after - 0.5 - torch.arange(after)) / after)
    return w


class LatentCodec:
    """Wraps an ``AutoencoderKL``: ``decode(z)`` -> images in [0, 1], ``encode(images)`` -> z."""

    def __init__(self, vae: Any):
        self.vae = vae
        config = vae.config
        self.scale_factor = vae_scale(config)  # image pixels per latent pixel
        self.tiling = False
        self.channels = int(config.latent_channels)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.get("shift_factor", None) or 0.0)
        self.force_upcast = bool(config.get("force_upcast", False))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def set_tiling(self, enabled: bool) -> None:
        """Decode latents larger than one tile tile by tile (bounded memory; blended seams, pixels change
        slightly). See the module docstring."""
        self.tiling = bool(enabled)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> images [B, 3, h * s, w * s] fp32 in [0, 1], with x = z / scaling + shift."""
        bad = ~torch.isfinite(z)
        if bad.any():
            raise NonFiniteLatentsError(
                f"the sampled latents of image(s) {rows_with(bad)} contain NaN or inf ({int(bad.sum())} "
                "values), so they cannot be decoded. This usually means the transformer overflowed: run it "
                "in bfloat16 or float32 rather than float16, lower the guidance scale, or check the weights."
            )
        x = (z / self.scaling_factor + self.shift_factor).to(device=self.device, dtype=self.dtype)
        tile = int(self.vae.tile_latent_min_size)
        if self.tiling and max(x.shape[-2:]) > tile:
            image = self._decode_tiled(x, tile)
        else:
            image = self.vae.decode(x, return_dict=False)[0]
        bad = ~torch.isfinite(image)
        if bad.any():
            what = (
                "In float32 that means broken VAE weights (NaN or huge values): check or re-download vae/."
                if self.dtype == torch.float32
                else 'It overflowed: decode in float32 (set "force_upcast": true in vae/config.json, or load '
                "with dtype=torch.float32), or use a VAE made for this dtype."
            )
            raise NonFiniteImagesError(
                f"the VAE decoded the finite latents of image(s) {rows_with(bad)} to NaN or inf pixels "
                f"({int(bad.sum())} values) in {self.dtype}. {what}"
            )
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _decode_tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """x [B, C, h, w] -> [B, 3, h * s, w * s] in [-1, 1], decoded in whole overlapping tiles."""
        s, (h, w) = self.scale_factor, x.shape[-2:]
        overlap = min(tile - 1, max(1, round(tile * float(self.vae.tile_overlap_factor))))
        rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        out = torch.zeros(x.shape[0], 3, h * s, w * s, device=x.device)
        weight = torch.zeros(h * s, w * s, device=x.device)
        for i, r in enumerate(rows):
            ramp_r = _ramp(rows, i, min(tile, h), s).to(x.device)
            for j, c in enumerate(cols):
                ramp_c = _ramp(cols, j, min(tile, w), s).to(x.device)
                part = self.vae.decode(x[:, :, r : r + tile, c : c + tile], return_dict=False)[0]
                wt = ramp_r[:, None] * ramp_c[None, :]  # [tile * s, tile * s]
                area = (slice(r * s, r * s + wt.shape[0]), slice(c * s, c * s + wt.shape[1]))
                out[(..., *area)] += part.float() * wt
                weight[area] += wt
        return out / weight

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> z [B, C, H / s, W / s] = (latent - shift) * scaling, fp32.

        With a ``generator`` the latent is drawn from the VAE posterior, otherwise its mean is used.
        """
        dist = self.vae.encode((2 * images - 1).to(device=self.device, dtype=self.dtype)).latent_dist
        latent = dist.sample(generator) if generator is not None else dist.mode()
        return (latent.float() - self.shift_factor) * self.scaling_factor


def to_numpy(images: torch.Tensor):
    """[B, 3, H, W] in [0, 1] -> float32 numpy [B, H, W, 3]."""
    return images.permute(0, 2, 3, 1).float().cpu().numpy()


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images, rounded as diffusers rounds them: round(255 * x)."""
    from PIL import Image

    array = (to_numpy(images) * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]
