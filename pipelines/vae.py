"""Latents <-> images with diffusers' ``AutoencoderKL``, the way SD3 and Flux use it.

The transformer works on normalised latents ``z = (vae_latent - shift_factor) * scaling_factor``; decoding
undoes that: ``vae_latent = z / scaling_factor + shift_factor``. Images are [B, 3, H, W] in [0, 1] (the VAE
itself works in [-1, 1]). The VAE is kept in fp32 when its config sets ``force_upcast`` (set at load time by
the pipeline), and latents that are not finite are refused before decoding: diffusers decodes them
silently into black images.
"""

from __future__ import annotations

from typing import Any

import torch


class NonFiniteLatentsError(RuntimeError):
    """The sampler produced NaN or inf latents; decoding them would give a black or garbage image."""


class LatentCodec:
    """Wraps an ``AutoencoderKL``: ``decode(z)`` -> images in [0, 1], ``encode(images)`` -> z."""

    def __init__(self, vae: Any):
        self.vae = vae
        config = vae.config
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)  # image pixels per latent pixel
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
        """Decode large images tile by tile (bounded memory; seams are blended, so pixels change slightly)."""
        self.vae.enable_tiling() if enabled else self.vae.disable_tiling()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> images [B, 3, h * s, w * s] fp32 in [0, 1], with x = z / scaling + shift."""
        bad = ~torch.isfinite(z)
        if bad.any():
            rows = sorted({int(i) for i in bad.flatten(1).any(dim=1).nonzero().flatten()})
            raise NonFiniteLatentsError(
                f"the sampled latents of image(s) {rows} contain NaN or inf ({int(bad.sum())} values), so "
                "they cannot be decoded. This usually means the transformer overflowed: run it in bfloat16 "
                "or float32 rather than float16, lower the guidance scale, or check the weights."
            )
        x = z / self.scaling_factor + self.shift_factor
        image = self.vae.decode(x.to(device=self.device, dtype=self.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

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
