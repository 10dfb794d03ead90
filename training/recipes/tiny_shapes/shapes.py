"""Captioned shapes: a procedural, seed-deterministic text-to-image data set.

Each sample is a :class:`Scene`: one or two flat-coloured objects (circle, square, triangle) on a plain
background, with a caption from a small grammar::

    scene    := object place [" on a " BG " background"]
    object   := "a " SIZE " " COLOR " " SHAPE
    place    := one object:  " on the left" | " on the right" | " at the top" | " at the bottom"
                           | " in the center"
              | two objects: " to the left of " object | " to the right of " object
                           | " above " object | " below " object
                           | " on the left and " object " on the right"  (and the three other pairs)

for example "a large red circle on the left and a small blue square on the right" or
"a small green triangle in the center on a gray background".

Glossary: ``S`` is the image side in pixels; positions and extents are fractions of ``S``; an object's
``x, y`` is the centre of its bounding box (y grows downwards, as in images); ``extent`` is the side of its
(square) bounding box. Triangles are upright isosceles with height = base, so every shape's box is square.

Object colours are saturated and backgrounds are not (black, gray, white), so an object never blends into
the background. A fixed set of (colour, shape) pairs, :data:`HELDOUT_PAIRS`, never occurs in the training
split: the held-out split contains at least one of them in every scene, to test composition.

Sampling is deterministic per (seed, split, index): ``scene_at(i, seed=s, split=...)`` is the same scene
on every machine, so a data set can be regenerated or indexed lazily.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

SHAPES = ("circle", "square", "triangle")
# Saturated object colours with hues about 30 degrees or more apart (sRGB, 0-255).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 175, 50),
    "cyan": (30, 205, 215),
    "blue": (35, 65, 225),
    "purple": (155, 45, 205),
}
# Unsaturated backgrounds: far from every object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
# Bounding-box side as a fraction of the image side; each object gets a jitter of +-8 % around it.
SIZE_EXTENT = {"small": 0.20, "large": 0.38}
SIZE_JITTER = 0.08
POSITIONS = ("left", "right", "top", "bottom", "center")
# Anchor (x, y) of each single-object position, as fractions of the image side.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
POSITION_JITTER = 0.05
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# A relation states where the first object is relative to the second.
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# "absolute" phrasing of a relation: (place of the first object, place of the second).
RELATION_PLACES = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
PHRASINGS = ("relative", "absolute")
# (colour, shape) pairs that never appear in the training split.
HELDOUT_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "circle")}
)
SPLITS = ("train", "heldout", "all")

_MARGIN = 0.03  # minimum distance of an object from the image border (fraction of S)
_GAP = 0.06  # minimum gap between the boxes of two objects (fraction of S)
_SUPERSAMPLE = 4  # render at 4x and downsample: antialiased edges


@dataclass(frozen=True)
class ObjectSpec:
    """One object: what and where (``x, y`` box centre, ``extent`` box side; fractions of S)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    extent: float

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("color", self.color, tuple(COLORS))
        _check_choice("size", self.size, SIZES)


@dataclass(frozen=True)
class Scene:
    """A captioned image: its objects, background and how the caption places them.

    One object: ``position`` is one of :data:`POSITIONS` and ``relation`` is None.
    Two objects: ``relation`` is one of :data:`RELATIONS` (object 0 relative to object 1), ``phrasing`` says
    whether the caption uses "to the left of" (``relative``) or "on the left and ... on the right"
    (``absolute``), and ``position`` is None. ``show_background``: whether the caption names the background.
    """

    objects: tuple[ObjectSpec, ...]
    background: str
    position: str | None = None
    relation: str | None = None
    phrasing: str = "relative"
    show_background: bool = True

    def __post_init__(self) -> None:
        _check_choice("background", self.background, tuple(BACKGROUNDS))
        _check_choice("phrasing", self.phrasing, PHRASINGS)
        if len(self.objects) == 1:
            _check_choice("position", self.position, POSITIONS)
            if self.relation is not None:
                raise ValueError("a one-object scene has a position, not a relation; set relation=None")
        elif len(self.objects) == 2:
            _check_choice("relation", self.relation, RELATIONS)
            if self.position is not None:
                raise ValueError("a two-object scene has a relation, not a position; set position=None")
        else:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")

    def to_dict(self) -> dict:
        """A JSON-ready dict; :func:`scene_from_dict` inverts it."""
        return asdict(self)


def scene_from_dict(d: dict) -> Scene:
    """Inverse of :meth:`Scene.to_dict`."""
    objects = tuple(ObjectSpec(**o) for o in d["objects"])
    return Scene(**{**d, "objects": objects})


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------- captions


