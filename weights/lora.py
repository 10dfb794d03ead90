"""LoRA files: find, read, write and merge LoRAs in diffusers' (peft) naming.

A LoRA on a linear layer W [out, in] adds ``delta W = scale * B @ A`` with A [r, in], B [out, r]. A file
names each adapted layer's factors in another format's module names; diffusers' (what its
``load_lora_weights`` reads and ``save_lora_weights`` writes) is ``transformer.<module>.lora_A.weight`` /
``lora_B.weight`` in the names of diffusers' transformer.

A layer's factors follow the key-map rule of the layer's ``.weight`` (``keymap.module_rules`` of the family's
table). Our attention projects q, k and v with one fused ``qkv`` layer where diffusers has ``to_q``, ``to_k``,
``to_v``; a LoRA on the fused layer is exactly three LoRAs with the same A and B split by rows:

    delta [W_q; W_k; W_v] = s * [B_q; B_k; B_v] @ A   =>   delta W_q = s * B_q @ A, ...

so writing gives A to each part and B in row blocks (``keymap.split``; a ``swap`` rule exchanges B's halves),
with the scale folded into B, so every written adapter has scale 1 whatever alpha diffusers assumes. Reading
goes the other way for any such file (separate A per q, k, v included): each part's ``B @ A``, zeros for the
parts the file leaves out, joined by the rule (``keymap.join``) into a delta for our layer.

Other file formats (kohya's ``lora_unet_*`` / ``lora_down`` / ``lora_up``, ai-toolkit's) are a
``LoraNaming``: which rule table their module names follow and how a key names a module's factor; reading
looks keys up in the names a naming generates from the table, so a lossy naming (dots as underscores) needs no
parser. Only diffusers' naming and SD3 / SD3.5 transformers are supported so far.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mmdit_flow.weights.formats import KeyFormat, StateDict
from mmdit_flow.weights.io import PICKLE_SUFFIXES, CheckpointError, _names, read_checkpoint, save_file
from mmdit_flow.weights.keymap import Rule, join, module_rules, split
from mmdit_flow.weights.transformer import family_of_model

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
LORA_WEIGHT_NAME_PICKLE = "pytorch_lora_weights.bin"
FAMILIES = ("sd3",)  # model families whose LoRA files this version reads and writes


class LoraLayer(NamedTuple):
    """One adapted linear layer: delta W = scale * B @ A."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


@dataclass(frozen=True)
class LoraNaming:
    """How a LoRA file format names the factors of a layer."""

    name: str
    # the family and our config -> {our module: rule to the module names the file uses}
    rules: Callable[[KeyFormat, Any], dict[str, Rule]]
    # (their module name, "A" | "B") -> the file's key
    key: Callable[[str, str], str]


DIFFUSERS = LoraNaming(
    name="diffusers",
    rules=lambda fam, config: module_rules(fam.diffusers_rules(config)),
    key=lambda module, factor: f"transformer.{module}.lora_{factor}.weight",
)


def _rules(model: nn.Module, naming: LoraNaming) -> tuple[nn.Module, dict[str, Rule]]:
    """The bare model (inside compile / DDP wrappers) and its layers' rules in ``naming``."""
    fam, inner = family_of_model(model)
    if fam.name not in FAMILIES:
        raise ValueError(
            f"LoRA files for {fam.name} transformers are not supported yet; this version reads and writes "
            f"LoRAs of {', '.join(FAMILIES)} transformers"
        )
    return inner, naming.rules(fam, inner.config)


# ---------------------------------------------------------------------------------------------------- writing


def lora_state_dict(
    model: nn.Module, layers: dict[str, LoraLayer], naming: LoraNaming = DIFFUSERS
) -> StateDict:
    """``layers`` (our module name -> its LoRA) as the tensors of a LoRA file in ``naming``."""
    _, rules = _rules(model, naming)
    out: StateDict = {}
    for name, (A, B, scale) in layers.items():
        if name not in rules:
            raise ValueError(f"{name} has a LoRA but no {naming.name} name; adapt its linear layers only")
        rule = rules[name]
        for module, b in zip(rule.theirs, split(rule, B * scale), strict=True):
            out[naming.key(module, "A")] = A.clone().contiguous()
            out[naming.key(module, "B")] = b.contiguous()
    return out


def write_lora(
    model: nn.Module, layers: dict[str, LoraLayer], path: str | os.PathLike, naming: LoraNaming = DIFFUSERS
) -> Path:
    """Write ``layers`` as a safetensors LoRA file (atomically); in diffusers' naming, diffusers'
    ``load_lora_weights`` reads it."""
    return save_file(lora_state_dict(model, layers, naming), path)


# ---------------------------------------------------------------------------------------------------- reading


