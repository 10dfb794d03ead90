"""The training config: YAML, dotted overrides, and errors that name the key and the choices."""

from __future__ import annotations

import copy
import subprocess
import sys
import types

import pytest

from mmdit_flow.training.config import apply_overrides, config_from_dict, load_config, save_config

BASE = {"model": {"preset": "tiny"}, "data": {"path": "imgs"}}


def _base() -> dict:
    return copy.deepcopy(BASE)  # apply_overrides changes nested dicts in place


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
        ("data.batch_size=0", "data.batch_size must be a finite number > 0, got 0"),
        ("data.batch_size=1.5", "data.batch_size: expected an integer"),
        ("precision.mixed_precision=fp8", "choose from 'no', 'bf16', 'fp16'"),
        ("data.crop=middle", "data.crop"),
        ("model.attention_backend=flash", "choose from 'sdpa', 'math', 'xformers', 'reference'"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction must be a finite number in [0, 1], got 2.0"),
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=.inf", "optimizer.lr must be a finite number > 0, got inf"),
        ("optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
        ("optimizer.grad_clip=.nan", "optimizer.grad_clip must be a finite number >= 0, got nan"),
        ("optimizer.eps=0", "optimizer.eps must be a finite number > 0, got 0.0"),
        ("optimizer.betas=[0.9, .nan]", "optimizer.betas must be two numbers in [0, 1)"),
        ("objective.shift=-.inf", "objective.shift must be a finite number > 0, got -inf"),
        ("objective.logit_std=.nan", "objective.logit_std must be a finite number > 0, got nan"),
        ("objective.logit_mean=.inf", "objective.logit_mean must be a finite number, got inf"),
        ("objective.mode_scale=.nan", "objective.mode_scale must be a finite number, got nan"),
        (
            "objective.caption_dropout.t5=.nan",
            "objective.caption_dropout.t5 must be a finite number in [0, 1]",
        ),
        ("data.max_aspect=.nan", "data.max_aspect must be a finite number >= 1, got nan"),
        ("ema.decay=1", "ema.decay must be a finite number in [0, 1), got 1.0"),
        ("lora.alpha=0", "lora.alpha must be a finite number > 0, got 0.0"),
        ("model.overrides.mlp_ratio=.inf", "model.overrides.mlp_ratio must be a finite number, got inf"),
        ("seed=-1", "seed must be a finite number in [0, 4294967296), got -1"),
        ("seed=4294967296", "seed must be a finite number in [0, 4294967296)"),
        ("output.validation_seeds=[0, -3]", "output.validation_seeds[1] must be a finite number in [0,"),
        ("output.validation_guidance=-1", "output.validation_guidance must be a finite number >= 0"),
    ],
)
def test_every_number_is_finite_and_in_range(override, message):
    with pytest.raises(ValueError) as err:
        config_from_dict(apply_overrides(_base(), [override]))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.resolution=0", "data.resolution must be a finite number > 0, got 0"),
        ("model.max_sequence_length=-4", "model.max_sequence_length must be a finite number > 0, got -4"),
    ],
)
def test_resolution_and_length_are_the_models_or_positive(override, message):
    c = config_from_dict(apply_overrides(_base(), ["data.resolution=", "model.max_sequence_length=null"]))
    assert (c.data.resolution, c.model.max_sequence_length) == (None, None)  # the model's, resolved later
    with pytest.raises(ValueError, match=message):
        config_from_dict(apply_overrides(_base(), [override]))


def test_mode_scale_range_applies_to_the_mode_scheme():
    base = {**_base(), "objective": {"mode_scale": 2.0}}
    assert config_from_dict(base).objective.mode_scale == 2.0  # unused by logit_normal
    with pytest.raises(ValueError, match=r"objective.mode_scale must be a finite number in \[-1, 1.75"):
        config_from_dict({**_base(), "objective": {"scheme": "mode", "mode_scale": 2.0}})


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model:\n  preset: tiny\ndata:\n  path: imgs\nmodel:\n  preset: x\n",
            "line 5: key 'model' is given twice",
        ),
        ("model:\n  preset: tiny\ndata:\n  path: imgs\n  path: other\n", "line 5: key 'path' is given twice"),
        ("model: {preset: tiny, preset: x}\ndata: {path: imgs}\n", "key 'preset' is given twice"),
        (
            "model:\n  preset: tiny\n  overrides:\n    depth: 2\n    depth: 3\ndata:\n  path: imgs\n",
            "line 5: key 'depth' is given twice in one mapping (first on line 4)",
        ),
    ],
)
def test_a_yaml_key_given_twice_is_an_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "base: &b {preset: tiny, depth: 1}\nmodel:\n  <<: *b\n  preset: tiny\ndata: {path: imgs}\n"
    )
    with pytest.raises(ValueError, match="unknown key 'base'"):  # merged fine; `base` itself is no section
        load_config(path)


def test_an_override_given_twice_is_an_error():
    with pytest.raises(ValueError, match="override optimizer.lr is given twice"):
        apply_overrides(_base(), ["optimizer.lr=1e-3", "optimizer.lr=2e-3"])
    with pytest.raises(ValueError, match="key 'depth' is given twice"):
        apply_overrides(_base(), ["model.overrides={depth: 2, depth: 3}"])
    with pytest.raises(ValueError, match="has an empty part"):
        apply_overrides(_base(), ["optimizer..lr=1"])


def test_choice_lists_match_their_sources():
    """The config's Literals repeat lists stated in the library (config.py must not import torch)."""
    import typing

    from accelerate.utils import LoggerType, PrecisionType

    from mmdit_flow import attention, flow
    from mmdit_flow.training import config
    from mmdit_flow.training.trainer import lr_factor

    assert typing.get_args(config.Scheme) == flow.SCHEMES
    assert typing.get_args(config.Weighting) == flow.WEIGHTINGS
    assert typing.get_args(config.AttentionBackend) == attention.BACKENDS
    assert set(typing.get_args(config.MixedPrecision)) <= {p.value for p in PrecisionType}
    assert set(config.TRACKERS) <= {t.value for t in LoggerType}
    for name in typing.get_args(config.LRSchedule):  # each schedule is one lr_factor computes
        lr_factor(0, config.ScheduleConfig(max_steps=2, lr_schedule=name))
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, types.SimpleNamespace(warmup_steps=0, max_steps=2, min_lr_ratio=0.0, lr_schedule="step"))


def test_config_does_not_import_torch():
    code = "import sys, mmdit_flow.training.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
