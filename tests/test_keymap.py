"""The key-map engine: each op and its inverse, pass-through and skipping, key order, and checks that every
rule table of both families uses each tensor once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmdit_flow.models.flux import FluxConfig
from mmdit_flow.models.sd3 import SD3Config
from mmdit_flow.weights import flux_keys, sd3_keys
from mmdit_flow.weights.keymap import Rule, join, module_rules, params, split, to_ours, to_theirs

RULES = [
    *params("fused", ["q", "k", "v"], "cat"),
    *params("lin1", ["a", "b"], "cat", names=("weight",), sizes=(1, 3)),
    Rule("mod", ("their_mod",), "swap"),
    Rule("same", ("other",)),
]


def _theirs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"q.weight": (2, 3), "k.weight": (2, 3), "v.weight": (2, 3), "q.bias": (2,), "k.bias": (2,)}
    shapes |= {"v.bias": (2,), "a.weight": (1, 3), "b.weight": (3, 3), "their_mod": (4,), "other": (5,)}
    shapes |= {"extra": (1,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_ops_and_their_inverses():
    theirs = _theirs()
    ours = to_ours(theirs, RULES)
    assert list(ours) == ["fused.weight", "fused.bias", "lin1.weight", "mod", "same", "extra"]
    assert torch.equal(ours["fused.weight"], torch.cat([theirs[f"{n}.weight"] for n in "qkv"]))
    assert torch.equal(ours["lin1.weight"], torch.cat([theirs["a.weight"], theirs["b.weight"]]))
    assert torch.equal(ours["mod"], theirs["their_mod"][[2, 3, 0, 1]])
    assert ours["same"] is theirs["other"] and ours["extra"] is theirs["extra"]
    back = to_theirs(ours, RULES)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    # split parts never share storage (safetensors refuses that)
    assert back["q.weight"].untyped_storage().data_ptr() != back["k.weight"].untyped_storage().data_ptr()


def test_missing_sources_skip_the_rule_and_leave_the_rest_for_the_strict_loader():
    theirs = _theirs()
    del theirs["k.weight"]
    ours = to_ours(theirs, RULES)
    assert "fused.weight" not in ours
    assert "q.weight" in ours and "v.weight" in ours and "fused.bias" in ours


@pytest.mark.parametrize(
    "rule, match",
    [
        (dict(ours="x", theirs=("a", "b")), "'cat' takes two or more"),
        (dict(ours="x", theirs=("a",), op="cat"), "'cat' takes two or more"),
        (dict(ours="x", theirs=()), "0 source tensors"),
        (dict(ours="x", theirs=("a",), op="fuse"), "unknown op 'fuse'"),
        (dict(ours="x", theirs=("a", "b"), op="cat", sizes=(1,)), "1 sizes, 2 tensors"),
    ],
)
def test_bad_rules_are_refused(rule, match):
    with pytest.raises(ValueError, match=match):
        Rule(**rule)


def test_split_names_a_tensor_that_does_not_fit():
    rule = Rule("qkv.weight", ("q.weight", "k.weight", "v.weight"), "cat")
    with pytest.raises(ValueError, match=r"qkv.weight has 4 rows, which do not split into 3 parts"):
        split(rule, torch.zeros(4, 2))
    assert torch.equal(join(rule, split(rule, torch.arange(6.0))), torch.arange(6.0))


def test_a_table_that_reads_a_tensor_twice_is_an_error():
    with pytest.raises(ValueError, match=r"two rules read \['a'\]"):
        to_ours({"a": torch.zeros(1)}, [Rule("x", ("a",)), Rule("y", ("a",))])


def test_module_rules_restate_weight_rules_for_modules():
    mods = module_rules(RULES)
    assert mods["fused"] == Rule("fused", ("q", "k", "v"), "cat")
    assert mods["lin1"] == Rule("lin1", ("a", "b"), "cat", (1, 3))
    assert "mod" not in mods and "same" not in mods  # not a module's .weight


SD3 = SD3Config(hidden_size=128, num_heads=2, depth=3, qk_norm="rms_norm", dual_attention_layers=(0, 2))
FLUX = FluxConfig(hidden_size=64, num_heads=2, depth=2, depth_single=2, axes_dim=(8, 12, 12))
TABLES = {
    "sd3-diffusers": sd3_keys.diffusers_rules(SD3),
    "sd3-original": sd3_keys.original_rules(SD3),
    "sd3-plain-diffusers": sd3_keys.diffusers_rules(dataclasses.replace(SD3, qk_norm=None)),
    "flux-diffusers": flux_keys.diffusers_rules(FLUX),
    "flux-original": flux_keys.original_rules(FLUX),
    "schnell-diffusers": flux_keys.diffusers_rules(dataclasses.replace(FLUX, guidance_embed=False)),
}


@pytest.mark.parametrize("name", TABLES)
def test_every_table_names_each_tensor_once(name):
    rules = TABLES[name]
    ours = [r.ours for r in rules]
    theirs = [t for r in rules for t in r.theirs]
    assert len(set(ours)) == len(ours) and len(set(theirs)) == len(theirs)
