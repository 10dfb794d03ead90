"""The 300 most common object and animal emoji: the list the tiny-emoji model's headline target is scored on.

"Object and animal" is Unicode's groups Animals & Nature, Food & Drink, Travel & Places, Activities and
Objects (849 emoji); "most common" ranks them by how often their name occurs in English
(``wordfreq.zipf_frequency(name, "en")``, wordfreq 3.1), ties in Unicode's order. The list was fixed before
any training and is committed as ``common300.txt`` (one ``char<TAB>name`` per line);
:func:`common_emoji` rebuilds it, and a test checks the two agree.
"""

from __future__ import annotations

from pathlib import Path

from mmdit_flow.training.recipes.tiny_emoji import emoji_set as E

COMMON_FILE = Path(__file__).with_name("common300.txt")
COMMON_CATEGORIES = ("animals", "food", "travel", "activities", "objects")


def common_emoji(n: int = 300) -> list[E.Emoji]:
    """The ``n`` object and animal emoji whose names are most frequent in English (needs ``wordfreq``)."""
    try:
        from wordfreq import zipf_frequency
    except ImportError as err:
        raise ImportError("ranking emoji by commonness needs wordfreq: pip install wordfreq") from err
    pool = [e for e in E.catalogue() if e.category in COMMON_CATEGORIES]
    return sorted(pool, key=lambda e: (-zipf_frequency(e.name, "en"), e.index))[:n]


def committed_common() -> list[E.Emoji]:
    """The committed list, as emoji of the catalogue (raises if a line names no emoji)."""
    names = E.by_name()
    out = []
    for line in COMMON_FILE.read_text(encoding="utf-8").splitlines():
        char, name = line.split("\t")
        if name not in names or names[name].char != char:
            raise ValueError(f"{COMMON_FILE}: {line!r} is not an emoji of this catalogue")
        out.append(names[name])
    return out


def write_common(path: Path = COMMON_FILE, n: int = 300) -> Path:
    path.write_text("".join(f"{e.char}\t{e.name}\n" for e in common_emoji(n)), encoding="utf-8")
    return path
