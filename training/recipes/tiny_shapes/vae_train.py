"""Train the tiny captioned-shapes ``AutoencoderKL`` on the CPU, then fit its latent normalisation.

Glossary: ``x`` images in [-1, 1] (the VAE's range), [B, 3, H, W]; ``z`` the VAE latent,
[B, 16, H / 4, W / 4]; ``mu, logvar`` the posterior's mean and log-variance; ``shift, scale`` the
normalisation stored in the VAE config, so that the transformer sees ``(z - shift) * scale`` with mean 0
and standard deviation 1.

The loss per batch is

    L = mean(w * |x_hat - x|) + mean(w * (x_hat - x)^2) + beta * mean(KL(N(mu, sigma^2) || N(0, 1))),

means over pixels (over latent elements for the KL), with ``x_hat = D(z)``, ``w = 1 + lambda`` on object
pixels (those that differ from the image's corner pixel, always background here) and 1 elsewhere, and
``z ~ N(mu, sigma^2)`` (the reparameterisation trick). The KL weight is small: it keeps the posterior from
collapsing to a point and the latents from drifting to large values, nothing more.

It trains on whole 64x64 images (``crop = 64``). Smaller random crops are four times cheaper per sample,
but GroupNorm normalises with whole-image statistics, so a crop-trained network sees different statistics
at use; a run on 32x32 crops (4 groups, lr 3e-3, 800 steps) gave desaturated objects, 19 dB and 4 % colour
accuracy. The middle block has no attention (cheaper; nothing here needs global mixing). Data come from
:mod:`mmdit_flow.training.recipes.tiny_shapes.shapes` on the fly, training split only; every draw (scenes,
crops, posterior noise) comes from the seed, so a run is reproducible.

After training, SD3's recipe fixes the normalisation from the latents' statistics:
``shift = mean(z)`` and ``scale = 1 / std(z)`` over posterior means of training images.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmdit_flow.training.recipes.tiny_shapes import shapes

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

LOGVAR_INIT = -6.0  # initial posterior log-variance (see build_vae)


@dataclass(frozen=True)
class VAEArch:
    """The tiny VAE's architecture. ``len(block_out_channels) = 3`` gives a downsampling factor of 4."""

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 16  # as SD3 and Flux
    norm_num_groups: int = 1  # one group: GroupNorm over all channels (see the module docstring)
    image_size: int = 64

    def __post_init__(self) -> None:
        if len(self.block_out_channels) < 1:
            raise ValueError("block_out_channels needs at least one entry, e.g. (16, 32, 64)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every entry of block_out_channels {self.block_out_channels} must be a multiple of "
                f"norm_num_groups={self.norm_num_groups}"
            )

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 ** (len(block_out_channels) - 1), as the pipelines compute it."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class VAETrainConfig:
    """Optimisation settings of :func:`train_vae_model`."""

    steps: int = 3000
    batch_size: int = 4
    crop: int = 64  # side of the random training crops; 64: whole images (module docstring)
    lr: float = 2e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 1e-4
    kl_weight: float = 1e-4
    foreground_weight: float = 4.0  # lambda: extra loss weight on object pixels (objects are ~10 % of pixels)
    seed: int = 0
    stats_images: int = 512  # training images used to fit shift and scale

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not 8 <= self.crop <= 64:
            raise ValueError(f"crop must be between 8 and the image size 64, got {self.crop}")


@dataclass
class VAEMetrics:
    """What a VAE run measured: timings, final loss, and the fitted latent normalisation."""

    steps: int
    wall_s: float
    cpu_s: float  # process CPU time of the training loop: comparable across loads, unlike wall_s
    final_loss: float
    shift_factor: float
    scaling_factor: float
    parameters: int
    history: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(arch: VAEArch = VAEArch(), *, seed: int = 0) -> AutoencoderKL:
    """A fresh SD3-style ``AutoencoderKL`` (no quant convs, no mid-block attention), seeded by ``seed``."""
    from diffusers import AutoencoderKL

    n = len(arch.block_out_channels)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.block_out_channels,
        layers_per_block=arch.layers_per_block,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.image_size,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    # The encoder's last conv gives [mean, logvar] stacked on channels. At the default zero bias the
    # posterior noise has std 1 and drowns the latent for hundreds of steps while the bias crawls down;
    # starting at logvar = LOGVAR_INIT (std 0.05) lets reconstruction train from the first step.
    with torch.no_grad():
        vae.encoder.conv_out.bias[arch.latent_channels :] = LOGVAR_INIT
    return vae


