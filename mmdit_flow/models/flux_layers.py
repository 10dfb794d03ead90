"""The building blocks of Flux: rotary position embedding, double-stream and single-stream blocks, last layer.

Glossary: ``img`` image tokens [B, N, D], ``txt`` text tokens [B, L, D], ``x`` the joint sequence [txt; img]
[B, L + N, D] of the single-stream blocks, ``vec`` the conditioning vector [B, D] (timestep + pooled text
[+ guidance]), ``pe`` the rotary tables of the joint sequence, ``H`` heads, ``Dh`` head dim, ``backend`` the
attention backend name (see ``mmdit_flow.attention``).

Every block is adaLN-modulated: ``modulate(norm(x), shift, scale) = norm(x) * (1 + scale) + shift`` before a
sub-layer and ``x + gate * sublayer(...)`` after it, with (shift, scale, gate) a linear function of SiLU(vec).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmdit_flow.attention import attention
from mmdit_flow.models.layers import MLP, Modulation, RMSNorm, layer_norm, modulate


class Rope(NamedTuple):
    """Rotary tables, fp32 [L, Dh]: ``cos`` = (cos_i, cos_i), ``sin`` = (-sin_i, sin_i) for channel pair i."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> Rope:
    """Rotary tables for positions ``ids`` [L, n_axes]: axis a rotates ``axes_dim[a]`` channels of each head.

    Channel pair (2i, 2i + 1) of axis a turns by the angle ``ids[:, a] * theta^(-2i / axes_dim[a])``; the
    angles are computed in float64 (fp32 where the device has none), the tables returned in fp32.
    """
    dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)  # [dim / 2]
        angles.append(ids[:, a].to(dtype)[:, None] * omega[None])  # [L, dim / 2]
    angle = torch.cat(angles, dim=-1)  # [L, Dh / 2]
    cos, sin = angle.cos().float(), angle.sin().float()
    return Rope(torch.stack([cos, cos], dim=-1).flatten(-2), torch.stack([-sin, sin], dim=-1).flatten(-2))


