"""Which emoji is this image? Retrieval against the rendered catalogue; images scored against captions.

The feature of an image (:func:`feature`) is its picture cut out and normalised for place and size: the
background is the median colour of the image border; the picture is the bounding box of the pixels that
differ from it by more than :data:`FOREGROUND` (0-255, largest channel difference, 3 x 3 median-filtered,
the outer ring of pixels left out: VAE decoders leave specks there); the box is made square
about its centre (padded with the background), resized to :data:`SIDE` x :data:`SIDE` and taken as
differences from the background colour. Each emoji's reference is its canonical render (centred, the middle
of the training extents) on the training background nearest the image's, through the same steps
(:func:`references`). The retrieved emoji are the references nearest in L2; emoji that share one picture
under several names (:func:`picture_classes`) count as one.

:func:`validate` measures the judge where the answer is known: fresh renders under the training
augmentations (top-1 and top-5), uniform noise and shuffled pairs (both should sit near chance, 1 / N).
:func:`evaluate` scores images against their captions: top-1 and top-5 retrieval of the named emoji, overall
and per category (Unicode's groups).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E

SIDE = 24
FOREGROUND = 32.0


def to_array(image: object, size: int = 64) -> np.ndarray:
    """uint8 RGB [size, size, 3] from a PIL image or an array (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got an array of shape {a.shape}")
        im = Image.fromarray(a)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im)


def background(a: np.ndarray) -> np.ndarray:
    """The median colour of the image border, float [3]."""
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).astype(np.float32)
    return np.median(ring, axis=0)


def _crop(a: np.ndarray, bg: np.ndarray) -> np.ndarray:
    from PIL import Image
    from scipy.ndimage import median_filter

    diff = median_filter(np.abs(a.astype(np.float32) - bg).max(axis=2), size=3)
    diff[[0, -1]] = 0  # the outer ring is background (every picture keeps a margin); decoders smear it
    diff[:, [0, -1]] = 0
    ys, xs = np.nonzero(diff > FOREGROUND)
    if len(ys) == 0:  # nothing there: the whole image
        y0, y1, x0, x1 = 0, a.shape[0], 0, a.shape[1]
    else:
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    pad = side
    big = np.empty((a.shape[0] + 2 * pad, a.shape[1] + 2 * pad, 3), np.uint8)
    big[:] = np.round(bg).astype(np.uint8)
    big[pad : pad + a.shape[0], pad : pad + a.shape[1]] = a
    top, left = round(cy - side / 2) + pad, round(cx - side / 2) + pad
    box = big[top : top + side, left : left + side]
    small = Image.fromarray(box).resize((SIDE, SIDE), Image.Resampling.BOX)
    return np.asarray(small).astype(np.float32)


def feature(image: object) -> tuple[np.ndarray, np.ndarray]:
    """(the feature [SIDE * SIDE * 3] in 0-1 units, the background colour [3]) of one image."""
    a = to_array(image)
    bg = background(a)
    return ((_crop(a, bg) - bg) / 255.0).reshape(-1), bg


def nearest_background(bg: np.ndarray) -> str:
    names = list(E.BACKGROUNDS)
    colours = np.array([E.BACKGROUNDS[n] for n in names], np.float32)
    return names[int(np.argmin(((colours - bg) ** 2).sum(1)))]


@cache
def references(background_name: str) -> np.ndarray:
    """Every emoji's feature [N, D] from its canonical render on a training background."""
    mid = sum(E.EXTENT) / 2
    rows = []
    for e in E.catalogue():
        s = E.Sample(e.index, "{a} {name}", 0, background_name, True, mid, 0.5, 0.5)
        rows.append(feature(E.render(s))[0])
    return np.stack(rows)


def distances(images: Sequence[object]) -> np.ndarray:
    """Squared L2 distance of each image's feature to each emoji's reference, [len(images), N]."""
    out = np.empty((len(images), len(E.catalogue())), np.float32)
    for i, image in enumerate(images):
        f, bg = feature(image)
        out[i] = ((references(nearest_background(bg)) - f) ** 2).sum(1)
    return out


def retrieve(images: Sequence[object], k: int = 5) -> np.ndarray:
    """The indices of the k nearest emoji of each image, nearest first, [len(images), k]."""
    return np.argsort(distances(images), axis=1, kind="stable")[:, :k]


@cache
def picture_classes() -> np.ndarray:
    """Per emoji, the index of the first emoji with the very same picture (int [N]).

    A few emoji share one glyph under several names (the flag of France is also Clipperton Island's and
    St Martin's; Norway's is Bouvet Island's): retrieval counts any of them as right.
    """
    first: dict[bytes, int] = {}
    out = np.empty(len(E.catalogue()), np.int64)
    for e in E.catalogue():
        g = E.glyph(e.index)
        key = repr(g.size).encode() + g.tobytes()
        out[e.index] = first.setdefault(key, e.index)
    return out


