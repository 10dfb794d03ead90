"""Captioned emoji: a seed-deterministic text-to-image data set rendered from the Noto Color Emoji font.

The pictures are the glyphs of Noto Color Emoji (Debian package ``fonts-noto-color-emoji``, SIL Open Font
License 1.1, Google); the names are Unicode's (``emoji-test.txt`` of the Debian package ``unicode-data``:
each emoji's CLDR short name, group and subgroup), with the short-name aliases of the ``emoji`` package
where it is installed. Skin-tone variants are left out, so each picture is a distinct thing:
:func:`catalogue` lists about 1,870 of them, in Unicode's order.

A sample (:class:`Sample`) is one emoji on a plain background, a little scaled and moved (never stated: the
caption stays true), with a caption from one of the phrasings of its split::

    train       "a cat", "cat", "an emoji of a cat", "a picture of a cat", "a cat emoji", "a cat icon"
    validation  "a small picture of a cat"             (phrasing never seen in training)
    heldout     "a drawing of a cat", "an image showing a cat"   (never seen in training or validation)

and, in a share of samples, the background stated: "a cat on a blue background". Unstated backgrounds are
white. ``sample_at(i, seed=s, split=...)`` is the same sample on every machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import unicodedata
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

FONT_ENV = "MMDIT_FLOW_EMOJI_FONT"
TEST_FILE_ENV = "MMDIT_FLOW_EMOJI_TEST"
FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",)
TEST_FILE_PATHS = ("/usr/share/unicode/emoji/emoji-test.txt",)
DEBIAN_PACKAGES = ("fonts-noto-color-emoji", "unicode-data")
FONT_SIZE = 109  # the one size of the font's colour bitmaps (136 x 128 px)
LICENSE = (
    "Pictures: Noto Color Emoji (Google), SIL Open Font License 1.1, "
    "https://github.com/googlefonts/noto-emoji. Names: Unicode emoji-test.txt (Unicode License v3)."
)

SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
# Unicode's groups, with the short label reports use.
GROUPS = {
    "Smileys & Emotion": "faces",
    "People & Body": "people",
    "Animals & Nature": "animals",
    "Food & Drink": "food",
    "Travel & Places": "travel",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}

SPLITS = ("train", "validation", "heldout")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": (
        "{a} {name}",
        "{name}",
        "an emoji of {a} {name}",
        "a picture of {a} {name}",
        "{a} {name} emoji",
        "{a} {name} icon",
    ),
    "validation": ("a small picture of {a} {name}",),
    "heldout": ("a drawing of {a} {name}", "an image showing {a} {name}"),
}
DEFAULT_BACKGROUND = "white"
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 215, 40),
    "green": (50, 160, 60),
    "blue": (40, 80, 210),
    "purple": (130, 60, 180),
    "pink": (240, 150, 190),
}
STATED_BACKGROUND_SHARE = 0.3
EXTENT = (0.72, 0.86)  # the emoji's longer side, as a share of the image side
SHIFT = 0.05  # its centre moves by up to this share of the side, each way


class EmojiDataMissing(RuntimeError):
    """The font or Unicode's emoji list is not on this machine."""


def _find(env: str, paths: tuple[str, ...], what: str) -> Path:
    given = os.environ.get(env)
    if given:
        if not Path(given).is_file():
            raise EmojiDataMissing(f"{env}={given} is not a file; point it at {what} or unset it")
        return Path(given)
    for p in paths:
        if Path(p).is_file():
            return Path(p)
    raise EmojiDataMissing(
        f"{what} not found (looked in {', '.join(paths)}). Install it with "
        f"`sudo apt-get install {' '.join(DEBIAN_PACKAGES)}` (or `python -m mmdit_flow.training.recipes."
        f"tiny_emoji install`), or set {env} to its path"
    )


def font_path() -> Path:
    """The Noto Color Emoji font file ($MMDIT_FLOW_EMOJI_FONT, else Debian's path)."""
    return _find(FONT_ENV, FONT_PATHS, "the Noto Color Emoji font (NotoColorEmoji.ttf)")


def test_file_path() -> Path:
    """Unicode's emoji-test.txt ($MMDIT_FLOW_EMOJI_TEST, else Debian's unicode-data path)."""
    return _find(TEST_FILE_ENV, TEST_FILE_PATHS, "Unicode's emoji-test.txt")


def available() -> str | None:
    """None when the font and the emoji list are here, else why not (for skips and messages)."""
    try:
        font_path()
        test_file_path()
    except EmojiDataMissing as err:
        return str(err)
    return None


