"""Check a captioned-shapes caption against an image by classical image analysis.

Two halves:

* :func:`parse_caption` inverts the grammar of :mod:`mmdit_flow.training.recipes.tiny_shapes.shapes` into a
  :class:`Claim`
  (objects with shape, colour and size; a position or a relation; maybe a background).
* :func:`analyze` finds the objects in an image: the background colour is the median of the image border;
  pixels far from it in RGB are foreground; each connected component (``scipy.ndimage.label``) is one object,
  re-segmented at half contrast along the line from the background to its own colour (so blur neither grows
  nor shrinks it). Colour is the nearest named colour in CIELAB; size the side of the bounding box; shape
  comes from geometry: how far the centroid sits below the box centre (upright triangle h/6, others 0),
  how the width tapers towards the top (triangle), and the extent along the diagonals over the box side
  (square sqrt 2, circle 1); position is the nearest anchor of :data:`shapes.POSITION_ANCHORS` to the box
  centre; a relation compares the two box centres along the dominant axis.

:func:`score` turns a claim and the detections into per-attribute checks (``count``, ``shape``, ``color``,
``size``, ``position``, ``relation``, ``background``). The k stated objects are matched to the k largest
detections in the order with the most correct checks, so a small extra blob costs only the ``count`` check.
:func:`evaluate` runs all of it over a batch and returns an :class:`EvalResult`: per-attribute accuracy,
``overall`` (mean over every check) and ``all_correct`` (share of images with every check right).
:func:`chance_level` is the score of mismatched captions with perfect perception, the baseline that
shuffled captions should reach.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mmdit_flow.training.recipes.tiny_shapes import shapes

ATTRIBUTES = ("count", "shape", "color", "size", "position", "relation", "background")

# Foreground threshold on the RGB distance to the background (0-255 units, after a 3x3 median filter).
_FG_THRESHOLD = 48.0
_MIN_AREA_FRAC = 0.004  # smaller components are specks (a small triangle covers ~1.9 % of the image)
_MAX_AREA_FRAC = 0.5  # larger ones are not objects (a large square covers ~17 %)
# Size threshold on the box side: the geometric mean of the small and large extents.
_SIZE_SPLIT = float(np.sqrt(shapes.SIZE_EXTENT["small"] * shapes.SIZE_EXTENT["large"]))


# ----------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ObjectClaim:
    shape: str
    color: str
    size: str


@dataclass(frozen=True)
class Claim:
    """What a caption states. One object has a ``position``; two have a ``relation`` (first to second)."""

    objects: tuple[ObjectClaim, ...]
    position: str | None = None
    relation: str | None = None
    background: str | None = None

    @property
    def n_checks(self) -> int:
        """Number of attribute checks: count, 3 per object, position or relation, maybe background."""
        return 1 + 3 * len(self.objects) + 1 + (self.background is not None)


_POSITION_WORDS = {tuple(p.split()): name for name, p in shapes.POSITION_PHRASES.items()}
_RELATION_WORDS = {tuple(p.split()): name for name, p in shapes.RELATION_PHRASES.items()}
_PLACES_TO_RELATION = {places: rel for rel, places in shapes.RELATION_PLACES.items()}


class _Words:
    """A cursor over a caption's words that raises a clear error on anything off-grammar."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.lower().replace(",", " ").strip().rstrip(".").split()
        self.i = 0
        vocab = set(shapes.caption_vocabulary()) | {"an"}
        unknown = [w for w in self.words if w not in vocab]
        if unknown:
            raise ValueError(
                f"unknown word(s) {unknown} in caption {text!r}; the grammar's words are "
                f"{', '.join(sorted(vocab))}"
            )

    def fail(self, expected: str) -> ValueError:
        got = " ".join(self.words[self.i :]) or "the end"
        return ValueError(f"cannot parse caption {self.text!r}: expected {expected} at {got!r}")

    def take(self, choices: Sequence[str], what: str) -> str:
        if self.i < len(self.words) and self.words[self.i] in choices:
            self.i += 1
            return self.words[self.i - 1]
        raise self.fail(f"{what} ({' | '.join(choices)})")

    def phrase(self, table: dict[tuple[str, ...], str]) -> str | None:
        for words, name in table.items():
            if tuple(self.words[self.i : self.i + len(words)]) == words:
                self.i += len(words)
                return name
        return None

    def done(self) -> bool:
        return self.i >= len(self.words)