@cache
def _caption_patterns() -> tuple[re.Pattern, ...]:
    bgs = "|".join(re.escape(b) for b in E.BACKGROUNDS)
    suffix = rf"(?: on an? (?:{bgs}) background)?"
    pats = []
    for split in E.SPLITS:
        for t in E.TEMPLATES[split]:
            body = (
                re.escape(t)
                .replace(re.escape("{a}"), "(?:a|an)")
                .replace(re.escape("{name}"), "(?P<name>.+?)")
            )
            pats.append(re.compile(rf"^{body}{suffix}$"))
    return tuple(pats)


def parse_caption(text: str) -> int:
    """The emoji a caption names (index into the catalogue); ValueError naming the caption if none.

    Tries every phrasing of every split (with or without a stated background), then the caption as a bare
    name.
    """
    names = E.by_name()
    clean = " ".join(text.lower().strip().rstrip(".").split())
    for pat in _caption_patterns():
        m = pat.match(clean)
        if m and m.group("name") in names:
            return names[m.group("name")].index
    if clean in names:
        return names[clean].index
    raise ValueError(f"caption {text!r} names no emoji of the catalogue (see emoji_set.catalogue())")


@dataclass
class EmojiResult:
    """Top-1 / top-5 retrieval of the named emoji, overall and per category."""

    n_images: int
    top1: float
    top5: float
    per_category: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # n, top-1, top-5
    hits: list[tuple[bool, bool]] = field(default_factory=list)  # per image: (top-1, top-5)

    def to_dict(self) -> dict:
        return {
            "n_images": self.n_images,
            "top1": self.top1,
            "top5": self.top5,
            "per_category": {k: {"n": n, "top1": a, "top5": b} for k, (n, a, b) in self.per_category.items()},
            "per_image": [{"top1": a, "top5": b} for a, b in self.hits],
        }


def score(ranked: np.ndarray, targets: Sequence[int]) -> EmojiResult:
    """Retrieval result of ``ranked`` [n, >= 5] (from :func:`retrieve`) against the wanted emoji."""
    cat, same = E.catalogue(), picture_classes()
    hits = [
        (bool(same[r[0]] == same[t]), bool(same[t] in same[r[:5]]))
        for r, t in zip(ranked, targets, strict=True)
    ]
    per: dict[str, list[tuple[bool, bool]]] = {}
    for (h1, h5), t in zip(hits, targets, strict=True):
        per.setdefault(cat[t].category, []).append((h1, h5))
    order = [c for c in E.GROUPS.values() if c in per]
    n = max(len(hits), 1)
    return EmojiResult(
        len(hits),
        sum(h for h, _ in hits) / n,
        sum(h for _, h in hits) / n,
        {
            c: (len(per[c]), float(np.mean([h for h, _ in per[c]])), float(np.mean([h for _, h in per[c]])))
            for c in order
        },
        hits,
    )


def evaluate(images: Sequence[object], captions: Sequence[str]) -> EmojiResult:
    """Score images against the captions they were made from."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    targets = [parse_caption(c) for c in captions]
    return score(retrieve(images), targets)


def validate(per_emoji: int = 2, seed: int = 0, noise_images: int = 500) -> dict[str, float]:
    """The judge where the answer is known (fresh renders of the validation split's placements):
    top-1 / top-5 on renders, on a quarter of them blurred (radius 1 px, as a decoder softens), on uniform
    noise, and on shuffled pairs (each image judged against another sample's emoji); chance is 1 / N for
    top-1 and 5 / N for top-5."""
    n = len(E.catalogue())
    samples = [E.sample_at(i, seed=seed + 1000, split="validation") for i in range(per_emoji * n)]
    ranked = retrieve([E.render(s) for s in samples])
    targets = [s.emoji for s in samples]
    renders = score(ranked, targets)
    from PIL import ImageFilter

    blurred = [E.render_pil(s).filter(ImageFilter.GaussianBlur(1.0)) for s in samples[: len(samples) // 4]]
    blur = score(retrieve(blurred), targets[: len(blurred)])
    rng = np.random.default_rng(seed)
    shuffled = score(ranked, list(rng.permutation(targets)))
    noise = rng.integers(0, 256, (noise_images, 64, 64, 3), dtype=np.uint8)
    noise_score = score(retrieve(list(noise)), list(rng.integers(0, n, noise_images)))
    return {
        "renders_top1": renders.top1,
        "renders_top5": renders.top5,
        "blurred_top1": blur.top1,  # a quarter of the renders, Gaussian blur of radius 1 px
        "blurred_top5": blur.top5,
        "shuffled_top1": shuffled.top1,
        "shuffled_top5": shuffled.top5,
        "noise_top1": noise_score.top1,
        "noise_top5": noise_score.top5,
        "chance_top1": 1 / n,
        "chance_top5": 5 / n,
        "per_category_top1": {k: v[1] for k, v in renders.per_category.items()},
    }