def install() -> None:
    """Install the Debian packages with apt-get (as root, or through sudo); a clear error if it fails."""
    if available() is None:
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise EmojiDataMissing(
            f"no apt-get on this machine: install the Noto Color Emoji font and Unicode's emoji-test.txt by "
            f"hand and set {FONT_ENV} and {TEST_FILE_ENV} to their paths"
        )
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        raise EmojiDataMissing(
            f"not root and no sudo: run `apt-get install {' '.join(DEBIAN_PACKAGES)}` as root"
        )
    cmd = [*prefix, apt, "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise EmojiDataMissing(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")
    missing = available()
    if missing is not None:
        raise EmojiDataMissing(f"installed {', '.join(DEBIAN_PACKAGES)}, but still: {missing}")


@dataclass(frozen=True)
class Emoji:
    """One picture: its characters, Unicode name (lower case, caption-ready), group and other names."""

    index: int
    char: str
    name: str
    group: str
    subgroup: str
    aliases: tuple[str, ...] = ()

    @property
    def category(self) -> str:
        return GROUPS[self.group]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def caption_name(cldr: str) -> str:
    """A CLDR short name as captions say it: lower case, "flag: Japan" -> "flag of japan", no punctuation."""
    text = unicodedata.normalize("NFKD", cldr).encode("ascii", "ignore").decode()
    if text.startswith("flag: "):
        text = "flag of " + text[len("flag: ") :]
    for old, new in (
        (": ", " "),
        (", ", " "),
        ("“", ""),
        ("”", ""),
        ('"', ""),
        ("’", "'"),
        (".", ""),
        ("(", ""),
        (")", ""),
    ):
        text = text.replace(old, new)
    return " ".join(text.lower().split())


_WORDS = re.compile(r"[a-z][a-z' -]*")  # aliases are words ("cat2", "+1" and the like are left out)


def _parse_test_file(path: Path) -> list[tuple[str, str, str, str]]:
    """(chars, CLDR name, group, subgroup) of every fully-qualified emoji without a skin tone."""
    rows, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            points = codes.split()
            if status.strip() != "fully-qualified" or SKIN_TONES & set(points):
                continue
            # comment: " 😀 E1.0 grinning face"
            name = comment.strip().split(" ", 2)[2]
            rows.append(("".join(chr(int(p, 16)) for p in points), name, group, subgroup))
    return rows


def _aliases(char: str) -> list[str]:
    try:
        import emoji as emoji_lib
    except ImportError:  # the aliases are optional: the names alone make the data set
        return []
    data = emoji_lib.EMOJI_DATA.get(char, {})
    names = [data.get("en", "")] + list(data.get("alias", []))
    return [" ".join(n.strip(":").replace("_", " ").lower().split()) for n in names if n]


@cache
def catalogue() -> tuple[Emoji, ...]:
    """Every emoji the font draws as one picture, in Unicode's order, with its names.

    An alias is kept only when it is made of words, is nobody's name and belongs to one emoji alone, so
    that every caption names exactly one picture ("cat" is U+1F408's name; the alias "cat" of the cat face
    is dropped).
    """
    rows = [r for r in _parse_test_file(test_file_path()) if _draws_as_one(r[0])]
    names = [caption_name(r[1]) for r in rows]
    taken = set(names)
    if len(taken) != len(names):
        raise RuntimeError("two emoji share a name in emoji-test.txt")  # pragma: no cover
    candidates = [
        [a for a in dict.fromkeys(_aliases(r[0])) if a and a != n] for r, n in zip(rows, names, strict=True)
    ]
    counts: dict[str, int] = {}
    for cands in candidates:
        for a in cands:
            counts[a] = counts.get(a, 0) + 1
    out = []
    for i, (row, name, cands) in enumerate(zip(rows, names, candidates, strict=True)):
        aliases = tuple(a for a in cands if a not in taken and counts[a] == 1 and _WORDS.fullmatch(a))
        out.append(Emoji(i, row[0], name, row[2], row[3], aliases))
    return tuple(out)


def by_name() -> dict[str, Emoji]:
    """Every name and alias -> its emoji."""
    return {n: e for e in catalogue() for n in e.names}


@cache
def _font():
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path()), FONT_SIZE)