def find_lora_file(
    path: str | os.PathLike, *, weight_name: str | None = None, allow_pickle: bool = False
) -> Path:
    """The LoRA file at ``path``: the file itself, or in a folder (as diffusers looks) ``weight_name``,
    else ``pytorch_lora_weights.safetensors``, else its one ``.safetensors`` file; pickle files
    (``pytorch_lora_weights.bin`` or a single ``.bin``) only with ``allow_pickle=True``."""
    path = Path(path)
    if weight_name is not None:
        path = path / weight_name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a LoRA .safetensors file or a folder holding one"
        )
    if path.is_file():
        return path
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    for pickle, suffixes, default in (
        (False, (".safetensors",), LORA_WEIGHT_NAME),
        (True, PICKLE_SUFFIXES, LORA_WEIGHT_NAME_PICKLE),
    ):
        found = [p for p in files if p.name.endswith(suffixes)]
        if not found:
            continue
        if pickle and not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weight files ({_names([p.name for p in found])}), which can run "
                "arbitrary code when loaded; if you trust them pass allow_pickle=True (read with "
                "torch.load(weights_only=True)), or pass a .safetensors LoRA"
            )
        if (path / default).is_file():
            return path / default
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"{path} holds several weight files ({_names([p.name for p in found])}) and no {default}; "
            "pass weight_name= or the path of the LoRA file"
        )
    listing = f"it holds {_names([p.name for p in files])}" if files else "it is empty"
    raise CheckpointError(f"{path} has no LoRA file ({LORA_WEIGHT_NAME} or one .safetensors file): {listing}")


def _factors(
    sd: StateDict, lookup: dict[str, tuple[str, str]], naming: LoraNaming
) -> dict[str, dict[str, torch.Tensor]]:
    """{their module: {"A": tensor, "B": tensor}} for the keys ``lookup`` knows; raise on any other key."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown, alphas = [], []
    for key, value in sd.items():
        if key in lookup:
            module, factor = lookup[key]
            found.setdefault(module, {})[factor] = value.float()
        else:
            (alphas if key.endswith(".alpha") else unknown).append(key)
    if alphas:
        logger.warning(
            "the LoRA's %d .alpha entries (%s) are ignored: B is taken to hold the scale already, as in the "
            "files diffusers and mmdit-flow write",
            len(alphas),
            _names(alphas, 3),
        )
    if unknown:
        raise ValueError(
            f"LoRA keys {_names(sorted(unknown), 5)} match no layer of this transformer in the "
            f"{naming.name} naming: is the LoRA for another model family, or for the text encoders?"
        )
    for module, ab in found.items():
        if ab.keys() != {"A", "B"}:
            (have,) = ab
            missing = naming.key(module, "B" if have == "A" else "A")
            raise ValueError(
                f"the LoRA has {naming.key(module, have)} but not {missing}; the file is incomplete"
            )
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(
                f"{naming.key(module, 'A')} has rank {ab['A'].shape[0]} but {naming.key(module, 'B')} has "
                f"rank {ab['B'].shape[1]}; the file is damaged"
            )
    return found


def _delta(rule: Rule, factors: dict[str, dict[str, torch.Tensor]], weight: torch.Tensor) -> torch.Tensor:
    """Our layer's delta W from the file's factors of its parts, zeros for the parts the file leaves out."""
    if weight.ndim != 2:
        raise ValueError(f"the LoRA adapts {', '.join(rule.theirs)}, which is not a linear layer")
    n = len(rule.theirs)
    rows = rule.sizes or (weight.shape[0] // n,) * n
    parts = []
    for module, r in zip(rule.theirs, rows, strict=True):
        part = (
            factors[module]["B"] @ factors[module]["A"]
            if module in factors
            else torch.zeros(r, weight.shape[1])
        )
        if part.shape != (r, weight.shape[1]):
            raise ValueError(
                f"the LoRA of {module} is {part.shape[0]} x {part.shape[1]} but that layer's weight is "
                f"{r} x {weight.shape[1]}: the LoRA is for a model of other sizes"
            )
        parts.append(part)
    return join(rule, parts)


def lora_deltas(model: nn.Module, sd: StateDict, naming: LoraNaming = DIFFUSERS) -> StateDict:
    """The tensors of a LoRA file -> {our parameter name: delta W = B @ A} (any alpha already folded in B)."""
    model, rules = _rules(model, naming)
    lookup = {
        naming.key(module, factor): (module, factor)
        for rule in rules.values()
        for module in rule.theirs
        for factor in ("A", "B")
    }
    factors = _factors(sd, lookup, naming)
    return {
        f"{ours}.weight": _delta(rule, factors, model.get_parameter(f"{ours}.weight"))
        for ours, rule in rules.items()
        if any(module in factors for module in rule.theirs)
    }


def read_lora(
    path: str | os.PathLike, *, weight_name: str | None = None, allow_pickle: bool = False
) -> StateDict:
    """The tensors of a LoRA file, or of the LoRA file in a folder (see ``find_lora_file``)."""
    file = find_lora_file(path, weight_name=weight_name, allow_pickle=allow_pickle)
    return read_checkpoint(file, allow_pickle=allow_pickle).state_dict


@torch.no_grad()
def load_lora(
    model: nn.Module,
    lora: str | os.PathLike | StateDict,
    scale: float = 1.0,
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Merge a LoRA (a file, a folder holding one, or its tensors) into ``model``: W <- W + scale * B @ A.
    Merging again adds again; reload the model to remove a LoRA."""
    sd = (
        lora
        if isinstance(lora, dict)
        else read_lora(lora, weight_name=weight_name, allow_pickle=allow_pickle)
    )
    deltas = lora_deltas(model, sd)
    _, inner = family_of_model(model)
    for name, delta in deltas.items():
        p = inner.get_parameter(name)
        p.add_(delta.to(p) * scale)
    return model
