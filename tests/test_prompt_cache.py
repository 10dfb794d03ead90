"""The pipeline's text-embedding cache: a repeated prompt is encoded once, with the same numbers, and a change
of the encoders' weights, the length or the prompts encodes again."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def pipe(monkeypatch):
    from mmdit_flow.pipelines import TextToImagePipeline

    p = TextToImagePipeline.from_pretrained(device="cpu", dtype=torch.float32)
    calls = []
    encode = p.text.encode

    def counted(prompts, max_sequence_length=None):
        calls.append(list(prompts))
        return encode(prompts, max_sequence_length)

    monkeypatch.setattr(p.text, "encode", counted)
    p.calls = calls
    return p


PROMPT = "a large red circle on the left"


def test_a_seeds_loop_encodes_once_and_draws_the_same_images(pipe):
    images = [pipe(PROMPT, seed=s, steps=2, output="latent", progress=False) for s in range(3)]
    assert pipe.calls == [[PROMPT, ""]]  # prompt and negative in one batch, once
    pipe._prompt_cache.clear()
    for s in range(3):
        assert torch.equal(pipe(PROMPT, seed=s, steps=2, output="latent", progress=False), images[s])
    assert len(pipe.calls) == 2  # cleared: encoded again, once


def test_weights_length_and_prompts_are_part_of_the_key(pipe):
    first = pipe.encode_prompt([PROMPT])
    kept = first.txt.clone()
    first.txt.add_(1.0)  # the caller's copy: the cache keeps its own
    assert torch.equal(pipe.encode_prompt([PROMPT]).txt, kept)
    assert len(pipe.calls) == 1
    pipe.encode_prompt([PROMPT], max_sequence_length=16)
    pipe.encode_prompt([PROMPT, "a blue square"])
    assert len(pipe.calls) == 3
    t5 = pipe.components.text_encoders["text_encoder_3"]
    with torch.no_grad():
        next(t5.parameters()).mul_(1.5)  # as a merged LoRA would: in place
    changed = pipe.encode_prompt([PROMPT])
    assert len(pipe.calls) == 4 and not torch.equal(changed.txt, kept)


def test_the_cache_keeps_the_last_calls_only(pipe):
    from mmdit_flow.pipelines.pipeline import PROMPT_CACHE

    prompts = [f"a {c} circle" for c in ("red", "orange", "yellow", "green", "cyan", "blue", "purple")]
    prompts += [f"a {c} square" for c in ("red", "orange")]
    for p in prompts[: PROMPT_CACHE + 1]:
        pipe.encode_prompt(p)
    pipe.encode_prompt(prompts[PROMPT_CACHE])  # the newest: kept
    assert len(pipe.calls) == PROMPT_CACHE + 1
    pipe.encode_prompt(prompts[0])  # the oldest: dropped
    assert len(pipe.calls) == PROMPT_CACHE + 2