def _parse_object(w: _Words) -> ObjectClaim:
    w.take(("a", "an"), "an article")
    size = w.take(shapes.SIZES, "a size")
    color = w.take(tuple(shapes.COLORS), "a colour")
    shape = w.take(shapes.SHAPES, "a shape")
    return ObjectClaim(shape, color, size)


def parse_caption(text: str) -> Claim:
    """Invert :func:`shapes.caption`: the attributes a caption states. Raises ValueError off-grammar."""
    w = _Words(text)
    first = _parse_object(w)
    position = w.phrase(_POSITION_WORDS)
    if position is not None and not w.done() and w.words[w.i] == "and":
        w.i += 1
        second = _parse_object(w)
        second_place = w.phrase(_POSITION_WORDS)
        relation = _PLACES_TO_RELATION.get((position, second_place))
        if relation is None:
            raise w.fail(f"the place opposite to {shapes.POSITION_PHRASES[position]!r}")
        claim = Claim((first, second), relation=relation)
    elif position is not None:
        claim = Claim((first,), position=position)
    else:
        relation = w.phrase(_RELATION_WORDS)
        if relation is None:
            phrases = list(shapes.POSITION_PHRASES.values()) + list(shapes.RELATION_PHRASES.values())
            raise w.fail(f"a place ({' | '.join(phrases)})")
        claim = Claim((first, _parse_object(w)), relation=relation)
    if not w.done():
        w.take(("on",), "'on a ... background' or the end")
        w.take(("a",), "'a'")
        background = w.take(tuple(shapes.BACKGROUNDS), "a background colour")
        w.take(("background",), "'background'")
        claim = Claim(claim.objects, claim.position, claim.relation, background)
    if not w.done():
        raise w.fail("the end of the caption")
    return claim


# ----------------------------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Detection:
    """One object found in an image (``x, y`` box centre, ``extent`` box side; fractions of the image)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    extent: float
    area: float = 0.0  # fraction of the image
    fill: float = 0.0  # area / box area
    drop: float = 0.0  # (centroid y - box centre y) / box height
    taper: float = 1.0  # width at a quarter of the height / width at three quarters
    diag: float = 0.0  # mean extent along the diagonals / box side

    @property
    def position(self) -> str:
        return _nearest_anchor(self.x, self.y)


@dataclass(frozen=True)
class Analysis:
    background: str
    background_rgb: tuple[float, float, float]
    detections: tuple[Detection, ...]


def _nearest_anchor(x: float, y: float) -> str:
    return min(shapes.POSITION_ANCHORS, key=lambda p: (shapes.POSITION_ANCHORS[p][0] - x) ** 2
               + (shapes.POSITION_ANCHORS[p][1] - y) ** 2)  # fmt: skip


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, [..., 3]) to CIELAB (D65), the space where Euclidean distance tracks perceived colour."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _nearest_name(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = np.linalg.norm(rgb_to_lab(np.array([palette[n] for n in names])) - rgb_to_lab(rgb), axis=-1)
    return names[int(np.argmin(dist))]


def _classify_shape(drop: float, taper: float, diag: float) -> str:
    """Triangle: centroid below the box centre or a tapering top; square: long diagonals; else circle.

    Prototypes (drop, taper, diag): triangle (1/6, 1/3, ~1.06), square (0, 1, sqrt 2), circle (0, 1, 1);
    the thresholds sit between the values measured on renders blurred with sigma up to 1 px plus noise.
    """
    if drop > 0.045 or taper < 0.7:
        return "triangle"
    return "square" if diag > 1.08 else "circle"


def to_array(image: object) -> np.ndarray:
    """A PIL image, a uint8 array or a float array in [0, 1] ([H, W, 3]) as float64 in 0-255."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    raise ValueError(f"expected uint8 (0-255) or float (0-1) pixels, got dtype {arr.dtype}")


def _measure(
    mask: np.ndarray, origin: tuple[int, int], shape: tuple[int, int], color_rgb: np.ndarray
) -> Detection:
    """Geometry of one object mask (a crop whose top-left pixel is ``origin`` in an image of ``shape``)."""
    h_img, w_img = shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + origin[0], xs + origin[1]
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    area = float(len(ys))
    drop = (ys.mean() + 0.5 - (y0 + y1) / 2) / h
    # Extent along the two diagonals over the box side: square sqrt(2), circle 1, triangle about 1.06.
    diag = np.mean([np.ptp(xs + ys) + 1, np.ptp(xs - ys) + 1]) / np.sqrt(2) / np.sqrt(h * w)
    extent = float(np.sqrt(h * w / (h_img * w_img)))
    # Row widths a quarter and three quarters down the box: an upright triangle tapers (1/3), others not (1).
    rows = mask.sum(axis=1)[ys.min() - origin[0] : ys.max() - origin[0] + 1]
    taper = rows[int(h / 4)] / max(rows[min(int(3 * h / 4), h - 1)], 1)
    return Detection(
        shape=_classify_shape(float(drop), float(taper), float(diag)),
        color=_nearest_name(color_rgb, shapes.COLORS),
        size="small" if extent < _SIZE_SPLIT else "large",
        x=float((x0 + x1) / 2 / w_img),
        y=float((y0 + y1) / 2 / h_img),
        extent=extent,
        area=area / (h_img * w_img),
        fill=area / float(h * w),
        drop=float(drop),
        diag=float(diag),
        taper=float(taper),
    )


