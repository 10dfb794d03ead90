"""The SD3 / SD3.5 MMDiT backbone (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Glossary: ``img`` image tokens [B, Li, D], ``txt`` text tokens [B, Lt, D], ``vec`` the conditioning vector
[B, D] (timestep embedding + pooled text embedding), ``D`` the hidden size, ``H`` heads, ``Dh = D / H``.

Each joint block runs one attention over the concatenated [img, txt] sequence, with separate weights per
stream (qkv, output projection, MLP, adaLN-Zero modulation). The last block's text stream is "pre-only": it
only feeds keys and values to the image stream. SD3.5 adds an RMS-norm on q and k (``qk_norm="rms_norm"``)
and, in SD3.5 medium, MMDiT-X blocks whose image stream has a second, image-only attention (``attn2``).

``SD3Transformer(config)(x, t, txt, vec)`` equals diffusers' ``SD3Transformer2DModel(hidden_states=x,
encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t).sample`` on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmdit_flow.attention import AttentionBackendMixin, attention
from mmdit_flow.models.layers import (
    MLP,
    MLPEmbedder,
    Modulation,
    ModulationOut,
    RMSNorm,
    layer_norm,
    modulate,
    timestep_embedding,
)
from mmdit_flow.models.patch import PatchEmbed, crop_table, sincos_2d_table, unpatchify
from mmdit_flow.step_cache import StepCacheMixin

TIME_DIM = 256  # width of the sinusoidal timestep features fed to t_embedder
QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class SD3Config:
    """Shapes of an SD3 / SD3.5 MMDiT. The defaults are SD3-medium; see ``SD3Config.preset``."""

    in_channels: int = 16  # latent channels
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536  # D = num_heads * head dim
    num_heads: int = 24
    depth: int = 24  # joint blocks
    context_dim: int = 4096  # width of the text tokens (T5 / CLIP features)
    vec_dim: int = 2048  # width of the pooled text vector (CLIP-L + CLIP-G)
    pos_embed_max_size: int = 192  # side of the square position table, in patches
    sample_size: int = 128  # latent side the table's positions are scaled to (sets the table's frequencies)
    qk_norm: str | None = None  # None | "rms_norm" (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks (SD3.5 medium: 0..12)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(set(self.dual_attention_layers))))
        for name in ("in_channels", "out_channels", "patch_size", "hidden_size", "num_heads", "depth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SD3Config.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("context_dim", "vec_dim", "pos_embed_max_size", "sample_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SD3Config.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"SD3Config.hidden_size ({self.hidden_size}) must be a multiple of num_heads")
        if self.hidden_size % 4:
            raise ValueError(
                f"SD3Config.hidden_size must be a multiple of 4 (2-D sin-cos table), got {self.hidden_size}"
            )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3Config.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"SD3Config.dual_attention_layers {bad} are outside the blocks 0..{self.depth - 1}"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(f"SD3Config.sample_size ({self.sample_size}) must be a multiple of patch_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @staticmethod
    def preset(name: str) -> SD3Config:
        """The shapes of a released model: "sd3_medium", "sd35_medium" or "sd35_large"."""
        if name not in PRESETS:
            raise ValueError(f"unknown SD3 preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]


SD3_MEDIUM = SD3Config()
SD35_MEDIUM = replace(
    SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))
)
SD35_LARGE = replace(SD3_MEDIUM, hidden_size=2432, num_heads=38, depth=38, qk_norm="rms_norm")
PRESETS = {"sd3_medium": SD3_MEDIUM, "sd35_medium": SD35_MEDIUM, "sd35_large": SD35_LARGE}


class SD3Attention(nn.Module):
    """One stream's attention weights: fused qkv projection, optional q/k RMS-norm, output projection.

    (Flux's ``SelfAttention`` differs in its checkpoint layout: a ``QKNorm`` module, always a projection.)
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, proj: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim // num_heads) if qk_norm else None
        self.norm_k = RMSNorm(dim // num_heads) if qk_norm else None
        self.proj = nn.Linear(dim, dim) if proj else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> q, k, v, each [B, H, L, Dh], with q and k normalised when qk_norm is set."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)  # [B, L, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        if self.norm_q is not None:
            # normalise copies: the norms' backward then keeps these, not the whole qkv output with v
            q, k = self.norm_q(q.contiguous()), self.norm_k(k.contiguous())
        return q, k, v

    def kv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> k, v, each [B, H, L, Dh] (k normalised when qk_norm is set), without the queries."""
        B, L, D = x.shape
        if type(self.qkv) is nn.Linear:  # the k and v rows of the fused projection
            kv = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:])
        else:  # a wrapped layer (e.g. LoRA): call it as it is
            kv = self.qkv(x)[..., D:]
        kv = kv.view(B, L, 2, self.num_heads, D // self.num_heads)  # [B, L, 2, H, Dh]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        if self.norm_k is not None:
            k = self.norm_k(k.contiguous())
        return k, v


class StreamMod(NamedTuple):
    """What a stream carries from before the joint attention to after it."""

    attn: ModulationOut  # its shift and scale are spent on the attention input; gate is for the residual
    mlp: ModulationOut
    attn2: ModulationOut | None = None  # MMDiT-X: the image-only attention
    x_norm: torch.Tensor | None = None  # MMDiT-X: norm(x), the input of attn2 as well


class Stream(nn.Module):
    """One stream of a joint block: adaLN-Zero modulation (shift, scale, gate for attention and for MLP)."""

    n_mod = 6

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.mod = Modulation(dim, self.n_mod)
        self.attn = SD3Attention(dim, num_heads, qk_norm)
        self.mlp = MLP(dim, 4 * dim)

    def pre_attention(self, x: torch.Tensor, vec: torch.Tensor):
        """The stream's (q, k, v) for the joint attention, and its modulation for ``add_attention``."""
        attn_mod, mlp_mod = self.mod.triples(vec)
        q, k, v = self.attn.qkv_heads(modulate(layer_norm(x), attn_mod.shift, attn_mod.scale))
        return (q, k, v), StreamMod(attn_mod, mlp_mod)

    def add_attention(
        self, x: torch.Tensor, attn: torch.Tensor, mod: StreamMod, backend: str
    ) -> torch.Tensor:
        """x + gate_a * attn, with attn the stream's projected joint-attention output."""
        return torch.addcmul(x, mod.attn.gate, attn)

    def add_mlp(self, x: torch.Tensor, mod: ModulationOut) -> torch.Tensor:
        """x + gate_m * mlp(modulate(norm(x), shift_m, scale_m))."""
        return torch.addcmul(x, mod.gate, self.mlp(modulate(layer_norm(x), mod.shift, mod.scale)))


class DualStream(Stream):
    """MMDiT-X image stream (SD3.5): a second, image-only attention ``attn2`` with its own shift/scale/gate.

    Both read the same normalised input: x + gate_a * joint(...) + gate_2 * attn2(modulate_2(norm(x))).
    """

    n_mod = 9

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__(dim, num_heads, qk_norm)
        self.attn2 = SD3Attention(dim, num_heads, qk_norm)

    def pre_attention(self, x: torch.Tensor, vec: torch.Tensor):
        attn_mod, mlp_mod, attn2_mod = self.mod.triples(vec)
        x_norm = layer_norm(x)
        q, k, v = self.attn.qkv_heads(modulate(x_norm, attn_mod.shift, attn_mod.scale))
        return (q, k, v), StreamMod(attn_mod, mlp_mod, attn2_mod, x_norm)

    def add_attention(
        self, x: torch.Tensor, attn: torch.Tensor, mod: StreamMod, backend: str
    ) -> torch.Tensor:
        """x + gate_a * attn + gate_2 * attn2(modulate_2(norm(x)))."""
        q, k, v = self.attn2.qkv_heads(modulate(mod.x_norm, mod.attn2.shift, mod.attn2.scale))
        if self.attn2.norm_q is not None:  # q and k are copies: a copy of v lets the [B, L, 3 D] qkv go
            v = v.contiguous()
        attn2 = self.attn2.proj(attention(q, k, v, backend))
        del q, k, v
        return torch.addcmul(torch.addcmul(x, mod.attn.gate, attn), mod.attn2.gate, attn2)


class PreOnlyStream(nn.Module):
    """The last block's text stream: it only supplies q, k, v (shift, scale; no output projection, no MLP)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.mod = Modulation(dim, 2)
        self.attn = SD3Attention(dim, num_heads, qk_norm, proj=False)

    def pre_attention(self, x: torch.Tensor, vec: torch.Tensor):
        """(None, k, v): the text queries' outputs would be discarded, so they are never computed."""
        shift, scale = self.mod(vec)
        if self.attn.norm_q is not None and torch.is_grad_enabled():
            # norm_q then has no effect; this keeps it in the graph with the zero gradient it has in the full
            # computation (DDP without find_unused_parameters and weight decay expect a gradient)
            shift = shift + 0.0 * self.attn.norm_q.weight.sum()
        return (None, *self.attn.kv_heads(modulate(layer_norm(x), shift, scale))), None


class JointBlock(nn.Module):
    """MMDiT block: one attention over [img, txt] with per-stream weights, then per-stream MLPs."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, dual: bool, pre_only: bool):
        super().__init__()
        self.img = (DualStream if dual else Stream)(dim, num_heads, qk_norm)
        self.txt = (PreOnlyStream if pre_only else Stream)(dim, num_heads, qk_norm)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        img, txt, img_mod, txt_mod = self.joint_attention(img, txt, vec, backend)
        img = self.img.add_mlp(img, img_mod)
        return img, None if txt_mod is None else self.txt.add_mlp(txt, txt_mod)

    def joint_attention(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, backend: str):
        """Both streams after their attention residual (txt None when pre-only) and their MLP modulation.

        Its own function so that q, k, v, the attention outputs and the rest of the modulation are freed
        before the MLPs run.
        """
        img_qkv, img_mod = self.img.pre_attention(img, vec)
        txt_qkv, txt_mod = self.txt.pre_attention(txt, vec)
        # [B, H, Li + Lt, Dh]; a pre-only text stream has no queries: then q is the image's alone
        q, k, v = (
            a if b is None else torch.cat([a, b], dim=2) for a, b in zip(img_qkv, txt_qkv, strict=True)
        )
        del img_qkv, txt_qkv
        out = attention(q, k, v, backend)  # [B, Li (+ Lt), D]
        del q, k, v
        n_img = img.shape[1]
        img = self.img.add_attention(img, self.img.attn.proj(out[:, :n_img]), img_mod, backend)
        if txt_mod is None:
            return img, None, img_mod.mlp, None
        txt = self.txt.add_attention(txt, self.txt.attn.proj(out[:, n_img:]), txt_mod, backend)
        return img, txt, img_mod.mlp, txt_mod.mlp


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to p * p * C_out values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.mod = Modulation(dim, 2)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(vec)
        return self.linear(modulate(layer_norm(x), shift, scale))


class SD3Transformer(StepCacheMixin, AttentionBackendMixin, nn.Module):
    """SD3 / SD3.5 MMDiT: ``model(x, t, txt, vec) -> v``, the velocity for latents ``x`` at flow time ``t``.

    Set ``model.gradient_checkpointing = True`` to recompute each block in the backward pass, and
    ``model.attention_backend`` to one of ``mmdit_flow.attention.BACKENDS``. ``model.enable_cache(config)``
    turns on lossy step caching for sampling (``mmdit_flow.step_cache``).
    """

    cache_block_lists = ("blocks",)

    def __init__(self, config: SD3Config, *, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = c = config
        self.attention_backend = attention_backend
        self.gradient_checkpointing = False
        D = c.hidden_size
        self.x_embedder = PatchEmbed(c.in_channels, D, c.patch_size)
        table = sincos_2d_table(D, c.pos_embed_max_size, c.sample_size // c.patch_size)
        self.register_buffer("pos_embed", table[None], persistent=True)  # [1, M * M, D]
        self.t_embedder = MLPEmbedder(TIME_DIM, D)
        self.y_embedder = MLPEmbedder(c.vec_dim, D)
        self.context_embedder = nn.Linear(c.context_dim, D)
        self.blocks = nn.ModuleList(
            JointBlock(
                D, c.num_heads, c.qk_norm, dual=i in c.dual_attention_layers, pre_only=i == c.depth - 1
            )
            for i in range(c.depth)
        )
        self.final = FinalLayer(D, c.patch_size, c.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: Xavier-uniform linears with zero bias, N(0, 0.02) timestep MLP, and adaLN-Zero (every
        modulation and the final projection zero, so that each block starts as the identity and v = 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.in_layer, self.t_embedder.out_layer):
            nn.init.normal_(layer.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, Modulation):
                nn.init.zeros_(module.lin.weight)
                nn.init.zeros_(module.lin.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def _check_inputs(self, x, t, txt, vec, guidance) -> torch.Tensor:
        c = self.config
        if guidance is not None:
            raise ValueError(
                "SD3 / SD3.5 models take no guidance embedding; pass guidance=None and use CFG instead"
            )
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be latents [B, {c.in_channels}, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        p, M = c.patch_size, c.pos_embed_max_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be a multiple of the patch size {p}")
        if H // p > M or W // p > M:
            raise ValueError(f"latent size {H}x{W} exceeds the position table: at most {M * p}x{M * p}")
        if txt.ndim != 3 or txt.shape[0] != B or txt.shape[2] != c.context_dim:
            raise ValueError(f"txt must be [B={B}, L, {c.context_dim}], got shape {tuple(txt.shape)}")
        if vec.shape != (B, c.vec_dim):
            raise ValueError(f"vec must be [B={B}, {c.vec_dim}], got shape {tuple(vec.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or a tensor [B={B}], got shape {tuple(t.shape)}")
        return t

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        txt: torch.Tensor,
        vec: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, H, W], t [B] in [0, 1] (1 = noise), txt [B, L, context_dim], vec [B, vec_dim]
        -> v [B, C_out, H, W] in x's dtype. Inputs are cast to the weights' dtype (e.g. an fp32 ODE state
        into a bf16 network)."""
        t = self._check_inputs(x, t, txt, vec, guidance)
        c = self.config
        out_dtype, dtype = x.dtype, self.context_embedder.weight.dtype
        x, txt, vec = x.to(dtype), txt.to(dtype), vec.to(dtype)
        h, w = x.shape[2] // c.patch_size, x.shape[3] // c.patch_size
        img = self.x_embedder(x)  # [B, h * w, D]
        img = (img + crop_table(self.pos_embed, c.pos_embed_max_size, h, w)).to(dtype)
        vec = self.t_embedder(timestep_embedding(t, TIME_DIM).to(dtype)) + self.y_embedder(vec)  # [B, D]
        txt = self.context_embedder(txt)  # [B, L, D]
        if self.step_cache is None:
            img, _ = self._run_blocks(self.blocks, img, txt, vec)
        else:  # lossy reuse of earlier steps (mmdit_flow/step_cache.py)
            img = self.step_cache(
                t, img, txt,
                head=lambda img, txt: self._run_blocks(self.blocks[:1], img, txt, vec),
                tail=lambda img, txt: self._run_blocks(self.blocks[1:], img, txt, vec)[0],
            )  # fmt: skip
        img = self.final(img, vec)  # [B, h * w, p * p * C_out]
        return unpatchify(img, h, w, c.patch_size).to(out_dtype)

    def _run_blocks(self, blocks: nn.ModuleList, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor):
        """img and txt after the given joint blocks, through activation checkpointing when it is on and
        gradients are being recorded (txt is None after the last block)."""
        for block in blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, vec, self.attention_backend, use_reentrant=False)
            else:
                img, txt = block(img, txt, vec, self.attention_backend)
        return img, txt
