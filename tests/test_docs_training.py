"""docs/training.md stays true: its config block lists every key with its default, and the one-liners it
documents name things that exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from mmdit_flow.training.config import TrainConfig, config_to_dict, example_configs, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
EXAMPLES = {("model", "pretrained"): "path/to/sd3-diffusers-folder", ("data", "path"): "images/"}


def _config_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Config") :]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def _default(f: dataclasses.Field):
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _defaults() -> dict:
    """Every field's default (``TrainConfig()`` itself is invalid: it names no model and no data)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        value = _default(f)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    for (section, key), value in EXAMPLES.items():
        out[section][key] = value
    return out


def test_config_block_is_the_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(_config_block())
    parsed = config_to_dict(load_config(path))  # the project's loader: every key and value checked
    assert parsed == _defaults()


def test_config_block_lists_every_key():
    raw = yaml.safe_load(_config_block())
    listed = {(s, k) for s, v in raw.items() if isinstance(v, dict) for k in v} | {
        (k,) for k, v in raw.items() if not isinstance(v, dict)
    }
    fields = set()
    for f in dataclasses.fields(TrainConfig):
        value = _default(f)
        if dataclasses.is_dataclass(value):
            fields |= {(f.name, g.name) for g in dataclasses.fields(value)}
        else:
            fields.add((f.name,))
    assert listed == fields


def test_documented_one_liners_name_what_exists():
    text = DOC.read_text(encoding="utf-8")
    names = set(re.findall(r"mmdit-flow train shipped:(\w+)", text))
    assert names == set(example_configs()) == {"finetune_tiny_shapes", "lora_tiny_shapes"}
    for name in names:
        cfg = load_config(f"shipped:{name}")
        assert cfg.model.pretrained == "shipped:tiny-shapes" and cfg.data.path == "data/shapes"
        assert cfg.data.resolution is None and cfg.model.max_sequence_length is None  # the model's
    data_line = next(line for line in text.splitlines() if "write_dataset(" in line)
    assert "write_dataset('data/shapes', 256)" in data_line
