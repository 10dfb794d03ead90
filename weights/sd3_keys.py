"""SD3 / SD3.5 checkpoint formats: our names <-> diffusers' ``SD3Transformer2DModel`` <-> the original file.

Every parameter is listed explicitly (``diffusers_rules`` / ``original_rules``, tables for the engine in
``keymap.py``); a rule renames one tensor, fuses diffusers' separate q / k / v into our one qkv Linear
(``cat``), or swaps the two halves of an adaLN (shift, scale) projection (``swap``): we and the original store
(shift, scale), diffusers' ``AdaLayerNormContinuous`` (the last block's text stream and the final layer)
emits (scale, shift).
"""

from __future__ import annotations

import re
from typing import Any

from mmdit_flow.models.sd3 import TIME_DIM, SD3Config, SD3Transformer
from mmdit_flow.weights.formats import KeyFormat, StateDict
from mmdit_flow.weights.keymap import Rule, params

DIFFUSERS_CLASS = "SD3Transformer2DModel"
# diffusers' SD3Transformer2DModel.__init__ defaults, used for keys a config.json leaves out
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}
ORIGINAL_HEAD_DIM = 64  # every released SD3 / SD3.5 uses 64-wide heads; shapes only reveal it with qk-norm


# --------------------------------------------------------------------------------------------- diffusers


def diffusers_rules(c: SD3Config) -> list[Rule]:
    """Our parameter names and how each comes from diffusers' ``SD3Transformer2DModel`` state dict."""
    rules = [Rule("pos_embed", ("pos_embed.pos_embed",))]
    rules += params("x_embedder.proj", "pos_embed.proj")
    rules += params("t_embedder.in_layer", "time_text_embed.timestep_embedder.linear_1")
    rules += params("t_embedder.out_layer", "time_text_embed.timestep_embedder.linear_2")
    rules += params("y_embedder.in_layer", "time_text_embed.text_embedder.linear_1")
    rules += params("y_embedder.out_layer", "time_text_embed.text_embedder.linear_2")
    rules += params("context_embedder", "context_embedder")
    for i in range(c.depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == c.depth - 1
        # image stream
        rules += params(f"{o}.img.mod.lin", f"{d}.norm1.linear")
        rules += _attention_diffusers(
            c, f"{o}.img.attn", f"{d}.attn", ("to_q", "to_k", "to_v"), "norm_", "to_out.0"
        )
        if i in c.dual_attention_layers:
            rules += _attention_diffusers(
                c, f"{o}.img.attn2", f"{d}.attn2", ("to_q", "to_k", "to_v"), "norm_", "to_out.0"
            )
        rules += params(f"{o}.img.mlp.fc1", f"{d}.ff.net.0.proj")
        rules += params(f"{o}.img.mlp.fc2", f"{d}.ff.net.2")
        # text stream
        proj = None if pre_only else "to_add_out"
        rules += params(f"{o}.txt.mod.lin", f"{d}.norm1_context.linear", "swap" if pre_only else "copy")
        rules += _attention_diffusers(
            c, f"{o}.txt.attn", f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_", proj
        )
        if not pre_only:
            rules += params(f"{o}.txt.mlp.fc1", f"{d}.ff_context.net.0.proj")
            rules += params(f"{o}.txt.mlp.fc2", f"{d}.ff_context.net.2")
    rules += params("final.mod.lin", "norm_out.linear", "swap")
    rules += params("final.linear", "proj_out")
    return rules


def _attention_diffusers(
    c: SD3Config, ours: str, theirs: str, qkv: tuple[str, str, str], norm: str, proj: str | None
) -> list[Rule]:
    rules = params(f"{ours}.qkv", tuple(f"{theirs}.{n}" for n in qkv), "cat")
    if c.qk_norm:
        rules += [Rule(f"{ours}.norm_q.weight", (f"{theirs}.{norm}q.weight",))]
        rules += [Rule(f"{ours}.norm_k.weight", (f"{theirs}.{norm}k.weight",))]
    if proj is not None:
        rules += params(f"{ours}.proj", f"{theirs}.{proj}")
    return rules


# --------------------------------------------------------------------------------------------- original


def original_rules(c: SD3Config) -> list[Rule]:
    """Our parameter names and how each comes from an original SD3 / SD3.5 single file (prefix stripped)."""
    rules = [Rule("pos_embed", ("pos_embed",))]
    rules += params("x_embedder.proj", "x_embedder.proj")
    rules += params("t_embedder.in_layer", "t_embedder.mlp.0")
    rules += params("t_embedder.out_layer", "t_embedder.mlp.2")
    rules += params("y_embedder.in_layer", "y_embedder.mlp.0")
    rules += params("y_embedder.out_layer", "y_embedder.mlp.2")
    rules += params("context_embedder", "context_embedder")
    for i in range(c.depth):
        pre_only = i == c.depth - 1
        for ours, theirs in (("img", "x_block"), ("txt", "context_block")):
            o, s = f"blocks.{i}.{ours}", f"joint_blocks.{i}.{theirs}"
            rules += params(f"{o}.mod.lin", f"{s}.adaLN_modulation.1")
            attns = ("attn", "attn2") if ours == "img" and i in c.dual_attention_layers else ("attn",)
            for attn in attns:
                rules += params(f"{o}.{attn}.qkv", f"{s}.{attn}.qkv")
                if c.qk_norm:
                    rules += [Rule(f"{o}.{attn}.norm_q.weight", (f"{s}.{attn}.ln_q.weight",))]
                    rules += [Rule(f"{o}.{attn}.norm_k.weight", (f"{s}.{attn}.ln_k.weight",))]
                if not (ours == "txt" and pre_only):
                    rules += params(f"{o}.{attn}.proj", f"{s}.{attn}.proj")
            if not (ours == "txt" and pre_only):
                rules += params(f"{o}.mlp.fc1", f"{s}.mlp.fc1")
                rules += params(f"{o}.mlp.fc2", f"{s}.mlp.fc2")
    rules += params("final.mod.lin", "final_layer.adaLN_modulation.1")
    rules += params("final.linear", "final_layer.linear")
    return rules


# --------------------------------------------------------------------------------------------- configs


def config_from_diffusers(d: dict[str, Any]) -> SD3Config:
    """A diffusers ``SD3Transformer2DModel`` config.json dict -> SD3Config (diffusers' defaults fill gaps)."""
    if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise ValueError(f"config is for {d['_class_name']!r}, not {DIFFUSERS_CLASS!r}")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown {DIFFUSERS_CLASS} config keys {unknown}; known: {sorted(_DIFFUSERS_DEFAULTS)}"
        )
    d = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    hidden = d["attention_head_dim"] * d["num_attention_heads"]
    if d["caption_projection_dim"] != hidden:
        raise ValueError(
            f"caption_projection_dim ({d['caption_projection_dim']}) must equal attention_head_dim * "
            f"num_attention_heads ({hidden}) for the joint attention"
        )
    if d["pos_embed_max_size"] is None:
        raise ValueError(
            "pos_embed_max_size=None (interpolated position tables) is not supported; SD3 sets it"
        )
    return SD3Config(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"] if d["out_channels"] is not None else d["in_channels"],
        patch_size=d["patch_size"],
        hidden_size=hidden,
        num_heads=d["num_attention_heads"],
        depth=d["num_layers"],
        context_dim=d["joint_attention_dim"],
        vec_dim=d["pooled_projection_dim"],
        pos_embed_max_size=d["pos_embed_max_size"],
        sample_size=d["sample_size"],
        qk_norm=d["qk_norm"],
        dual_attention_layers=tuple(d["dual_attention_layers"] or ()),
    )


