"""Tokenizers trained on the captioned-shapes corpus, saved in the formats real checkpoints use.

* CLIP: a byte-level BPE vocabulary (``vocab.json`` + ``merges.txt``) that ``CLIPTokenizer`` loads. The
  vocabulary holds all 256 byte characters and their end-of-word forms ``c</w>`` (so no text is ever
  unknown), the merges learnt here, then ``<|startoftext|>`` and ``<|endoftext|>``, in the order of the
  original CLIP vocabulary.
* T5: a sentencepiece unigram model (``spiece.model``) that ``T5TokenizerFast`` loads, with T5's ids
  ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2. Its pieces are the ones sentencepiece learns from the corpus,
  every corpus word as a whole piece ``▁word`` with its unigram log-frequency as score, and every printable
  ASCII character as a low-scoring fallback, so that any ASCII prompt encodes without ``<unk>``.

The BPE merges are learnt by the classic algorithm (Sennrich et al. 2016): count words, split each into
symbols, then repeatedly merge the most frequent adjacent pair (ties broken by the pair's text, so the
result is deterministic) until every word is one symbol or ``num_merges`` is reached.

Quick use, for tests and the demo model (well under a second)::

    folders = save_tokenizers(tmp_path)          # SD3 layout: tokenizer/, tokenizer_2/, tokenizer_3/
    CLIPTokenizer.from_pretrained(folders.clip_l); T5TokenizerFast.from_pretrained(folders.t5)
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmdit_flow.training.recipes.tiny_shapes import shapes

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77  # model_max_length of the CLIP tokenizers in SD3 / Flux checkpoints
T5_MAX_LENGTH = 512  # model_max_length of the T5 tokenizer in SD3 / Flux checkpoints
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer, restricted to what Python's re can say: contractions, letter runs, single digits,
# runs of other symbols (the real one uses \p{L} and \p{N}; on ASCII captions the two agree).
_CLIP_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")
_PRINTABLE = string.ascii_letters + string.digits + string.punctuation


def caption_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` generator captions (all splits: the held-out split has no new words) plus one line with
    every word of the grammar, so that the vocabulary is complete even for small ``n``."""
    texts = [shapes.caption(s) for s in shapes.sample_scenes(n, seed=seed, split="all")]
    return texts + [" ".join(shapes.caption_vocabulary())]


