"""Flux key maps and configs: ours <-> diffusers ``FluxTransformer2DModel`` <-> original BFL checkpoints.

Our names follow BFL's, so the original map only renames three things: QK-norm ``weight`` <-> ``scale``, MLP
``fc1 / fc2`` <-> ``0 / 2`` (BFL's ``nn.Sequential``), and ``final_layer.modulation.lin`` <->
``final_layer.adaLN_modulation.1``. diffusers differs more:

- a fused q/k/v projection (``img_attn.qkv``) is three linears (``attn.to_q / to_k / to_v``; for the text
  stream ``attn.add_q_proj / add_k_proj / add_v_proj``);
- the single block's ``linear1`` is ``attn.to_q / to_k / to_v`` plus ``proj_mlp``, ``linear2`` is
  ``proj_out``;
- the final adaLN projection stores (scale, shift) where BFL and we store (shift, scale).

Both maps are rule tables (``diffusers_rules`` / ``original_rules``) for the engine in ``keymap.py``, which
passes keys it does not know through unchanged and skips rules whose tensors are absent, so that the strict
loader in ``mmdit_flow.weights`` reports missing and unexpected keys by their names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from mmdit_flow.models.flux import MLP_RATIO, FluxConfig, FluxTransformer
from mmdit_flow.weights.formats import KeyFormat, StateDict
from mmdit_flow.weights.keymap import Rule, params

logger = logging.getLogger(__name__)

DIFFUSERS_CLASS = "FluxTransformer2DModel"
# FluxTransformer2DModel.__init__ defaults, used for keys a config.json leaves out
_DIFFUSERS_DEFAULTS = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


# ---------------------------------------------------------------------------------------------------- configs


def config_from_diffusers(config: dict[str, Any]) -> FluxConfig:
    """A diffusers ``FluxTransformer2DModel`` config.json dict -> FluxConfig."""
    d = {**_DIFFUSERS_DEFAULTS, **config}
    if d["patch_size"] != 1:
        raise ValueError(f"Flux configs with patch_size {d['patch_size']} are not supported; FLUX.1 uses 1")
    in_packed = d["in_channels"]
    out_packed = d["out_channels"] or in_packed
    if in_packed % 4 or out_packed % 4:
        raise ValueError(
            f"in_channels ({in_packed}) and out_channels ({out_packed}) of a Flux config count 2x2-packed "
            "channels and must be multiples of 4"
        )
    return FluxConfig(
        in_channels=in_packed // 4,
        out_channels=out_packed // 4,
        hidden_size=d["num_attention_heads"] * d["attention_head_dim"],
        num_heads=d["num_attention_heads"],
        depth=d["num_layers"],
        depth_single=d["num_single_layers"],
        context_dim=d["joint_attention_dim"],
        vec_dim=d["pooled_projection_dim"],
        axes_dim=tuple(d["axes_dims_rope"]),
        guidance_embed=bool(d["guidance_embeds"]),
    )


def config_to_diffusers(config: FluxConfig) -> dict[str, Any]:
    """FluxConfig -> a diffusers ``FluxTransformer2DModel`` config.json dict."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "patch_size": 1,
        "in_channels": 4 * config.in_channels,
        "out_channels": None if config.out_channels == config.in_channels else 4 * config.out_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "pooled_projection_dim": config.vec_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
    }


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Rotary channels per axis when a checkpoint does not say: FLUX.1's (16, 56, 56) for head dim 128, else
    the same proportions 1 : 3.5 : 3.5 rounded to even numbers."""
    if head_dim == 128:
        return (16, 56, 56)
    first = max(2, 2 * round(head_dim / 16))
    row = 2 * ((head_dim - first) // 4)
    return (first, row, head_dim - first - row)


def _count(keys: Iterable[str], prefix: str) -> int:
    """Number of blocks ``prefix.{i}.*`` (1 + the largest index), 0 when there are none."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in keys if (m := pattern.match(k))), default=-1)


