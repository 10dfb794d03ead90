"""Prompt encoding equals diffusers' encode_prompt (SD3 with and without T5, Flux), and over-long prompts give
one truncation warning per encoder that names exactly the dropped words."""

from __future__ import annotations

import string
import warnings

import pytest
import torch
from components import diffusers_pipeline, flux_components, sd3_components

from mmdit_flow.pipelines.text import (
    ClipEncoder,
    FluxTextEncoder,
    SD3TextEncoder,
    T5Encoder,
)

PROMPTS = ["a photo of the cat", "red dog on a blue mat, 3 times!"]


def _sd3_text(c) -> SD3TextEncoder:
    t5 = T5Encoder(c["tokenizer_3"], c["text_encoder_3"]) if c["text_encoder_3"] is not None else None
    return SD3TextEncoder(
        ClipEncoder(c["tokenizer"], c["text_encoder"], "CLIP-L"),
        ClipEncoder(c["tokenizer_2"], c["text_encoder_2"], "CLIP-G"),
        t5,
        t5_width=c["transformer"].config.joint_attention_dim,
    )


def _flux_text(c) -> FluxTextEncoder:
    return FluxTextEncoder(
        ClipEncoder(c["tokenizer"], c["text_encoder"], "CLIP-L"),
        T5Encoder(c["tokenizer_2"], c["text_encoder_2"]),
    )


@pytest.fixture(scope="module")
def sd3():
    return sd3_components()


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_equals_diffusers(t5):
    c = sd3_components(t5=t5)
    ref = diffusers_pipeline(c)
    with torch.no_grad():
        txt, neg_txt, vec, neg_vec = ref.encode_prompt(
            PROMPTS, None, None, device="cpu", negative_prompt=["", "bad"], max_sequence_length=20
        )
    ours = _sd3_text(c).encode([*PROMPTS, "", "bad"], 20)
    assert ours.txt.shape == (4, 77 + 20, 48) and ours.vec.shape == (4, 24)
    torch.testing.assert_close(ours.txt, torch.cat([txt, neg_txt]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.vec, torch.cat([vec, neg_vec]), atol=1e-5, rtol=1e-5)
    assert ours.txt[:, :77, 40:].abs().max() == 0  # CLIP-L (16) + CLIP-G (24) zero-padded to 48
    if not t5:
        assert ours.txt[:, 77:].abs().max() == 0


def test_flux_equals_diffusers():
    c = flux_components()
    ref = diffusers_pipeline(c)
    with torch.no_grad():
        txt, vec, _ = ref.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=24)
    ours = _flux_text(c).encode(PROMPTS, 24)
    torch.testing.assert_close(ours.txt, txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.vec, vec, atol=1e-5, rtol=1e-5)


def test_batch_does_not_change_a_prompt(sd3):
    text = _sd3_text(sd3)
    both = text.encode(PROMPTS, 24)
    one = text.encode(PROMPTS[1:], 24)
    torch.testing.assert_close(both.txt[1:], one.txt, atol=1e-6, rtol=1e-6)


def _letters(n: int) -> list[str]:
    """n one-token words (single letters are one token in both test vocabularies)."""
    return [string.ascii_lowercase[i % 26] for i in range(n)]


def test_truncation_warns_once_per_encoder_naming_the_dropped_words(sd3):
    words = _letters(100)
    long_prompt = " ".join(words)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sd3_text(sd3).encode([long_prompt, "a cat", long_prompt[:50]], max_sequence_length=16)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 3, messages  # CLIP-L, CLIP-G, T5: one each for the whole batch
    clip_dropped = " ".join(words[75:])  # CLIP keeps <start> + 75 tokens + <end>
    t5_dropped_long = " ".join(words[15:])  # T5 keeps 15 tokens + </s>
    t5_dropped_short = " ".join(long_prompt[:50].split()[15:])
    assert messages[0].startswith("CLIP-L") and repr(clip_dropped) in messages[0]
    assert messages[1].startswith("CLIP-G") and repr(clip_dropped) in messages[1]
    assert messages[2].startswith("T5")
    assert f"{t5_dropped_long!r}; {t5_dropped_short!r}." in messages[2]
    # diffusers slices the T5 ids at CLIP's length (77), so it would name words[76:] instead of words[15:]
    assert repr(" ".join(words[76:])) not in messages[2]


def test_no_warning_when_it_fits(sd3):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sd3_text(sd3).encode([" ".join(_letters(15)), " ".join(_letters(75))], max_sequence_length=76)


def test_max_sequence_length_limit(sd3):
    text = _sd3_text(sd3)
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 512\]"):
        text.encode(["a cat"], 513)
    with pytest.raises(ValueError, match="max_sequence_length"):
        text.encode(["a cat"], 0)


def test_short_tokenizer_lengths_set_the_prompt_layout_and_default():
    """A model trained on short prompts records the length in its tokenizers (the shipped tiny-shapes
    model: 32): CLIP pads to it, as diffusers does, and max_sequence_length defaults to it."""
    c = sd3_components()
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        c[name].model_max_length = 12
    ref = diffusers_pipeline(c)
    with torch.no_grad():
        txt, _, vec, _ = ref.encode_prompt(PROMPTS, None, None, device="cpu", max_sequence_length=12)
    text = _sd3_text(c)
    ours = text.encode(PROMPTS)  # no max_sequence_length: the T5 tokenizer's 12, not 256
    assert ours.txt.shape == (2, 12 + 12, 48)
    torch.testing.assert_close(ours.txt, txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.vec, vec, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 12\]"):
        text.encode(PROMPTS, 256)
    flux = flux_components()
    flux["tokenizer_2"].model_max_length = 10
    assert _flux_text(flux).encode(PROMPTS).txt.shape[1] == 10