def _segment(diff: np.ndarray, dist: np.ndarray, comp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Re-segment one component at half contrast; returns (mask, object colour minus background) or None.

    ``diff`` is image minus background [h, w, 3], ``dist`` its filtered norm, ``comp`` the component, all
    cropped with a 3-pixel margin. The colour is the median of the component's more contrasting half (its
    core, not the blurred rim); the mask is t > 1/2 with t = <pixel - bg, colour - bg> / |colour - bg|^2.
    """
    from scipy import ndimage

    core = comp & (dist >= np.percentile(dist[comp], 50))
    axis = np.median(diff[core], axis=0)
    t = ndimage.median_filter(diff @ axis / max(float(axis @ axis), 1e-6), size=3)
    sub, m = ndimage.label((t > 0.5) & ndimage.binary_dilation(comp, iterations=2))
    if m == 0:
        return None
    sizes = ndimage.sum_labels(np.ones_like(t), sub, index=np.arange(1, m + 1))
    return ndimage.binary_fill_holes(sub == 1 + int(np.argmax(sizes))), axis


def analyze(image: object) -> Analysis:
    """Find the background and the objects of an image (see the module docstring for the method)."""
    from scipy import ndimage

    img = to_array(image)
    h, w, _ = img.shape
    b = max(1, round(0.03 * min(h, w)))
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                             img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])  # fmt: skip
    bg = np.median(border, axis=0)
    diff = img - bg  # [H, W, 3]
    dist = ndimage.median_filter(np.linalg.norm(diff, axis=-1), size=3)
    labels, _ = ndimage.label(dist > _FG_THRESHOLD)
    detections = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        # Crop with a margin that covers the dilation (2) and the median filter (1): same result, less work.
        ys = slice(max(box[0].start - 3, 0), min(box[0].stop + 3, h))
        xs = slice(max(box[1].start - 3, 0), min(box[1].stop + 3, w))
        comp = labels[ys, xs] == k
        if not (_MIN_AREA_FRAC * h * w <= comp.sum() <= _MAX_AREA_FRAC * h * w):
            continue
        found = _segment(diff[ys, xs], dist[ys, xs], comp)
        if found is not None and found[0].sum() >= _MIN_AREA_FRAC * h * w:
            detections.append(_measure(found[0], (ys.start, xs.start), (h, w), found[1] + bg))
    detections.sort(key=lambda d: (-d.area, d.y, d.x))
    return Analysis(_nearest_name(bg, shapes.BACKGROUNDS), tuple(float(v) for v in bg), tuple(detections))


def scene_analysis(scene: shapes.Scene) -> Analysis:
    """What a perfect detector would see in a scene: the ground truth as an :class:`Analysis`."""
    dets = tuple(Detection(o.shape, o.color, o.size, o.x, o.y, o.extent) for o in scene.objects)
    return Analysis(scene.background, tuple(float(v) for v in shapes.BACKGROUNDS[scene.background]), dets)


# ----------------------------------------------------------------------------------------------- scoring


def _relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """a is ``relation`` b: the centres differ along the relation's axis more than along the other one."""
    dx, dy = b.x - a.x, b.y - a.y  # from a to b
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx > 0) == (relation == "left of")
    return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")


def _object_checks(claim: Claim, matched: Sequence[Detection | None]) -> dict[str, list[bool]]:
    checks: dict[str, list[bool]] = {"shape": [], "color": [], "size": []}
    for c, d in zip(claim.objects, matched, strict=True):
        checks["shape"].append(d is not None and d.shape == c.shape)
        checks["color"].append(d is not None and d.color == c.color)
        checks["size"].append(d is not None and d.size == c.size)
    if claim.position is not None:
        checks["position"] = [matched[0] is not None and matched[0].position == claim.position]
    else:
        a, b = matched
        checks["relation"] = [a is not None and b is not None and _relation_holds(a, b, claim.relation)]
    return checks