def describe_object(obj: ObjectSpec) -> str:
    """``"a large red circle"``."""
    return f"a {obj.size} {obj.color} {obj.shape}"


def object_places(scene: Scene) -> tuple[str, ...]:
    """Where each object of a scene is, as a :data:`POSITIONS` name: a single object's ``position``; for
    two objects, the places a relation puts them (:data:`RELATION_PLACES`: "left of" is left and right)."""
    if len(scene.objects) == 1:
        return (scene.position,)
    return RELATION_PLACES[scene.relation]


def caption_parts(scene: Scene) -> list[tuple[str, int | None]]:
    """The caption in phrases, each with the index of the object it describes (None for the words that
    join or follow the objects): ``" ".join(text for text, _ in caption_parts(s)) == caption(s)``.

    An object's phrase includes its place when the caption states one ("a large red circle on the left");
    a relation ("to the left of") belongs to neither object.
    """
    objs = scene.objects
    places = object_places(scene)
    if len(objs) == 1:
        parts = [(f"{describe_object(objs[0])} {POSITION_PHRASES[places[0]]}", 0)]
    elif scene.phrasing == "relative":
        parts = [
            (describe_object(objs[0]), 0),
            (RELATION_PHRASES[scene.relation], None),
            (describe_object(objs[1]), 1),
        ]
    else:
        parts = [
            (f"{describe_object(objs[0])} {POSITION_PHRASES[places[0]]}", 0),
            ("and", None),
            (f"{describe_object(objs[1])} {POSITION_PHRASES[places[1]]}", 1),
        ]
    if scene.show_background:
        parts.append((f"on a {scene.background} background", None))
    return parts


def caption(scene: Scene) -> str:
    """The caption of a scene, from the grammar in the module docstring."""
    return " ".join(text for text, _ in caption_parts(scene))


# ----------------------------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Draw a scene: uint8 array [size, size, 3], antialiased by 4x supersampling."""
    from PIL import Image, ImageDraw

    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, half = obj.x * big, obj.y * big, obj.extent * big / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:  # upright isosceles triangle, height = base
            draw.polygon([(cx - half, cy + half), (cx + half, cy + half), (cx, cy - half)], fill=fill)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def render_pil(scene: Scene, size: int = 64) -> Image.Image:
    """:func:`render` as a PIL image."""
    from PIL import Image

    return Image.fromarray(render(scene, size))


# ----------------------------------------------------------------------------------------------- sampling


def is_heldout(scene: Scene) -> bool:
    """Whether any object of the scene has a held-out (colour, shape) pair."""
    return any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects)


def _random_object(rng: random.Random, color: str | None = None, shape: str | None = None) -> tuple:
    size = rng.choice(SIZES)
    extent = SIZE_EXTENT[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    return (shape or rng.choice(SHAPES), color or rng.choice(tuple(COLORS)), size, extent)


def _clamp_center(v: float, extent: float) -> float:
    lo = extent / 2 + _MARGIN
    return min(max(v, lo), 1 - lo)


def _place_one(rng: random.Random, attrs: tuple, position: str) -> ObjectSpec:
    shape, color, size, extent = attrs
    ax, ay = POSITION_ANCHORS[position]
    x = _clamp_center(ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER), extent)
    y = _clamp_center(ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER), extent)
    return ObjectSpec(shape, color, size, round(x, 4), round(y, 4), round(extent, 4))


def _place_two(rng: random.Random, a: tuple, b: tuple, relation: str) -> tuple[ObjectSpec, ObjectSpec]:
    """Rejection-sample two boxes that do not overlap and whose relation is unambiguous.

    The relation's axis must dominate: along it the centres differ by at least a quarter of the image and
    by at least twice their offset along the other axis.
    """
    horizontal = relation in ("left of", "right of")
    sign = -1 if relation in ("left of", "above") else 1  # object 0 has the smaller coordinate
    for _ in range(1000):
        xa, ya = (_clamp_center(rng.random(), a[3]) for _ in range(2))
        xb, yb = (_clamp_center(rng.random(), b[3]) for _ in range(2))
        main, other = (xa - xb, ya - yb) if horizontal else (ya - yb, xa - xb)
        if main * sign < 0.25 or abs(other) * 2 > abs(main):
            continue
        gap = max(abs(xa - xb) - (a[3] + b[3]) / 2, abs(ya - yb) - (a[3] + b[3]) / 2)
        if gap < _GAP:
            continue
        return (
            ObjectSpec(a[0], a[1], a[2], round(xa, 4), round(ya, 4), round(a[3], 4)),
            ObjectSpec(b[0], b[1], b[2], round(xb, 4), round(yb, 4), round(b[3], 4)),
        )
    raise RuntimeError(f"could not place two objects for relation {relation!r}")  # pragma: no cover