# ----------------------------------------------------------------------------------------------- CLIP BPE


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of GPT-2 and CLIP: printable bytes map to themselves, the other bytes to
    unused code points from 256 up, so every byte string is a string of visible characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clip_words(texts: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Word counts as symbol tuples: byte characters, the last one with ``</w>``."""
    alphabet = bytes_to_unicode()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_CLIP_WORDS.findall(" ".join(text.lower().split())))
    words: Counter[tuple[str, ...]] = Counter()
    for word, n in counts.items():
        chars = [alphabet[b] for b in word.encode("utf-8")]
        words[tuple(chars[:-1]) + (chars[-1] + END_OF_WORD,)] += n
    return words


def train_bpe_merges(texts: Iterable[str], num_merges: int | None = None) -> list[tuple[str, str]]:
    """Learn BPE merges on CLIP-style words: repeatedly merge the most frequent adjacent symbol pair.

    Stops when every word is a single symbol or after ``num_merges`` merges (None: no limit).
    """
    words = _clip_words(texts)
    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word[:-1], word[1:], strict=True):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent; ties by text: deterministic
        merges.append(best)
        words = Counter({_merge(word, best): n for word, n in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: 256 bytes, 256 ``byte</w>``, one entry per merge, then BOS and EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab


def save_clip_tokenizer(
    folder: str | Path,
    texts: Iterable[str] | None = None,
    *,
    num_merges: int | None = None,
    pad_token: str = CLIP_EOS,
    model_max_length: int = CLIP_MAX_LENGTH,
) -> Path:
    """Train BPE merges on ``texts`` (default :func:`caption_corpus`) and save a CLIPTokenizer folder.

    ``pad_token``: ``<|endoftext|>`` as in CLIP-L; SD3's second CLIP (CLIP-G) pads with ``"!"``.
    """
    from transformers import CLIPTokenizer

    merges = train_bpe_merges(caption_corpus() if texts is None else texts, num_merges)
    vocab = clip_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(
            f"pad_token {pad_token!r} is not in the vocabulary; use {CLIP_EOS!r} or one character"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)
    tok.save_pretrained(folder)  # adds tokenizer.json and tokenizer_config.json beside vocab / merges
    return folder


# ------------------------------------------------------------------------------------------ T5 sentencepiece


def train_sentencepiece(texts: Sequence[str], *, vocab_size: int = 256) -> bytes:
    """A serialized sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    sentencepiece learns up to ``vocab_size`` pieces; then every corpus word is added as a whole piece
    ``▁word`` with score log(count / total words) where sentencepiece split it, and every printable ASCII
    character as a fallback piece scored below all others.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buf = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
            num_threads=1, logstream=quiet,
        )  # fmt: skip
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(buf.getvalue())
    have = {p.piece for p in model.pieces}
    counts = Counter(w for t in texts for w in t.split())
    total = sum(counts.values())
    extra = [("▁" + w, math.log(n / total)) for w, n in sorted(counts.items()) if "▁" + w not in have]
    floor = min([p.score for p in model.pieces] + [s for _, s in extra]) - 1.0
    extra += [(c, floor) for c in _PRINTABLE if c not in have]
    for piece, score in extra:
        p = model.pieces.add()
        p.piece, p.score, p.type = piece, score, sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    # Keep sentencepiece's order: special pieces first, then by decreasing score.
    special, normal = model.pieces[:3], sorted(model.pieces[3:], key=lambda p: -p.score)
    ordered = [type(special[0])(piece=p.piece, score=p.score, type=p.type) for p in [*special, *normal]]
    del model.pieces[:]
    model.pieces.extend(ordered)
    return model.SerializeToString()


def save_t5_tokenizer(
    folder: str | Path,
    texts: Sequence[str] | None = None,
    *,
    vocab_size: int = 256,
    extra_ids: int = 0,
    model_max_length: int = T5_MAX_LENGTH,
) -> Path:
    """Train a sentencepiece model on ``texts`` (default :func:`caption_corpus`) and save a T5 tokenizer
    folder: ``spiece.model`` plus what ``T5TokenizerFast.save_pretrained`` writes.

    ``extra_ids``: number of ``<extra_id_i>`` sentinel tokens appended (real T5 checkpoints have 100).
    """
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(
        train_sentencepiece(caption_corpus() if texts is None else list(texts), vocab_size=vocab_size)
    )
    tok = T5TokenizerFast.from_pretrained(folder, extra_ids=extra_ids, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- all three


@dataclass(frozen=True)
class TokenizerFolders:
    """Where :func:`save_tokenizers` put each tokenizer (the SD3 component names)."""

    clip_l: Path  # tokenizer/
    clip_g: Path  # tokenizer_2/ (pads with "!")
    t5: Path  # tokenizer_3/


def save_tokenizers(
    folder: str | Path,
    texts: Sequence[str] | None = None,
    *,
    clip_length: int = CLIP_MAX_LENGTH,
    t5_length: int = T5_MAX_LENGTH,
) -> TokenizerFolders:
    """Save SD3's three tokenizers, trained on ``texts`` (default :func:`caption_corpus`), into
    ``folder/tokenizer``, ``folder/tokenizer_2`` and ``folder/tokenizer_3``.

    ``clip_length`` / ``t5_length``: their ``model_max_length``, the number of tokens the pipelines pad the
    prompt to (CLIP) and the longest T5 sequence they accept (and default to, when below the pipeline's).
    """
    folder = Path(folder)
    texts = caption_corpus() if texts is None else list(texts)
    return TokenizerFolders(
        clip_l=save_clip_tokenizer(folder / "tokenizer", texts, model_max_length=clip_length),
        clip_g=save_clip_tokenizer(
            folder / "tokenizer_2", texts, pad_token="!", model_max_length=clip_length
        ),
        t5=save_t5_tokenizer(folder / "tokenizer_3", texts, model_max_length=t5_length),
    )