def score(claim: Claim, analysis: Analysis) -> dict[str, list[bool]]:
    """Per-attribute checks of a claim against an analysis; objects matched to maximise correct checks."""
    # Only the k largest detections stand for the k stated objects: letting every speck compete for a
    # match would reward noise with lucky hits.
    dets: list[Detection | None] = list(analysis.detections[: len(claim.objects)])
    dets += [None] * max(0, len(claim.objects) - len(dets))  # a missing object fails all its checks
    best: dict[str, list[bool]] = {}
    best_total = -1
    for matched in itertools.permutations(dets, len(claim.objects)):
        checks = _object_checks(claim, matched)
        total = sum(sum(v) for v in checks.values())
        if total > best_total:
            best, best_total = checks, total
    best["count"] = [len(analysis.detections) == len(claim.objects)]
    if claim.background is not None:
        best["background"] = [analysis.background == claim.background]
    return best


@dataclass
class EvalResult:
    """Accuracy of captions against images.

    ``per_attribute[a]`` is the share of correct ``a`` checks, ``overall`` the share of all checks,
    ``all_correct`` the share of images whose every check is right; ``per_image`` keeps each image's checks.
    """

    per_attribute: dict[str, float]
    overall: float
    all_correct: float
    n_images: int
    per_image: list[dict[str, list[bool]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {
            "n_images": self.n_images,
            "overall": self.overall,
            "all_correct": self.all_correct,
            "per_attribute": self.per_attribute,
            "per_image": self.per_image,
        }


def summarize(per_image: list[dict[str, list[bool]]]) -> EvalResult:
    """Aggregate per-image checks into an :class:`EvalResult`."""
    if not per_image:
        raise ValueError("nothing to evaluate: pass at least one image and caption")
    per_attribute = {}
    for a in ATTRIBUTES:
        results = [r for checks in per_image for r in checks.get(a, [])]
        if results:
            per_attribute[a] = float(np.mean(results))
    every = [r for checks in per_image for v in checks.values() for r in v]
    all_correct = float(np.mean([all(r for v in checks.values() for r in v) for checks in per_image]))
    return EvalResult(per_attribute, float(np.mean(every)), all_correct, len(per_image), per_image)


def evaluate(images: Sequence[object], captions: Sequence[str]) -> EvalResult:
    """Check every caption against its image (PIL images, uint8 arrays or float arrays in [0, 1])."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; pass one caption per image")
    return summarize([score(parse_caption(c), analyze(im)) for im, c in zip(images, captions, strict=True)])


def chance_level(scenes: Sequence[shapes.Scene], shift: int = 1) -> EvalResult:
    """Perfect perception of scene i scored against the caption of scene ``i + shift``: the chance baseline.

    A caption drawn from the same distribution but unrelated to the image scores this on average, so an
    honest evaluator fed shuffled captions should land near it.
    """
    n = len(scenes)
    if n < 2 or shift % n == 0:
        raise ValueError(
            "chance_level needs at least two scenes and a shift that is not a multiple of their count"
        )
    return summarize(
        [
            score(parse_caption(shapes.caption(scenes[(i + shift) % n])), scene_analysis(scenes[i]))
            for i in range(n)
        ]
    )


def bootstrap_difference(
    a: EvalResult, b: EvalResult, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Overall accuracy of ``a`` minus that of ``b`` with a paired bootstrap interval over images.

    ``a`` and ``b`` must score the same captions in the same order (for example one setting against
    another on the same seeds). Images are resampled together, so caption difficulty cancels out; the
    difference is "measurable" when the interval excludes 0. Returns (difference, low, high).
    """
    if a.n_images != b.n_images or not a.per_image:
        raise ValueError(
            f"paired results needed: got {a.n_images} and {b.n_images} images; score the same captions"
        )

    def counts(result: EvalResult) -> tuple[np.ndarray, np.ndarray]:
        right = np.array([sum(r for v in c.values() for r in v) for c in result.per_image], dtype=float)
        total = np.array([sum(len(v) for v in c.values()) for c in result.per_image], dtype=float)
        return right, total

    (ra, ta), (rb, tb) = counts(a), counts(b)
    idx = np.random.default_rng(seed).integers(0, len(ta), size=(n_boot, len(ta)))
    boots = ra[idx].sum(1) / ta[idx].sum(1) - rb[idx].sum(1) / tb[idx].sum(1)
    tail = (1 - level) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return float(ra.sum() / ta.sum() - rb.sum() / tb.sum()), float(low), float(high)
