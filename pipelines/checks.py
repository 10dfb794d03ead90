"""Argument checks for ``TextToImagePipeline.__call__``.

Every bad input is a ValueError that says how to fix it, raised before any model runs (diffusers runs
steps=0 or negative guidance silently)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmdit_flow.pipelines.text import PromptEmbeds, check_max_sequence_length

SAMPLERS = ("euler", "midpoint", "heun", "rk4")
OUTPUTS = ("pil", "np", "pt", "latent")


@dataclass
class GivenEmbeds:
    """Precomputed embeddings passed instead of prompts (each None when not given)."""

    cond: PromptEmbeds | None = None
    uncond: PromptEmbeds | None = None

    @staticmethod
    def from_tensors(txt, vec, neg_txt, neg_vec) -> GivenEmbeds:
        return GivenEmbeds(_pair(txt, vec, ""), _pair(neg_txt, neg_vec, "negative_"))


def _pair(txt, vec, prefix: str) -> PromptEmbeds | None:
    if txt is None and vec is None:
        return None
    if txt is None or vec is None:
        raise ValueError(
            f"pass {prefix}prompt_embeds [B, L, D] and {prefix}pooled_prompt_embeds [B, P] together "
            "(both from pipe.encode_prompt), or neither"
        )
    if txt.ndim != 3 or vec.ndim != 2 or txt.shape[0] != vec.shape[0]:
        raise ValueError(
            f"{prefix}prompt_embeds must be [B, L, D] and {prefix}pooled_prompt_embeds [B, P] with the same "
            f"B; got {tuple(txt.shape)} and {tuple(vec.shape)}"
        )
    return PromptEmbeds(txt, vec)


@dataclass
class CallArgs:
    """The checked and normalised arguments of a call."""

    prompts: list[str]  # empty when embeddings were given
    negatives: list[str]  # one per prompt; empty when there is no guidance
    batch: int  # number of prompts
    guided: bool  # classifier-free guidance (two forwards batched into one)
    cfg_scale: float
    guidance: float | None  # Flux dev's distilled guidance
    generators: list[torch.Generator] | None
    given: GivenEmbeds


def _prompt_list(prompt, name: str, allow_empty: bool) -> list[str]:
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ValueError(
            f"{name} must be a str or a list of str, got {type(prompt).__name__}: {prompt!r:.80}"
        )
    if not items:
        raise ValueError(f"{name} is an empty list; pass at least one prompt")
    if not allow_empty and any(not p.strip() for p in items):
        raise ValueError(
            f"{name} contains an empty prompt; write a prompt, or for unconditional samples pass "
            "prompt_embeds / pooled_prompt_embeds from pipe.encode_prompt('')"
        )
    return list(items)


def _check_number(value, name: str, low: float, hint: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
    ):
        raise ValueError(f"{name} must be a number >= {low:g}, got {value!r}; {hint}")
    return float(value)


def _check_size(height, width, multiple: int) -> None:
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < multiple or size % multiple:
            lower = max(multiple, size - size % multiple) if isinstance(size, int) else multiple
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} (VAE scale x patch size), got {size!r}; "
                f"use {lower} or {lower + multiple}"
            )


def _generators(seed, generator, n: int) -> list[torch.Generator] | None:
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        seeds = [seed] if isinstance(seed, int) and not isinstance(seed, bool) else seed
        if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
        generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if generator is None:
        return None
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError("generator must be a torch.Generator or a list of them")
    if len(gens) not in (1, n):
        what = "seeds" if seed is not None else "generators"
        raise ValueError(
            f"got {len(gens)} {what} for {n} images (prompts x num_images); pass one, or exactly {n}"
        )
    if any(g.device.type != "cpu" for g in gens):
        raise ValueError(
            "pass CPU generators (torch.Generator('cpu')): noise is drawn on the CPU as diffusers does"
        )
    return gens


def check_call(
    *,
    family: str,
    prompt,
    negative_prompt,
    steps,
    guidance,
    guidance_given: bool,
    guidance_embeds: bool,
    true_cfg_scale,
    height,
    width,
    multiple: int,
    num_images,
    sampler,
    output,
    seed,
    generator,
    given: GivenEmbeds,
    max_sequence_length,
    limit: int,
) -> CallArgs:
    """Check every argument of a call; return them normalised."""
    if prompt is not None and given.cond is not None:
        raise ValueError("pass prompt or prompt_embeds (with pooled_prompt_embeds), not both")
    if prompt is None and given.cond is None:
        raise ValueError(
            "pass a prompt, e.g. pipe('a photo of a cat'), or prompt_embeds + pooled_prompt_embeds"
        )
    if negative_prompt is not None and given.uncond is not None:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    prompts = _prompt_list(prompt, "prompt", allow_empty=False) if prompt is not None else []
    batch = len(prompts) if prompts else given.cond.txt.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}; 28 is a good default")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    guidance = _check_number(guidance, "guidance", 0.0, "use 1 for no guidance (SD3: 5-7, Flux dev: 3.5)")
    true_cfg_scale = _check_number(true_cfg_scale, "true_cfg_scale", 0.0, "use 1 to turn true CFG off")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    _check_size(height, width, multiple)
    if max_sequence_length is not None:
        check_max_sequence_length(max_sequence_length, limit)

    if family == "sd3":
        if true_cfg_scale != 1.0:
            raise ValueError("true_cfg_scale is for Flux; for SD3 set the CFG scale with guidance")
        guided, cfg_scale, flux_guidance = guidance > 1.0, guidance, None
    else:
        if guidance_given and not guidance_embeds:
            raise ValueError(
                "this Flux model has no guidance embedding (schnell-like), so guidance does nothing; leave "
                "it unset, or pass negative_prompt with true_cfg_scale > 1 for classifier-free guidance"
            )
        has_negative = negative_prompt is not None or given.uncond is not None
        guided, cfg_scale, flux_guidance = true_cfg_scale > 1.0 and has_negative, true_cfg_scale, guidance

    negatives: list[str] = []
    if guided and given.uncond is None:
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negatives = _prompt_list(negative_prompt, "negative_prompt", allow_empty=True)
        if isinstance(negative_prompt, str):
            negatives = negatives * batch
        elif len(negatives) != batch:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries for {batch} prompts; pass one str for all, or "
                f"a list of {batch}"
            )
    if guided and given.uncond is not None and given.cond is not None:
        if given.uncond.txt.shape != given.cond.txt.shape or given.uncond.vec.shape != given.cond.vec.shape:
            raise ValueError(
                "negative_prompt_embeds must have the shape of prompt_embeds: "
                f"{tuple(given.uncond.txt.shape)} vs {tuple(given.cond.txt.shape)}"
            )
    if guided and given.uncond is not None and given.uncond.txt.shape[0] != batch:
        raise ValueError(f"negative_prompt_embeds has batch {given.uncond.txt.shape[0]}, the prompts {batch}")
    generators = _generators(seed, generator, batch * num_images)
    return CallArgs(prompts, negatives, batch, guided, cfg_scale, flux_guidance, generators, given)


def check_latents(latents, expected: tuple[int, ...]) -> None:
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"latents must be a tensor of shape {expected} (images, latent channels, height / VAE scale, "
            f"width / VAE scale) for these arguments, got {got}"
        )
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor, got {latents.dtype}")
