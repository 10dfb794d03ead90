"""The key-map engine: one table of rules converts a state dict between our names and another format's.

A rule ties one of our tensors to one or more of theirs:

- ``copy``: ours is their one tensor under another name;
- ``cat``: ours is their tensors concatenated along dim 0 (our fused q/k/v Linear is diffusers' ``to_q``,
  ``to_k``, ``to_v``; Flux's single-block ``linear1`` is those three plus ``proj_mlp``), ``sizes`` rows each,
  equal parts when ``sizes`` is empty;
- ``swap``: ours is their one tensor with its two row halves exchanged (we store an adaLN projection as
  (shift, scale), diffusers' ``AdaLayerNormContinuous`` as (scale, shift)).

A family's formats (``sd3_keys``, ``flux_keys``) are tables of these rules; ``to_ours`` / ``to_theirs``
apply a table either way. Keys no rule consumes pass through unchanged, so that the strict loader names
them as unexpected; a rule whose source tensors are not all present is skipped, so that its target is reported
missing (and the sources that are present, unexpected). Each output takes the place of its first source in
the key order, so that shards follow the model's order.

``join`` / ``split`` are the single-rule operations, shared with the LoRA format (``weights/lora.py``), which
maps a layer's low-rank factors through the rules of the layer's ``.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

StateDict = dict[str, torch.Tensor]
Op = Literal["copy", "cat", "swap"]
OPS: tuple[Op, ...] = ("copy", "cat", "swap")


@dataclass(frozen=True)
class Rule:
    """``ours`` = op(``theirs``): one of our tensors and the tensor(s) of the other format it is made of."""

    ours: str
    theirs: tuple[str, ...]
    op: Op = "copy"
    sizes: tuple[int, ...] = ()  # "cat": rows of each of theirs; () for equal parts

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"rule for {self.ours!r}: unknown op {self.op!r}; use one of {', '.join(OPS)}")
        if (self.op == "cat") != (len(self.theirs) > 1) or not self.theirs:
            raise ValueError(
                f"rule for {self.ours!r}: op {self.op!r} with {len(self.theirs)} source tensors; "
                "'cat' takes two or more, 'copy' and 'swap' exactly one"
            )
        if self.sizes and len(self.sizes) != len(self.theirs):
            raise ValueError(f"rule for {self.ours!r}: {len(self.sizes)} sizes, {len(self.theirs)} tensors")


def params(
    ours: str,
    theirs: str | Sequence[str],
    op: Op = "copy",
    *,
    names: Sequence[str] = ("weight", "bias"),
    sizes: tuple[int, ...] = (),
) -> list[Rule]:
    """One rule per parameter ``names`` of a module: ``{ours}.weight`` <- ``{theirs}.weight``, and so on."""
    theirs = (theirs,) if isinstance(theirs, str) else tuple(theirs)
    return [Rule(f"{ours}.{n}", tuple(f"{t}.{n}" for t in theirs), op, sizes) for n in names]


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def join(rule: Rule, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Our tensor from theirs (in ``rule.theirs`` order)."""
    if rule.op == "cat":
        return torch.cat(list(tensors), dim=0)
    (x,) = tensors
    return _swap_halves(x) if rule.op == "swap" else x


def split(rule: Rule, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Their tensors (in ``rule.theirs`` order) from ours; parts of a "cat" are copies, since safetensors
    refuses tensors that share storage."""
    if rule.op == "cat":
        rows = tensor.shape[0]
        sizes = rule.sizes or (rows // len(rule.theirs),) * len(rule.theirs)
        if sum(sizes) != rows:
            raise ValueError(
                f"{rule.ours} has {rows} rows, which do not split into {len(rule.theirs)} parts of "
                f"{', '.join(map(str, sizes))} ({', '.join(rule.theirs)}); the tensor does not fit the config"
            )
        parts = tensor.split(list(sizes), dim=0)
        return [p.clone() for p in parts]
    return [_swap_halves(tensor) if rule.op == "swap" else tensor]


def _apply(sd: StateDict, rules: Sequence[Rule], *, to_ours: bool) -> StateDict:
    produced: dict[str, StateDict] = {}  # first source key -> the outputs that take its place
    consumed: set[str] = set()
    for rule in rules:
        src = rule.theirs if to_ours else (rule.ours,)
        if not all(k in sd for k in src):
            continue  # left for the loader's strict check to report
        if overlap := consumed.intersection(src):
            raise ValueError(f"two rules read {sorted(overlap)}; a key map must use each tensor once")
        consumed.update(src)
        if to_ours:
            produced[src[0]] = {rule.ours: join(rule, [sd[k] for k in src])}
        else:
            produced[src[0]] = dict(zip(rule.theirs, split(rule, sd[rule.ours]), strict=True))
    outputs = {k for group in produced.values() for k in group}
    out: StateDict = {}
    for key, value in sd.items():
        if key in produced:
            out.update(produced[key])
        elif key not in consumed and key not in outputs:
            out[key] = value
    return out


def to_ours(sd: StateDict, rules: Sequence[Rule]) -> StateDict:
    """Their state dict in our names."""
    return _apply(sd, rules, to_ours=True)


def to_theirs(sd: StateDict, rules: Sequence[Rule]) -> StateDict:
    """Our state dict in their names."""
    return _apply(sd, rules, to_ours=False)


def module_rules(rules: Sequence[Rule], param: str = "weight") -> dict[str, Rule]:
    """Our module name -> the rule of its ``.{param}``, restated for module names (``theirs`` are modules
    too): how an adapter on a layer (a LoRA) maps, since its factors follow the layer's weight rows."""
    suffix = "." + param
    return {
        r.ours.removesuffix(suffix): Rule(
            r.ours.removesuffix(suffix), tuple(t.removesuffix(suffix) for t in r.theirs), r.op, r.sizes
        )
        for r in rules
        if r.ours.endswith(suffix) and all(t.endswith(suffix) for t in r.theirs)
    }