def _sample_any(rng: random.Random, heldout_object: bool, objects: int | None = None) -> Scene:
    n = rng.choice((1, 2)) if objects is None else objects
    forced = None
    if heldout_object:
        color, shape = sorted(HELDOUT_PAIRS)[rng.randrange(len(HELDOUT_PAIRS))]
        forced = _random_object(rng, color=color, shape=shape)
    background = rng.choice(tuple(BACKGROUNDS))
    show_background = rng.random() < 0.75
    if n == 1:
        position = rng.choice(POSITIONS)
        obj = _place_one(rng, forced or _random_object(rng), position)
        return Scene((obj,), background, position=position, show_background=show_background)
    attrs = [forced or _random_object(rng), _random_object(rng)]
    if forced is not None and rng.random() < 0.5:
        attrs.reverse()
    relation = rng.choice(RELATIONS)
    phrasing = rng.choice(PHRASINGS)
    objs = _place_two(rng, attrs[0], attrs[1], relation)
    return Scene(objs, background, relation=relation, phrasing=phrasing, show_background=show_background)


def scene_at(index: int, *, seed: int = 0, split: str = "train", objects: int | None = None) -> Scene:
    """The ``index``-th scene of a split; the same on every machine for the same (seed, split, index).

    ``train`` never contains a pair from :data:`HELDOUT_PAIRS`; ``heldout`` always contains at least one;
    ``all`` draws freely. One or two objects with equal odds, or exactly ``objects`` (1 or 2): such scenes
    come from a random stream of their own, so ``scene_at(i)`` stays the same scene whatever is asked of
    ``scene_at(i, objects=...)``.
    """
    _check_choice("split", split, SPLITS)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if objects not in (None, 1, 2):
        raise ValueError(f"objects must be 1, 2 or None (either, with equal odds), got {objects!r}")
    key = f"shapes/{seed}/{split}/{index}" + ("" if objects is None else f"/objects={objects}")
    rng = random.Random(key)  # str seeds hash with sha512: portable
    while True:
        scene = _sample_any(rng, heldout_object=split == "heldout", objects=objects)
        if split != "train" or not is_heldout(scene):
            return scene


def object_counts(n: int, two_object_share: float) -> list[int]:
    """Object counts of ``n`` scenes, two objects in a ``two_object_share`` of them, spread evenly.

    Scene ``i`` has two objects where ``floor((i + 1) * share)`` steps up, so every prefix holds the share
    to within one scene.
    """
    if not 0.0 <= two_object_share <= 1.0:
        raise ValueError(f"two_object_share must lie in [0, 1], got {two_object_share!r}")
    return [1 + (math.floor((i + 1) * two_object_share) > math.floor(i * two_object_share)) for i in range(n)]


def sample_scenes(
    n: int, *, seed: int = 0, split: str = "train", two_object_share: float | None = None
) -> list[Scene]:
    """The first ``n`` scenes of a split (see :func:`scene_at`).

    With ``two_object_share``, exactly that share of them (to within one) has two objects, spread evenly
    (:func:`object_counts`); otherwise each scene draws one or two with equal odds.
    """
    counts = [None] * n if two_object_share is None else object_counts(n, two_object_share)
    return [scene_at(i, seed=seed, split=split, objects=k) for i, k in enumerate(counts)]


def train_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` training scenes: no held-out (colour, shape) pair."""
    return sample_scenes(n, seed=seed, split="train")


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` held-out scenes: each has at least one held-out (colour, shape) pair."""
    return sample_scenes(n, seed=seed, split="heldout")


def caption_vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted."""
    words = {"a", "on", "the", "at", "in", "and", "to", "of", "background", "above", "below"}
    words |= set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(SIZES) | set(POSITIONS)
    return sorted(words)


def write_dataset(
    folder: str | Path,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    size: int = 64,
    two_object_share: float | None = None,
) -> Path:
    """Write ``n`` scenes (:func:`sample_scenes`) as a Hugging Face imagefolder: PNGs and ``metadata.jsonl``.

    Each metadata line has ``file_name`` and ``text`` (the caption), plus ``scene`` (the attributes, see
    :meth:`Scene.to_dict`). Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(sample_scenes(n, seed=seed, split=split, two_object_share=two_object_share)):
        name = f"{i:06d}.png"
        render_pil(scene, size).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption(scene), "scene": scene.to_dict()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
