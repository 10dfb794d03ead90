"""Argument checks for ``TextToImagePipeline.__call__``.

Every bad input is a ValueError that says how to fix it, raised before any model runs (diffusers runs
steps=0 or negative guidance silently): integers are ints (not bools or floats) in range, numbers finite,
sizes multiples of the latent patch in pixels, seeds in [0, 2**64), tensors floating-point, finite and with
values (not on the meta device). An unknown keyword is a TypeError naming the nearest argument."""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from mmdit_flow.pipelines.text import PromptEmbeds, check_max_sequence_length
from mmdit_flow.pipelines.vae import NonFiniteLatentsError, rows_with
from mmdit_flow.sampling import MAX_STEPS
from mmdit_flow.sampling import METHODS as SAMPLERS

OUTPUTS = ("pil", "np", "pt", "latent")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)
# diffusers' argument names -> ours (same meaning and values)
DIFFUSERS_NAMES = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "num_images_per_prompt": "num_images",
    "output_type": "output",
}
# diffusers' arguments we do not take, and what to do instead
DIFFUSERS_OTHERS = {
    "callback_on_step_end": "pass callback(i, t, latents), called after each step",
    "callback_on_step_end_tensor_inputs": "callback(i, t, latents) receives the latents",
    "return_dict": "the call returns the images themselves (no .images)",
    "timesteps": "the time grid comes from the scheduler config; choose steps",
    "sigmas": "the time grid comes from the scheduler config; choose steps",
    "joint_attention_kwargs": "LoRA scales are set by pipe.load_lora(path, scale=...)",
    "masked_image_latents": "pass image and mask_image; the kept region comes from the image",
    "padding_mask_crop": "crop the image and the mask to the region yourself, then paste the result back",
}


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
    for name, t in ((f"{prefix}prompt_embeds", txt), (f"{prefix}pooled_prompt_embeds", vec)):
        _check_tensor(t, name, "from pipe.encode_prompt")
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
    steps: int
    num_images: int
    height: int  # pixels
    width: int


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
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < low
    ):
        raise ValueError(f"{name} must be a number >= {low:g}, got {value!r}; {hint}")
    return float(value)


def _check_int(value, name: str, low: int, high: int | None = None, hint: str = "") -> int:
    """An integer (a Python or numpy int, not a bool) in [low, high]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high and value > high)
    ):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}" + (f"; {hint}" if hint else ""))
    return int(value)


def _check_size(height, width, multiple: int, largest: int | None) -> None:
    """Image sizes in pixels: integers, multiples of ``multiple``, at most ``largest``."""
    for name, size in (("height", height), ("width", width)):
        top = f" and at most {largest} px (the transformer's position table)" if largest else ""
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise ValueError(
                f"{name} must be an integer number of pixels, a multiple of {multiple}{top}; got {size!r}"
            )
        if size < multiple or size % multiple:
            lower = max(multiple, size - size % multiple)
            options = f"{lower} or {lower + multiple}" if size > multiple else f"{multiple}"
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} px (VAE scale x patch size){top}, got "
                f"{size} px; use {options}"
            )
        if largest and size > largest:
            raise ValueError(
                f"{name} is {size} px, but this transformer's position table covers at most {largest} px; "
                f"use {largest} or less"
            )


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            "seed must be an integer in [0, 2**64 - 1] (what torch.Generator.manual_seed takes), or a list "
            f"of them; got {seed!r}"
        )
    return int(seed)


def _generators(seed, generator, n: int) -> list[torch.Generator] | None:
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if not seeds:
            raise ValueError("seed is an empty list; pass an int, or one seed per image")
        generator = [torch.Generator("cpu").manual_seed(_check_seed(s)) for s in seeds]
    if generator is None:
        return None
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {generator!r:.80}")
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
    largest: int | None,
    num_images,
    sampler,
    output,
    seed,
    generator,
    given: GivenEmbeds,
    embed_dims: tuple[int, int],
    max_sequence_length,
    limit: int,
    progress,
    callback,
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
    if given.cond is not None:
        _check_embed_width(given, embed_dims)
    steps = _check_int(steps, "steps", 1, MAX_STEPS, "28 is a good default")
    num_images = _check_int(num_images, "num_images", 1)
    guidance = _check_number(guidance, "guidance", 0.0, "use 1 for no guidance (SD3: 5-7, Flux dev: 3.5)")
    true_cfg_scale = _check_number(true_cfg_scale, "true_cfg_scale", 0.0, "use 1 to turn true CFG off")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not isinstance(output, str) or output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    _check_size(height, width, multiple, largest)
    if max_sequence_length is not None:
        check_max_sequence_length(max_sequence_length, limit)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be a function callback(i, t, latents) or None, got {callback!r:.80}")

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
    return CallArgs(
        prompts,
        negatives,
        batch,
        guided,
        cfg_scale,
        flux_guidance,
        generators,
        given,
        steps,
        num_images,
        int(height),
        int(width),
    )


class NonFiniteInputLatentsError(ValueError, NonFiniteLatentsError):
    """Starting ``latents`` with NaN or inf: a bad argument, caught as either error class."""


def _check_tensor(t, name: str, where: str, finite: bool = True) -> None:
    """A floating-point tensor with values (not on the meta device), all finite."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor ({where}), got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without values); pass a tensor with values")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} holds NaN or inf ({int((~torch.isfinite(t)).sum())} values); pass finite values"
        )