def config_to_diffusers(c: SD3Config) -> dict[str, Any]:
    """SD3Config -> the config.json dict of the equivalent diffusers ``SD3Transformer2DModel``."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "sample_size": c.sample_size,
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "num_layers": c.depth,
        "attention_head_dim": c.head_dim,
        "num_attention_heads": c.num_heads,
        "joint_attention_dim": c.context_dim,
        "caption_projection_dim": c.hidden_size,
        "pooled_projection_dim": c.vec_dim,
        "out_channels": c.out_channels,
        "pos_embed_max_size": c.pos_embed_max_size,
        "dual_attention_layers": list(c.dual_attention_layers),
        "qk_norm": c.qk_norm,
    }


def is_original(sd: StateDict) -> bool:
    """Do these (prefix-stripped) keys look like an original SD3 / SD3.5 single file?"""
    return "x_embedder.proj.weight" in sd and "joint_blocks.0.x_block.attn.qkv.weight" in sd


def config_from_original(sd: StateDict) -> SD3Config:
    """Infer the SD3Config from an original single file's keys and shapes (prefix stripped).

    depth from the joint_blocks count; hidden size, channels and patch from x_embedder.proj; text widths
    from context_embedder and y_embedder; qk-norm from ln_q keys (whose width is the head dim; without them
    the head dim is SD3's 64); MMDiT-X layers from attn2 keys; the table side from pos_embed [1, M * M, D].
    The latent size the table was scaled to is not stored; every release uses 128.
    """
    if not is_original(sd):
        raise ValueError("not an original SD3 checkpoint: x_embedder.proj.weight or joint_blocks.0.* missing")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    proj = sd["x_embedder.proj.weight"]  # [D, C, p, p]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q.shape[0] if ln_q is not None else ORIGINAL_HEAD_DIM
    if sd["t_embedder.mlp.0.weight"].shape[1] != TIME_DIM:
        raise ValueError(
            f"t_embedder.mlp.0 takes {sd['t_embedder.mlp.0.weight'].shape[1]} features, not {TIME_DIM}"
        )
    side = round(sd["pos_embed"].shape[1] ** 0.5)
    if side * side != sd["pos_embed"].shape[1]:
        raise ValueError(f"pos_embed has {sd['pos_embed'].shape[1]} positions, not a square table")
    dual = {int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}
    return SD3Config(
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch),
        patch_size=patch,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=max(blocks) + 1,
        context_dim=sd["context_embedder.weight"].shape[1],
        vec_dim=sd["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max_size=side,
        qk_norm="rms_norm" if ln_q is not None else None,
        dual_attention_layers=tuple(sorted(dual)),
    )


FAMILY = KeyFormat(
    name="sd3",
    config_cls=SD3Config,
    model_cls=SD3Transformer,
    diffusers_class_name=DIFFUSERS_CLASS,
    config_from_diffusers=config_from_diffusers,
    config_to_diffusers=config_to_diffusers,
    config_from_original=config_from_original,
    is_original=is_original,
    diffusers_rules=diffusers_rules,
    original_rules=original_rules,
)
# (state dict, SD3Config) -> state dict
from_diffusers, to_diffusers = FAMILY.from_diffusers, FAMILY.to_diffusers
from_original, to_original = FAMILY.from_original, FAMILY.to_original
