"""Flux (FLUX.1 dev / schnell): a rectified-flow transformer with double- and single-stream blocks and RoPE.

Interface (the same as SD3's): ``model(x, t, txt, vec, guidance=None) -> v`` with x [B, C, H, W] latents
(H, W even), t [B] in [0, 1] (1 = noise), txt [B, L, context_dim] T5 tokens, vec [B, vec_dim] pooled CLIP
text, guidance [B] the raw guidance scale (e.g. 3.5) for guidance-distilled models; v [B, C_out, H, W].

Inside, latents are packed into 2x2 patches, tokens [B, (H / 2) (W / 2), 4 C], exactly as diffusers'
``FluxPipeline._pack_latents`` does; image positions are (0, row, col) on the packed grid and text positions
are all zero, as ``FluxPipeline`` builds ``img_ids`` / ``txt_ids``.

Relation to diffusers: ``FluxTransformer2DModel.forward`` multiplies both ``timestep`` and ``guidance`` by
1000 before its sinusoidal embedding, and ``FluxPipeline`` passes ``timestep = scheduler_t / 1000 = sigma``.
Hence

    model(x, t, txt, vec, g) == unpack(diffusers(hidden_states=pack(x), timestep=t, guidance=g,
                                                encoder_hidden_states=txt, pooled_projections=vec,
                                                img_ids=img_ids, txt_ids=txt_ids))

with t = sigma in [0, 1] passed as it is (not 1000 t) and g the raw guidance scale. Here the factor 1000 is
applied by ``mmdit_flow.models.layers.timestep_embedding`` to both t and g (the BFL convention).

Glossary: ``img`` image tokens, ``txt`` text tokens, ``vec`` the pooled text input, ``cond`` the conditioning
vector time_in(t) [+ guidance_in(g)] + vector_in(vec) that the blocks call ``vec`` (BFL's name), ``pe`` rotary
tables, ``N`` image tokens, ``L`` text tokens, ``D`` hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmdit_flow.attention import AttentionBackendMixin
from mmdit_flow.models.flux_layers import DoubleStreamBlock, LastLayer, Rope, SingleStreamBlock, rope
from mmdit_flow.models.layers import MLPEmbedder, timestep_embedding
from mmdit_flow.step_cache import StepCacheMixin

ROPE_THETA = 10000.0
TIME_EMBED_DIM = 256  # sinusoidal features fed to time_in and guidance_in
MLP_RATIO = 4.0  # all released Flux models (and diffusers' class) use 4


@dataclass(frozen=True)
class FluxConfig:
    """Shapes of a Flux transformer; the defaults are FLUX.1-dev's."""

    in_channels: int = 16  # latent channels C of x (the model sees 4 C after 2x2 packing)
    out_channels: int = 16  # channels of the returned velocity
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    context_dim: int = 4096  # T5 token width
    vec_dim: int = 768  # pooled CLIP-L width
    axes_dim: tuple[int, ...] = (16, 56, 56)  # rotary channels per position axis; sums to the head dim
    guidance_embed: bool = True  # guidance-distilled (dev) takes the guidance scale as an input

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "hidden_size", "num_heads", "context_dim", "vec_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FluxConfig.{name} must be a positive int, got {value!r}")
        for name in ("depth", "depth_single"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"FluxConfig.{name} must be an int >= 0, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if len(self.axes_dim) != 3 or any(not isinstance(d, int) or d < 2 or d % 2 for d in self.axes_dim):
            raise ValueError(
                f"FluxConfig.axes_dim must be three even positive ints (rotary channels of the axes "
                f"(0, row, col)), "
                f"got {self.axes_dim!r}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"FluxConfig.axes_dim {self.axes_dim} must sum to the head dim hidden_size / num_heads = "
                f"{self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = replace(FLUX_DEV, guidance_embed=False)
PRESETS = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL}


def pack(x: torch.Tensor) -> torch.Tensor:
    """2x2 patches to tokens: [B, C, H, W] -> [B, (H / 2) (W / 2), 4 C], channel index c * 4 + 2 dy + dx."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H / 2, W / 2, C, 2, 2]
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack``: [B, (H / 2) (W / 2), 4 C] -> [B, C, H, W]."""
    B, _, n = tokens.shape
    x = tokens.view(B, height // 2, width // 2, n // 4, 2, 2)  # [B, H / 2, W / 2, C, 2, 2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, H / 2, 2, W / 2, 2]
    return x.reshape(B, n // 4, height, width)


def position_ids(txt_len: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions of the joint sequence [txt; img] as [L + h w, 3]: text (0, 0, 0), image (0, row, col)."""
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :].expand(h, w)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    txt_ids = torch.zeros(txt_len, 3, device=device)
    return torch.cat([txt_ids, img_ids], dim=0)


class FluxTransformer(StepCacheMixin, AttentionBackendMixin, nn.Module):
    """The Flux velocity network v(x, t, txt, vec[, guidance]); see the module docstring for the interface.

    ``attention_backend`` ("sdpa" | "math" | "xformers" | "reference") can be changed after construction; set
    ``gradient_checkpointing = True`` to recompute each block in the backward pass instead of storing it.
    ``model.enable_cache(config)`` turns on lossy step caching for sampling (``mmdit_flow.step_cache``).
    """

    cache_block_lists = ("double_blocks", "single_blocks")

    def __init__(self, config: FluxConfig, *, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.gradient_checkpointing = False
        c, D = config, config.hidden_size
        self.img_in = nn.Linear(4 * c.in_channels, D)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, D)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, D) if c.guidance_embed else None
        self.vector_in = MLPEmbedder(c.vec_dim, D)
        self.txt_in = nn.Linear(c.context_dim, D)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(D, c.num_heads, MLP_RATIO) for _ in range(c.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, c.num_heads, MLP_RATIO) for _ in range(c.depth_single)
        )
        self.final_layer = LastLayer(D, 4 * c.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias, N(0, 0.02) embedders, and adaLN-Zero: every modulation and
        the final projection start at zero, so each block starts as the identity and the output as v = 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        embedders = [self.time_in, self.vector_in] + (
            [self.guidance_in] if self.guidance_in is not None else []
        )
        for embedder in embedders:
            nn.init.normal_(embedder.in_layer.weight, std=0.02)
            nn.init.normal_(embedder.out_layer.weight, std=0.02)
        modulations = [b.img_mod for b in self.double_blocks] + [b.txt_mod for b in self.double_blocks]
        modulations += [b.modulation for b in self.single_blocks] + [self.final_layer.modulation]
        for layer in [m.lin for m in modulations] + [self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Velocity v [B, C_out, H, W] for latents x [B, C, H, W] at times t [B] (see the module doc)."""
        t, guidance = self._check_inputs(x, t, txt, vec, guidance)
        B, _, H, W = x.shape
        dtype = self.img_in.weight.dtype
        img = self.img_in(pack(x.to(dtype)))  # [B, N, D]
        cond = self.time_in(timestep_embedding(t, TIME_EMBED_DIM).to(dtype))
        if self.guidance_in is not None:
            cond = cond + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM).to(dtype))
        cond = cond + self.vector_in(vec.to(dtype))  # [B, D]
        txt = self.txt_in(txt.to(dtype))  # [B, L, D]
        pe = rope(
            position_ids(txt.shape[1], H // 2, W // 2, device=x.device), self.config.axes_dim, ROPE_THETA
        )
        if self.step_cache is None:
            img = self._run_blocks(self.double_blocks, self.single_blocks, img, txt, cond, pe)
        else:  # lossy reuse of earlier steps (mmdit_flow/step_cache.py)
            head, tail = self.double_blocks[:1], self.double_blocks[1:]
            img = self.step_cache(
                t, img, txt,
                head=lambda img, txt: self._run_double(head, img, txt, cond, pe),
                tail=lambda img, txt: self._run_blocks(tail, self.single_blocks, img, txt, cond, pe),
            )  # fmt: skip
        return unpack(self.final_layer(img, cond), H, W).to(x.dtype)

    def _run_double(
        self, blocks: nn.ModuleList, img, txt, cond, pe: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img and txt after the given double-stream blocks."""
        for block in blocks:
            img, txt = self._run(block, img, txt, cond, pe)
        return img, txt

    def _run_blocks(
        self, double: nn.ModuleList, single: nn.ModuleList, img, txt, cond, pe: Rope
    ) -> torch.Tensor:
        """The image tokens after the given double-stream blocks and then the single-stream ones."""
        img, txt = self._run_double(double, img, txt, cond, pe)
        if len(single):
            L = txt.shape[1]
            joint = torch.cat([txt, img], dim=1)  # [B, L + N, D]
            del txt, img
            for block in single[:-1]:
                joint = self._run(block, joint, cond, pe)
            # the text outputs of the last block are never read: it returns the image tokens only
            img = self._run(single[-1], joint, cond, pe, keep_from=L)
            del joint
        return img

    def _run(self, block: nn.Module, *args: torch.Tensor | Rope, **kwargs: int):
        """Call a block, through activation checkpointing when it is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, backend=self.attention_backend, use_reentrant=False, **kwargs)
        return block(*args, backend=self.attention_backend, **kwargs)

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        guidance: torch.Tensor | float | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raise a ValueError naming the fix for malformed inputs; return t and guidance as [B] tensors."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be latents [B, {c.in_channels}, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(
                f"latent height and width must be even for Flux's 2x2 packing, got {H}x{W}: use an image "
                "size that is a multiple of 16 pixels"
            )
        if txt.ndim != 3 or txt.shape[0] != B or txt.shape[2] != c.context_dim:
            raise ValueError(f"txt must be [B={B}, L, {c.context_dim}], got shape {tuple(txt.shape)}")
        if vec.shape != (B, c.vec_dim):
            raise ValueError(f"vec must be pooled text [B={B}, {c.vec_dim}], got shape {tuple(vec.shape)}")
        t = _per_sample("t", t, B, x.device)
        if c.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this Flux model is guidance-distilled (guidance_embed=True): pass guidance, the "
                    "guidance scale per sample (FLUX.1-dev uses 3.5)"
                )
            guidance = _per_sample("guidance", guidance, B, x.device)
        elif guidance is not None:
            raise ValueError(
                "this Flux model has no guidance embedding (guidance_embed=False, e.g. schnell): pass "
                "guidance=None and use classifier-free guidance outside the model if needed"
            )
        return t, guidance


def _per_sample(name: str, value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A float or a [B] / [] tensor as a float32 [B] tensor on ``device``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a number or a tensor [B={batch}], got shape {tuple(value.shape)}")
    return value
