"""Tokenizers trained on the caption corpus: CLIP BPE and T5 sentencepiece, loaded by transformers."""

import string

import pytest

from mmdit_flow.training.recipes.tiny_shapes import shapes as S
from mmdit_flow.training.recipes.tiny_shapes import tokenizers as T


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return T.save_tokenizers(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def captions():
    scenes = S.sample_scenes(600, seed=11, split="all") + S.heldout_scenes(100, seed=11)
    forms = {(s.position, s.relation, s.phrasing, s.show_background) for s in scenes}
    assert len(forms) >= 5 * 2 + 4 * 2 * 2  # every grammar form is among them
    return [S.caption(s) for s in scenes]


def test_bpe_merges_closed_form():
    # (a, b</w>) x3 and (a, c</w>) x1: the frequent pair first.
    assert T.train_bpe_merges(["ab ab ab ac"]) == [("a", "b</w>"), ("a", "c</w>")]
    # A tie is broken by the pair's text; num_merges stops early.
    assert T.train_bpe_merges(["ac ab"]) == [("a", "b</w>"), ("a", "c</w>")]
    assert T.train_bpe_merges(["ab ab ab ac"], num_merges=1) == [("a", "b</w>")]
    # "aaa": pairs (a, a) x1 and (a, a</w>) x1 -> tie -> (a, a) < (a, a</w>); then (aa, a</w>).
    assert T.train_bpe_merges(["aaa"]) == [("a", "a"), ("aa", "a</w>")]


def test_byte_alphabet_is_a_bijection():
    table = T.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"  # space maps to chr(256 + 32)


def _reference_bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Textbook BPE encoding: repeatedly apply the lowest-ranked merge present in the word."""
    alphabet = T.bytes_to_unicode()
    symbols = [alphabet[b] for b in word.encode()]
    symbols[-1] += "</w>"
    rank = {m: i for i, m in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [
            (rank.get(p, len(rank)), i) for i, p in enumerate(zip(symbols[:-1], symbols[1:], strict=True))
        ]
        r, i = min(pairs)
        if r == len(rank):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def test_clip_tokenizer_matches_reference_bpe_and_has_clip_layout(folders):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folders.clip_l)
    merges = T.train_bpe_merges(T.caption_corpus())
    vocab = tok.get_vocab()
    assert vocab == T.clip_vocab(merges) and len(vocab) == 512 + len(merges) + 2
    assert (tok.bos_token_id, tok.eos_token_id) == (len(vocab) - 2, len(vocab) - 1)
    assert tok.model_max_length == T.CLIP_MAX_LENGTH
    for word in S.caption_vocabulary():  # every grammar word is one token
        assert tok.tokenize(word) == [word + "</w>"]
    for word in ["lowercase", "redder", "squares", "blueish", "zebra"]:  # unseen words: same as textbook BPE
        assert tok.tokenize(word) == _reference_bpe(word, merges), word


def test_clip_g_pads_with_bang(folders):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folders.clip_g)
    assert tok.pad_token == "!" and tok.pad_token_id == tok.get_vocab()["!"]
    ids = tok("a red circle", padding="max_length", max_length=10).input_ids
    assert ids[-1] == tok.pad_token_id and ids[0] == tok.bos_token_id


def test_clip_round_trip_without_unknown(folders, captions):
    from transformers import CLIPTokenizer

    for folder in (folders.clip_l, folders.clip_g):
        tok = CLIPTokenizer.from_pretrained(folder)
        for text in captions:
            ids = tok(text).input_ids
            # unk is <|endoftext|> in CLIP: it may appear only as the final EOS
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.unk_token_id not in ids[1:-1]
            assert len(ids) == len(text.split()) + 2  # one token per word
            assert tok.decode(ids, skip_special_tokens=True) == text
        mixed = "A Photo of 3 Cats, naïve?"  # not "!": CLIP-G pads with "!", and decode skips padding
        assert tok.decode(tok(mixed).input_ids, skip_special_tokens=True) == "a photo of 3 cats , naïve ?"


def test_t5_tokenizer_ids_and_sentencepiece_parity(folders, captions):
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(folders.t5)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == T.T5_MAX_LENGTH
    sp = spm.SentencePieceProcessor(model_file=str(folders.t5 / "spiece.model"))
    assert len(tok) == sp.get_piece_size()
    prompts = captions + ["A Photo of 3 Cats, on the LEFT!", string.printable.strip()]
    for text in prompts:
        ids = tok(text).input_ids
        assert ids == sp.encode(text) + [tok.eos_token_id]  # the fast tokenizer equals sentencepiece
        assert tok.unk_token_id not in ids
    for text in captions:
        ids = tok(text).input_ids
        assert len(ids) == len(text.split()) + 1  # one piece per word, then </s>
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_t5_extra_ids(tmp_path):
    from transformers import T5TokenizerFast

    base = T5TokenizerFast.from_pretrained(T.save_t5_tokenizer(tmp_path / "a", ["a red circle"]))
    with_extra = T5TokenizerFast.from_pretrained(
        T.save_t5_tokenizer(tmp_path / "b", ["a red circle"], extra_ids=100)
    )
    assert len(with_extra) == len(base) + 100
    assert with_extra.convert_tokens_to_ids("<extra_id_0>") >= len(base)


def test_bad_pad_token(tmp_path):
    with pytest.raises(ValueError, match="pad_token"):
        T.save_clip_tokenizer(tmp_path, ["a b"], pad_token="<pad>")