def _check_embed_width(given: GivenEmbeds, dims: tuple[int, int]) -> None:
    for prefix, e in (("", given.cond), ("negative_", given.uncond)):
        if e is not None and (e.txt.shape[2], e.vec.shape[1]) != dims:
            raise ValueError(
                f"{prefix}prompt_embeds [B, L, {e.txt.shape[2]}] / {prefix}pooled_prompt_embeds [B, "
                f"{e.vec.shape[1]}] do not fit this transformer, which takes [B, L, {dims[0]}] / "
                f"[B, {dims[1]}]; make them with this pipeline's encode_prompt"
            )


def check_latents(latents, expected: tuple[int, ...]) -> None:
    """Starting latents: a finite floating-point tensor of the shape the call makes, with values."""
    _check_tensor(latents, "latents", f"of shape {expected}", finite=False)
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"latents must be a tensor of shape {expected} (images, latent channels, height / VAE scale, "
            f"width / VAE scale) for these arguments, got {tuple(latents.shape)}"
        )
    bad = ~torch.isfinite(latents)
    if bad.any():
        raise NonFiniteInputLatentsError(
            f"latents of image(s) {rows_with(bad)} hold NaN or inf ({int(bad.sum())} values); pass finite "
            "starting latents"
        )


def diffusers_names(extra: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Map diffusers' argument names in ``extra`` onto ``ours`` (our name -> value, None when unset).

    Giving both names of one argument is an error; an unknown name is a TypeError, as Python raises it,
    with the nearest of our names or what to do instead of a diffusers argument we do not take."""
    ours = dict(ours)
    for name, value in extra.items():
        if name in DIFFUSERS_NAMES:
            mine = DIFFUSERS_NAMES[name]
            if ours.get(mine) is not None:
                raise TypeError(f"pass {mine} or diffusers' name {name} for it, not both")
            ours[mine] = value
        elif name in DIFFUSERS_OTHERS:
            raise TypeError(f"this pipeline takes no {name}: {DIFFUSERS_OTHERS[name]}")
        else:
            close = difflib.get_close_matches(name, [*CALL_ARGUMENTS, *DIFFUSERS_NAMES], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise TypeError(
                f"TextToImagePipeline.__call__() got an unexpected keyword argument {name!r}{hint}"
            )
    return ours


# every keyword argument of TextToImagePipeline.__call__ (for the did-you-mean of diffusers_names)
CALL_ARGUMENTS = (
    "steps",
    "guidance",
    "negative_prompt",
    "height",
    "width",
    "seed",
    "generator",
    "num_images",
    "sampler",
    "latents",
    "output",
    "max_sequence_length",
    "progress",
    "callback",
    "true_cfg_scale",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "image",
    "mask_image",
    "strength",
)
