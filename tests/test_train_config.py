"""The training config: YAML, dotted overrides, and errors that name the key and the choices."""

from __future__ import annotations

import pytest

from mmdit_flow.training.config import apply_overrides, config_from_dict, load_config, save_config

BASE = {"model": {"preset": "tiny"}, "data": {"path": "imgs"}}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  preset: tiny\ndata:\n  path: imgs\n  resolution: 256\noptimizer:\n  lr: 1e-4\n"
    )
    c = load_config(
        path,
        [
            "optimizer.lr=3e-4",
            "data.buckets=true",
            "objective.caption_dropout.t5=0.5",
            "output.validation_prompts=[a cat, a dog]",
            "seed=7",
        ],
    )
    assert c.optimizer.lr == 3e-4 and isinstance(c.optimizer.lr, float)
    assert c.data.resolution == 256 and c.data.buckets is True
    assert c.objective.caption_dropout == {"t5": 0.5}
    assert c.output.validation_prompts == ["a cat", "a dog"]
    assert c.seed == 7
    save_config(c, tmp_path / "back.yaml")
    assert load_config(tmp_path / "back.yaml") == c


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "objective.scheme=lognormal",
            "objective.scheme: 'lognormal' is not a valid choice; choose from 'uniform'",
        ),
        ("objective.weighting=snr", "'none', 'cosmap', 'sigma_sqrt'"),
        ("optimizer.lrr=1", "unknown key 'optimizer.lrr' (did you mean 'lr'?)"),
        ("optimizer.lr=fast", "optimizer.lr: expected a number, got 'fast'"),
        ("data.batch_size=0", "data.batch_size must be > 0"),
        ("data.batch_size=1.5", "data.batch_size: expected an integer"),
        ("precision.mixed_precision=fp8", "choose from 'no', 'bf16', 'fp16'"),
        ("data.crop=middle", "data.crop"),
        ("model.attention_backend=flash", "choose from 'sdpa', 'math', 'xformers', 'reference'"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction must be in [0, 1]"),
        ("model.pretrained=some/folder", "set exactly one of model.preset"),
        ("objective.caption_dropout.t5=1.5", "objective.caption_dropout.t5"),
        ("output.trackers=[tensorbord]", "unknown tracker 'tensorbord'"),
        ("optimizer", "key=value"),
        ("data.resolution=100", "multiple of data.bucket_step"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        config_from_dict(apply_overrides({"model": {"preset": "tiny"}, "data": {"path": "imgs"}}, [override]))
    assert message in str(err.value)


def test_needs_data_and_exactly_one_model():
    with pytest.raises(ValueError, match="no training data"):
        config_from_dict({"model": {"preset": "tiny"}})
    with pytest.raises(ValueError, match="set exactly one"):
        config_from_dict({"data": {"path": "x"}})
    assert config_from_dict(BASE).data.path == "imgs"


def test_unquoted_no_is_the_choice_no():
    """YAML reads `no` as False; `precision.mixed_precision=no` still means the choice 'no'."""
    base = {"model": {"preset": "tiny"}, "data": {"path": "imgs"}}
    c = config_from_dict(apply_overrides(base, ["precision.mixed_precision=no"]))
    assert c.precision.mixed_precision == "no"
    with pytest.raises(ValueError, match="precision.mixed_precision: True is not a valid choice"):
        config_from_dict(apply_overrides(base, ["precision.mixed_precision=yes"]))