def _raw_glyph(char: str):
    from PIL import Image, ImageDraw

    font = _font()
    left, top, right, bottom = font.getbbox(char)
    im = Image.new("RGBA", (max(right, 1) + 8, max(bottom, 1) + 8), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((0, 0), char, font=font, embedded_color=True)
    return im


def _draws_as_one(char: str) -> bool:
    """Whether the font draws these characters as one colour picture (not several, not a blank box)."""
    box = _raw_glyph(char).getbbox()
    return box is not None and box[2] - box[0] <= 140


@cache
def glyph(index: int) -> Image.Image:
    """The emoji's picture, RGBA, cropped to its visible pixels (about 128 px on the longer side)."""
    im = _raw_glyph(catalogue()[index].char)
    return im.crop(im.getbbox())


@dataclass(frozen=True)
class Sample:
    """One image's recipe: which emoji, where, how large, on what, and its caption."""

    emoji: int
    template: str
    alias: int  # 0: the Unicode name, k: the k-th alias
    background: str
    show_background: bool
    extent: float  # longer side / image side
    x: float  # centre, as a share of the side
    y: float

    @property
    def name(self) -> str:
        return catalogue()[self.emoji].names[self.alias]

    def to_dict(self) -> dict:
        return asdict(self)


def article(name: str) -> str:
    return "an" if name[:1] in "aeiou" else "a"


def phrase(name: str, template: str = "{a} {name}", background: str | None = None) -> str:
    """A caption: ``template`` filled with ``name``, then " on a BG background" when one is given."""
    text = template.format(a=article(name), name=name)
    if background is not None:
        text += f" on {article(background)} {background} background"
    return text


def caption(sample: Sample) -> str:
    return phrase(sample.name, sample.template, sample.background if sample.show_background else None)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def sample_at(index: int, *, seed: int = 0, split: str = "train", emoji: int | None = None) -> Sample:
    """The ``index``-th sample of a split; the same on every machine for the same arguments.

    Sample i shows emoji ``i % len(catalogue())`` (every emoji equally often, in Unicode's order), unless
    ``emoji`` picks one. Its phrasing, name or alias, background and placement are drawn from
    ``random.Random("emoji/SEED/SPLIT/INDEX")``.
    """
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    n = len(catalogue())
    e = index % n if emoji is None else emoji
    if not 0 <= e < n:
        raise ValueError(f"emoji must be an index in [0, {n}), got {e}")
    rng = random.Random(f"emoji/{seed}/{split}/{index}" + ("" if emoji is None else f"/{emoji}"))
    template = rng.choice(TEMPLATES[split])
    alias = rng.randrange(len(catalogue()[e].names))
    show = rng.random() < STATED_BACKGROUND_SHARE
    background = rng.choice(tuple(BACKGROUNDS)) if show else DEFAULT_BACKGROUND
    extent = rng.uniform(*EXTENT)
    x, y = (0.5 + rng.uniform(-SHIFT, SHIFT) for _ in range(2))
    return Sample(e, template, alias, background, show, round(extent, 4), round(x, 4), round(y, 4))


def render(sample: Sample, size: int = 64) -> np.ndarray:
    """The sample as uint8 RGB [size, size, 3]: the glyph resized (Lanczos) and alpha-composited."""
    from PIL import Image

    g = glyph(sample.emoji)
    scale = sample.extent * size / max(g.size)
    w, h = max(1, round(g.width * scale)), max(1, round(g.height * scale))
    small = g.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (*BACKGROUNDS[sample.background], 255))
    canvas.alpha_composite(small, (round(sample.x * size - w / 2), round(sample.y * size - h / 2)))
    return np.asarray(canvas.convert("RGB"))


def render_pil(sample: Sample, size: int = 64) -> Image.Image:
    from PIL import Image

    return Image.fromarray(render(sample, size))


def samples(n: int, *, seed: int = 0, split: str = "train", start: int = 0) -> list[Sample]:
    return [sample_at(i, seed=seed, split=split) for i in range(start, start + n)]


def write_dataset(folder: str | Path, n: int, *, seed: int = 0, split: str = "train", size: int = 64) -> Path:
    """Write ``n`` samples as a Hugging Face imagefolder: PNGs and ``metadata.jsonl`` (``file_name``,
    ``text``, and ``sample``, the attributes), plus the pictures' licence in ``LICENSE.txt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(samples(n, seed=seed, split=split)):
        name = f"{i:06d}.png"
        render_pil(s, size).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": caption(s), "sample": s.to_dict()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "LICENSE.txt").write_text(LICENSE + "\n")
    return folder