def apply_rope(x: torch.Tensor, pe: Rope) -> torch.Tensor:
    """Rotate channel pairs (x_2i, x_2i+1) of x [B, H, L, Dh] by the angles of ``pe``, in fp32:

    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin) = x * cos + swap_pairs(x) * (-sin, sin).
    """
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # [B, H, L, Dh / 2, 2]
    swapped = torch.stack([pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # [B, H, L, Dh]
    return torch.addcmul(x32 * pe.cos, swapped, pe.sin).to(x.dtype)


class QKNorm(nn.Module):
    """RMS-norm of queries and keys over the head dim, each with its own learned scale."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    """The weights of one stream's attention: fused q/k/v projection, QK-norm, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> normed q, normed k, v, each [B, H, L, Dh]."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3 * H * Dh] -> q, k, v [B, H, L, Dh], views; one unbind keeps the backward to one stack."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, Dh]
    return q, k, v


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Rope, backend: str) -> torch.Tensor:
    """Attention with rotary positions: q, k, v [B, H, L, Dh] -> [B, L, H * Dh]."""
    return attention(apply_rope(q, pe), apply_rope(k, pe), v, backend)


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text keep their own weights and meet only in one joint attention.

    img += gate1 * proj(attn_img); img += gate2 * mlp(modulate(norm(img), shift2, scale2)), likewise for txt,
    where attn runs over the concatenated sequence [txt; img].
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.img_mod = Modulation(dim, 6)
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = MLP(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, 6)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = MLP(dim, mlp_hidden)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: Rope, backend: str = "sdpa"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod1, img_mod2 = self.img_mod.triples(vec)
        txt_mod1, txt_mod2 = self.txt_mod.triples(vec)
        img_attn, txt_attn = self.joint_attention(
            modulate(layer_norm(img), img_mod1.shift, img_mod1.scale),
            modulate(layer_norm(txt), txt_mod1.shift, txt_mod1.scale),
            pe,
            backend,
        )
        img = torch.addcmul(img, img_mod1.gate, img_attn)
        del img_attn
        img = torch.addcmul(
            img, img_mod2.gate, self.img_mlp(modulate(layer_norm(img), img_mod2.shift, img_mod2.scale))
        )
        txt = torch.addcmul(txt, txt_mod1.gate, txt_attn)
        del txt_attn
        txt = torch.addcmul(
            txt, txt_mod2.gate, self.txt_mlp(modulate(layer_norm(txt), txt_mod2.shift, txt_mod2.scale))
        )
        return img, txt

    def joint_attention(
        self, img: torch.Tensor, txt: torch.Tensor, pe: Rope, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected attention outputs of both streams over [txt; img], from their modulated inputs.

        Its own function so that q, k, v and the joint output are freed before the MLPs run.
        """
        img_q, img_k, img_v = self.img_attn.qkv_heads(img)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt)
        q = torch.cat([txt_q, img_q], dim=2)  # [B, H, L + N, Dh]
        k = torch.cat([txt_k, img_k], dim=2)
        v = torch.cat([txt_v, img_v], dim=2)
        del img_q, img_k, img_v, txt_q, txt_k, txt_v
        attn = rope_attention(q, k, v, pe, backend)  # [B, L + N, D]
        del q, k, v
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)
        return self.img_attn.proj(img_attn), self.txt_attn.proj(txt_attn)


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP over the joint sequence, with fused input and output projections.

    h = modulate(norm(x), shift, scale); [qkv, m] = linear1(h); x += gate * linear2([attn(qkv), gelu(m)]).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, 3)

    def forward(
        self, x: torch.Tensor, vec: torch.Tensor, pe: Rope, backend: str = "sdpa", keep_from: int = 0
    ) -> torch.Tensor:
        """x [B, S, D] -> x [B, S - keep_from, D]: only tokens ``keep_from:`` are updated and returned.

        With ``keep_from = L`` (the last block, whose text outputs nobody reads) the first L tokens only
        supply keys and values: their queries, MLP and output projection are skipped.

        Plain linear1 and linear2 run as two GEMMs each, on the row / column blocks of their weights
        ([qkv; mlp] and [attn, mlp]), which equals the fused form without materialising the [S, 3 D + M]
        output or the [S, D + M] concatenation. The MLP branch runs first so that its [S, M] activations are
        gone (without autograd) before attention runs. Wrapped layers (e.g. peft LoRA) are called as they
        are, on every row.
        """
        D, H, M = self.dim, self.num_heads, self.mlp_hidden
        (mod,) = self.modulation.triples(vec)
        h = modulate(layer_norm(x), mod.shift, mod.scale)  # [B, S, D]
        if type(self.linear1) is nn.Linear and type(self.linear2) is nn.Linear:
            q, k, v, project_out = self._split_projections(h, keep_from)
        else:  # wrapped layers (e.g. LoRA): call them as they are, on every row
            qkv, hidden = self.linear1(h).split([3 * D, M], dim=-1)
            mlp = F.gelu(hidden[:, keep_from:], approximate="tanh")  # [B, S', M]
            q, k, v = split_heads(qkv, H)
            q = q[:, :, keep_from:]

            def project_out(attn: torch.Tensor) -> torch.Tensor:
                return self.linear2(torch.cat([attn, mlp], dim=-1))

        del h
        q, k = self.norm(q, k)
        pe_q = Rope(pe.cos[keep_from:], pe.sin[keep_from:]) if keep_from else pe
        attn = attention(apply_rope(q, pe_q), apply_rope(k, pe), v, backend)  # [B, S', D]
        del q, k, v
        return torch.addcmul(x[:, keep_from:], mod.gate, project_out(attn))

    def _split_projections(self, h: torch.Tensor, keep_from: int):
        """q [B, H, S', Dh], k, v [B, H, S, Dh] and the output projection attn -> linear2([attn, mlp]), with
        linear1 and linear2 run as two GEMMs each on the row / column blocks of their weights."""
        D, H = self.dim, self.num_heads
        # one split per weight: its backward is a single cat, where slicing would zero-fill a full-size
        # gradient per slice
        w_qkv, w_mlp = self.linear1.weight.split([3 * D, self.mlp_hidden])
        b_qkv, b_mlp = self.linear1.bias.split([3 * D, self.mlp_hidden])
        w_attn_out, w_mlp_out = self.linear2.weight.split([D, self.mlp_hidden], dim=1)
        h_out = h[:, keep_from:]  # [B, S', D], the rows whose outputs are kept
        # the MLP half: linear2[:, D:](gelu(linear1[3 D:](h))) + linear2's bias, [B, S', D]
        mlp = F.linear(
            F.gelu(F.linear(h_out, w_mlp, b_mlp), approximate="tanh"), w_mlp_out, self.linear2.bias
        )
        q, k, v = split_heads(F.linear(h_out, w_qkv, b_qkv), H)  # [B, H, S', Dh]
        if keep_from:  # the dropped rows' keys and values only
            B = h.shape[0]
            k_in, v_in = (
                F.linear(h[:, :keep_from], w_qkv[D:], b_qkv[D:])
                .view(B, keep_from, 2, H, -1)
                .permute(2, 0, 3, 1, 4)
                .unbind(0)
            )  # [B, H, keep_from, Dh]
            k, v = torch.cat([k_in, k], dim=2), torch.cat([v_in, v], dim=2)  # [B, H, S, Dh]

        def project_out(attn: torch.Tensor) -> torch.Tensor:  # [B, S', D] -> [B, S', D]
            B, S, _ = attn.shape
            return torch.addmm(mlp.view(B * S, D), attn.view(B * S, D), w_attn_out.t()).view(B, S, D)

        return q, k, v, project_out


class LastLayer(nn.Module):
    """Final adaLN (shift, scale) and the linear map from tokens to packed velocity patches."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.modulation = Modulation(dim, 2)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(vec)
        return self.linear(modulate(layer_norm(img), shift, scale))
