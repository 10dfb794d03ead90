"""The models that come with mmdit-flow, named ``shipped:NAME`` wherever a model folder is asked for.

``TextToImagePipeline.from_pretrained("shipped:tiny-shapes-turbo")``, ``mmdit-flow generate --model
shipped:tiny-shapes-turbo`` and ``model.pretrained: shipped:tiny-shapes`` in a training config name the
folders under ``mmdit_flow/weights/`` (package data). The prefix is explicit, so that a local folder of the
same name is never shadowed; anything else is a path. Light: nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SHIPPED = "shipped:"


def package_folder(package: str) -> Path:
    """A package's folder, found without importing it (``mmdit_flow.weights`` imports torch)."""
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every model that comes with mmdit-flow (package data of ``mmdit_flow.weights``)."""
    root = package_folder("mmdit_flow.weights")
    return {p.name: p for p in sorted(root.iterdir()) if (p / "model_index.json").is_file()}


def shipped(value: str, found: dict[str, Path], what: str, key: str) -> Path:
    """The entry ``shipped:NAME`` names in ``found``; an unknown name lists the known ones, naming ``key``."""
    name = value.removeprefix(SHIPPED)
    if name not in found:
        names = ", ".join(SHIPPED + n for n in found) or "none"
        raise ValueError(f"{key}: {value!r} names no shipped {what}; the shipped {what}s are: {names}")
    return found[name]


def model_folder(value: str, key: str = "model") -> str:
    """The path a model value names: ``shipped:NAME`` is a shipped model's folder; anything else is returned
    unchanged."""
    if not value.startswith(SHIPPED):
        return value
    return str(shipped(value, shipped_models(), "model", key))