def config_from_original(sd: StateDict) -> FluxConfig:
    """Infer a FluxConfig from the keys and shapes of an original (BFL) checkpoint."""
    hidden, in_packed = sd["img_in.weight"].shape
    norm_key = next(
        (
            k
            for k in (
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "single_blocks.0.norm.query_norm.scale",
            )
            if k in sd
        ),
        None,
    )
    if norm_key is None:
        raise ValueError(
            "a Flux checkpoint needs at least one double or single block to infer its head count"
        )
    head_dim = sd[norm_key].shape[0]
    for key in ("double_blocks.0.img_mlp.0.weight", "single_blocks.0.linear2.weight"):
        if key in sd:
            mlp_hidden = sd[key].shape[0] if "img_mlp" in key else sd[key].shape[1] - hidden
            if mlp_hidden != int(MLP_RATIO * hidden):
                raise ValueError(
                    f"{key} implies an MLP ratio of {mlp_hidden / hidden:g}; only {MLP_RATIO:g} is supported"
                )
    axes_dim = default_axes_dim(head_dim)
    if head_dim != 128:
        logger.warning("Flux checkpoint with head dim %d: assuming rotary axes_dim %s", head_dim, axes_dim)
    return FluxConfig(
        in_channels=in_packed // 4,
        out_channels=sd["final_layer.linear.weight"].shape[0] // 4,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=_count(sd, "double_blocks"),
        depth_single=_count(sd, "single_blocks"),
        context_dim=sd["txt_in.weight"].shape[1],
        vec_dim=sd["vector_in.in_layer.weight"].shape[1],
        axes_dim=axes_dim,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def is_original(sd: StateDict) -> bool:
    """Do these (prefix-stripped) keys look like a FLUX.1 BFL checkpoint? (FLUX.2, Chroma: no vector_in.)"""
    keys = set(sd)
    return {"img_in.weight", "vector_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight"} <= keys


# --------------------------------------------------------------------------------------------------- key maps


def diffusers_rules(c: FluxConfig) -> list[Rule]:
    """Our parameter names and how each comes from diffusers' ``FluxTransformer2DModel`` state dict."""
    D, mlp = c.hidden_size, int(MLP_RATIO * c.hidden_size)
    norm = ("weight",)
    rules = params("img_in", "x_embedder")
    rules += params("txt_in", "context_embedder")
    rules += params("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    rules += params("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    rules += params("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    rules += params("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if c.guidance_embed:
        rules += params("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        rules += params("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    rules += params("final_layer.linear", "proj_out")
    rules += params("final_layer.modulation.lin", "norm_out.linear", "swap")
    for i in range(c.depth):
        ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
        qkv, added = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")
        rules += params(f"{ours}.img_mod.lin", f"{theirs}.norm1.linear")
        rules += params(f"{ours}.txt_mod.lin", f"{theirs}.norm1_context.linear")
        rules += params(f"{ours}.img_attn.qkv", [f"{theirs}.attn.{n}" for n in qkv], "cat", sizes=(D, D, D))
        rules += params(f"{ours}.txt_attn.qkv", [f"{theirs}.attn.{n}" for n in added], "cat", sizes=(D, D, D))
        rules += params(f"{ours}.img_attn.norm.query_norm", f"{theirs}.attn.norm_q", names=norm)
        rules += params(f"{ours}.img_attn.norm.key_norm", f"{theirs}.attn.norm_k", names=norm)
        rules += params(f"{ours}.txt_attn.norm.query_norm", f"{theirs}.attn.norm_added_q", names=norm)
        rules += params(f"{ours}.txt_attn.norm.key_norm", f"{theirs}.attn.norm_added_k", names=norm)
        rules += params(f"{ours}.img_attn.proj", f"{theirs}.attn.to_out.0")
        rules += params(f"{ours}.txt_attn.proj", f"{theirs}.attn.to_add_out")
        rules += params(f"{ours}.img_mlp.fc1", f"{theirs}.ff.net.0.proj")
        rules += params(f"{ours}.img_mlp.fc2", f"{theirs}.ff.net.2")
        rules += params(f"{ours}.txt_mlp.fc1", f"{theirs}.ff_context.net.0.proj")
        rules += params(f"{ours}.txt_mlp.fc2", f"{theirs}.ff_context.net.2")
    for i in range(c.depth_single):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear1 = [f"{theirs}.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
        rules += params(f"{ours}.modulation.lin", f"{theirs}.norm.linear")
        rules += params(f"{ours}.linear1", linear1, "cat", sizes=(D, D, D, mlp))
        rules += params(f"{ours}.linear2", f"{theirs}.proj_out")
        rules += params(f"{ours}.norm.query_norm", f"{theirs}.attn.norm_q", names=norm)
        rules += params(f"{ours}.norm.key_norm", f"{theirs}.attn.norm_k", names=norm)
    return rules


def original_rules(c: FluxConfig) -> list[Rule]:
    """Only the names that differ; everything else is identical in ours and the original."""
    rules = params("final_layer.modulation.lin", "final_layer.adaLN_modulation.1")
    streams = [f"double_blocks.{i}.{s}" for i in range(c.depth) for s in ("img", "txt")]
    for s in streams:
        rules += [
            Rule(f"{s}_attn.norm.query_norm.weight", (f"{s}_attn.norm.query_norm.scale",)),
            Rule(f"{s}_attn.norm.key_norm.weight", (f"{s}_attn.norm.key_norm.scale",)),
        ]
        rules += params(f"{s}_mlp.fc1", f"{s}_mlp.0")
        rules += params(f"{s}_mlp.fc2", f"{s}_mlp.2")
    for i in range(c.depth_single):
        s = f"single_blocks.{i}.norm"
        rules += [
            Rule(f"{s}.query_norm.weight", (f"{s}.query_norm.scale",)),
            Rule(f"{s}.key_norm.weight", (f"{s}.key_norm.scale",)),
        ]
    return rules


FAMILY = KeyFormat(
    name="flux",
    config_cls=FluxConfig,
    model_cls=FluxTransformer,
    diffusers_class_name=DIFFUSERS_CLASS,
    config_from_diffusers=config_from_diffusers,
    config_to_diffusers=config_to_diffusers,
    config_from_original=config_from_original,
    is_original=is_original,
    diffusers_rules=diffusers_rules,
    original_rules=original_rules,
)
# (state dict, FluxConfig) -> state dict
from_diffusers, to_diffusers = FAMILY.from_diffusers, FAMILY.to_diffusers
from_original, to_original = FAMILY.from_original, FAMILY.to_original
