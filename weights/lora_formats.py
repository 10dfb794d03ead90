"""LoRA file formats as naming tables: which module names a file uses, how its keys name the factors, and
how its ``alpha`` entries scale them.

A format (``LoraNaming``) states, per adapted model (``"transformer"``, ``"text_encoder"``, ...), the key
prefix, which rule table its module names follow (``"diffusers"``: the family's ``diffusers_rules``;
``"original"``: the single-file names of ``original_rules``, our own names where that table has no rule), the
factor names (``lora_A`` / ``lora_B`` or ``lora_down`` / ``lora_up``), whether dots become underscores
(kohya), and the alpha rule. Reading generates every key a format can have from the tables and looks the
file's keys up, so a lossy naming needs no parser; a new format is one more table entry.

- diffusers / peft, ai-toolkit's Flux files: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``;
  the scale is peft's alpha / r from the metadata entry ``lora_adapter_metadata`` (rank and alpha patterns,
  rsLoRA), else from ``.alpha`` entries as diffusers' ``network_alphas`` (a module without one takes the
  file's most common alpha), else 1;
- kohya sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (original names, dots as
  underscores); the scale is ``.alpha`` / rank, alpha defaulting to the rank;
- ComfyUI: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``; scaled as kohya;
- original names with peft factors: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``; scaled
  as diffusers.

Text encoders (whole-pipeline files): ``text_encoder.<transformers module>.lora_A.weight`` in diffusers'
naming, ``lora_te1_<module with underscores>`` in kohya's (``lora_te2_`` CLIP-G, ``lora_te3_`` T5).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from mmdit_flow.weights.formats import KeyFormat
from mmdit_flow.weights.keymap import Rule, module_rules

Factor = Literal["A", "B"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (peft LoraConfig per model)


@dataclass(frozen=True)
class LoraNaming:
    """How one LoRA file format names the factors of a layer; see the module docstring."""

    name: str
    prefixes: dict[str, str]  # adapted model -> key prefix ("transformer" -> "lora_unet_")
    table: Literal["diffusers", "original"]  # which rule table the transformer's module names follow
    factors: tuple[str, str] = ("lora_A", "lora_B")
    flat: bool = False  # module names with dots as underscores (kohya)
    alpha: Literal["peft", "kohya"] = "peft"
    # per family, prefixes that replace ``prefixes`` entries (kohya's T5 is lora_te3_ for Flux too)
    family_prefixes: dict[str, dict[str, str]] = field(default_factory=dict)

    def prefix(self, family: str, target: str) -> str | None:
        return {**self.prefixes, **self.family_prefixes.get(family, {})}.get(target)

    def module_key(self, prefix: str, module: str) -> str:
        return prefix + (module.replace(".", "_") if self.flat else module)

    def key(self, prefix: str, module: str, factor: Factor) -> str:
        return f"{self.module_key(prefix, module)}.{self.factors[factor == 'B']}.weight"

    def alpha_key(self, prefix: str, module: str) -> str:
        return f"{self.module_key(prefix, module)}.alpha"


_PEFT_PREFIXES = {"transformer": "transformer.", **{t: f"{t}." for t in TEXT_ENCODERS}}
_KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
DIFFUSERS = LoraNaming("diffusers", _PEFT_PREFIXES, "diffusers")
KOHYA = LoraNaming(
    "kohya",
    {"transformer": "lora_unet_", **_KOHYA_TE},
    "original",
    ("lora_down", "lora_up"),
    flat=True,
    alpha="kohya",
    family_prefixes={"flux": {"text_encoder_2": "lora_te3_"}},  # sd-scripts' Flux T5
)
# sd-scripts' older single-CLIP prefix (Flux files), as diffusers' converter also takes it
KOHYA_TE = replace(KOHYA, prefixes={**KOHYA.prefixes, "text_encoder": "lora_te_"})
_ORIGINAL = {"transformer": "diffusion_model."}
COMFYUI = LoraNaming("ComfyUI", _ORIGINAL, "original", ("lora_down", "lora_up"), alpha="kohya")
ORIGINAL_PEFT = LoraNaming("original names with peft factors", _ORIGINAL, "original")
NAMINGS = (DIFFUSERS, KOHYA, KOHYA_TE, COMFYUI, ORIGINAL_PEFT)


def transformer_rules(fam: KeyFormat, config: object, naming: LoraNaming) -> dict[str, Rule]:
    """Our module -> the rule to the module names ``naming`` uses for the transformer."""
    ours = module_rules(fam.diffusers_rules(config))
    if naming.table == "diffusers":
        return ours
    original = module_rules(fam.original_rules(config))
    return {m: original.get(m, Rule(m, (m,))) for m in ours}


def linear_rules(model: torch.nn.Module) -> dict[str, Rule]:
    """Every linear layer of a model, named in files as in the model (the transformers text encoders)."""
    return {n: Rule(n, (n,)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ------------------------------------------------------------------------------------------------ scales


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: the first key that ends ``module`` at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class Scales:
    """Each module's scale of B A: peft metadata, diffusers' ``network_alphas`` or kohya's alpha / rank."""

    naming: LoraNaming
    alphas: dict[str, float]  # the file's .alpha entries by key
    metadata: dict[str, dict]  # target -> the peft LoraConfig dict diffusers stored for it

    @classmethod
    def of(cls, naming: LoraNaming, alphas: dict[str, float], file_metadata: dict[str, str]) -> Scales:
        per_target: dict[str, dict] = {}
        raw = file_metadata.get(METADATA_KEY)
        if raw and naming.alpha == "peft":
            try:
                packed = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"the LoRA's {METADATA_KEY} metadata is not JSON ({e})") from e
            for key, value in packed.items():
                target, _, name = key.partition(".")
                per_target.setdefault(target, {})[name] = value
        return cls(naming, alphas, per_target)

    def scale(self, target: str, prefix: str, module: str, rank: int) -> float:
        if self.naming.alpha == "kohya":
            return self.alphas.get(self.naming.alpha_key(prefix, module), rank) / rank
        config = self.metadata.get(target)
        if config is not None:
            r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
            if r != rank:
                raise ValueError(
                    f"the LoRA's metadata gives {target}.{module} rank {r} but its factors have rank {rank}; "
                    "the file is damaged"
                )
            return alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        if not self.alphas:
            return 1.0
        # diffusers' network_alphas: a module without an entry takes the most common alpha of the file
        default = Counter(self.alphas.values()).most_common(1)[0][0]
        return self.alphas.get(self.naming.alpha_key(prefix, module), default) / rank


# --------------------------------------------------------------------------------------------- diagnosis

_FAMILY_MARKS = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks", "x_embedder", "guidance_"),
    "sd3": ("joint_blocks", "x_block", "context_block", "pos_embed"),
}


def looks_like(keys: list[str]) -> str | None:
    """The family these LoRA keys name by their telltale module names ("flux" | "sd3"), or None."""
    counts = {f: sum(any(m in k for m in marks) for k in keys) for f, marks in _FAMILY_MARKS.items()}
    best = max(counts, key=lambda f: counts[f])
    return best if counts[best] else None


def format_of(keys: list[str]) -> str:
    """A guess at a file's format from its keys, for error messages."""
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys):
        return "DoRA, which is not supported"
    if any(".lora_B.bias" in k or ".lora_up.bias" in k for k in keys):
        return "LoRA with biases, which is not supported"
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(".lora_down." in k for k in keys):
        return "ComfyUI / kohya factors"
    if any(".lora_A." in k for k in keys):
        return "peft / diffusers"
    return "unknown (no lora_A / lora_down factors)"