def shapes_batch(start: int, n: int, *, seed: int = 0, split: str = "train", size: int = 64) -> torch.Tensor:
    """Scenes ``start .. start + n - 1`` of a split, rendered: float32 [n, 3, size, size] in [-1, 1]."""
    images = np.stack(
        [shapes.render(shapes.scene_at(i, seed=seed, split=split), size) for i in range(start, start + n)]
    )
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [n, H, W, 3] -> [n, 3, H, W]


ImageBatches = Callable[..., torch.Tensor]  # (start, n, *, seed) -> float32 [n, 3, H, W] in [-1, 1]


def random_crops(x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``crop`` x ``crop`` window per image of ``x`` [B, C, H, W], at any pixel offset."""
    b, _, h, w = x.shape
    top = torch.randint(0, h - crop + 1, (b,), generator=generator)
    left = torch.randint(0, w - crop + 1, (b,), generator=generator)
    return torch.stack(
        [x[i, :, t : t + crop, l : l + crop] for i, (t, l) in enumerate(zip(top, left, strict=True))]
    )


def foreground_weights(x: torch.Tensor, extra: float) -> torch.Tensor:
    """Per-pixel weights [B, 1, H, W]: 1 + ``extra`` where a pixel differs from the image's top-left
    pixel (background: objects keep a margin from the border), 1 elsewhere."""
    differs = (x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.02
    return 1.0 + extra * differs.float()


def vae_loss(
    vae: AutoencoderKL, x: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """Weighted L1 + L2 reconstruction + ``kl_weight`` * KL to N(0, I) (module docstring)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    x_hat = vae.decode(z).sample
    err, w = x_hat - x, foreground_weights(x, cfg.foreground_weight)
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
    return (w * err.abs()).mean() + (w * err.pow(2)).mean() + cfg.kl_weight * kl


def _lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae_model(
    vae: AutoencoderKL, cfg: VAETrainConfig, *, log_every: int = 50, images: ImageBatches | None = None
) -> VAEMetrics:
    """Train ``vae`` in place on crops of training-split scenes, then store shift / scale in its config.

    ``images(start, n, seed)`` gives the training images ``start .. start + n - 1`` (float32 [n, 3, H, W]
    in [-1, 1]); captioned shapes (:func:`shapes_batch`) by default, another recipe passes its own.
    """
    images = images or shapes_batch
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    vae.train()
    history, start, cpu_start, loss_ema = [], time.perf_counter(), time.process_time(), None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = random_crops(images(step * cfg.batch_size, cfg.batch_size, seed=cfg.seed), cfg.crop, gen)
        loss = vae_loss(vae, x, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            history.append((step + 1, loss_ema))
            logger.info(
                "vae step %d/%d loss %.5f (%.0f s)",
                step + 1,
                cfg.steps,
                loss_ema,
                time.perf_counter() - start,
            )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    vae.eval()
    shift, scale = fit_normalization(vae, cfg.stats_images, seed=cfg.seed, images=images)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    params = sum(p.numel() for p in vae.parameters())
    return VAEMetrics(cfg.steps, wall, cpu, float(loss_ema), shift, scale, params, history)


@torch.no_grad()
def encode_means(vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Posterior means [B, C, h, w] of images ``x`` in [-1, 1], in chunks of ``batch``."""
    return torch.cat([vae.encode(x[i : i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


@torch.no_grad()
def fit_normalization(
    vae: AutoencoderKL, n_images: int, *, seed: int = 0, images: ImageBatches | None = None
) -> tuple[float, float]:
    """SD3's latent normalisation from ``n_images`` training scenes (taken after the training stream):
    shift = mean(z), scale = 1 / std(z) over every element of the posterior means."""
    x = (images or shapes_batch)(10**7, n_images, seed=seed)  # images far past those the training loop drew
    z = encode_means(vae, x)
    return float(z.mean()), float(1.0 / z.std())


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Decode the posterior means of ``x`` [B, 3, H, W] in [-1, 1]: reconstructions in [-1, 1]."""
    out = [vae.decode(vae.encode(x[i : i + batch]).latent_dist.mean).sample for i in range(0, len(x), batch)]
    return torch.cat(out).clamp(-1, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] measured on the [0, 1] scale: 10 log10(1 / MSE), MSE over all pixels.

    Images are quantised to uint8 first, as they are when saved, so the number is that of the PNGs.
    """
    qx = ((x.double() + 1) * 127.5).round().clamp(0, 255) / 255
    qy = ((y.double() + 1) * 127.5).round().clamp(0, 255) / 255
    mse = float((qx - qy).pow(2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 numpy [B, H, W, 3]."""
    return ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
