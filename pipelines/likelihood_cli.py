"""``mmdit-flow likelihood``: exact log-likelihoods of latents (or of images' VAE latents) in bits/dim.

Latents come from a safetensors file (a tensor named ``latents`` [B, C, h, w], or its only tensor) or from
image files through the VAE posterior mean; one ``--prompt`` for all or one per latent. Prints one line per
latent (bits/dim, its standard error for the Hutchinson estimate, nats) and the cost of the adaptive solve
(``pipelines/likelihood.py``); ``--json FILE`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = (
    "Exact log-likelihood of latents (or of images' VAE latents) under a model at guidance 1, in bits per "
    "dimension, by the adaptive ODE solve."
)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="diffusers SD3 / Flux folder (default: the demo model)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--latents", default=None, help="safetensors file with a tensor 'latents' [B, C, h, w]")
    what.add_argument(
        "--image",
        nargs="+",
        default=None,
        help="image files, scored through the VAE posterior mean (the latent's bits/dim, not the pixels')",
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="the prompt (once for all, or once per latent)"
    )
    parser.add_argument(
        "--divergence",
        default="auto",
        choices=("auto", "exact", "hutchinson"),
        help="auto: exact up to 64 latent dimensions, else Hutchinson (default: auto)",
    )
    parser.add_argument("--probes", type=int, default=4, help="Hutchinson probes, >= 2 (default: 4)")
    parser.add_argument("--probe", default="rademacher", choices=("rademacher", "gaussian"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes (default: 0)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="adaptive solver tolerance (default: 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-5, help="adaptive solver tolerance (default: 1e-5)")
    parser.add_argument("--guidance", type=float, default=None, help="must be 1 (CFG is not a density)")
    parser.add_argument(
        "--steps", type=int, default=None, help="refused: a likelihood needs the adaptive solve, not a grid"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--bound",
        action="store_true",
        help="with --image: also an upper bound on the images' own bits/dim (ELBO through the VAE posterior)",
    )
    parser.add_argument(
        "--samples", type=int, default=2, help="--bound: posterior draws per image (default: 2)"
    )
    parser.add_argument(
        "--pixel-sigma",
        type=float,
        default=0.03,
        help="--bound: std of the decoder's Gaussian (default: 0.03)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def _read_latents(path: str) -> Any:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises several types for unreadable files
        raise SystemExit(f"--latents {path}: cannot read it as safetensors ({err})") from None
    if "latents" in tensors:
        return tensors["latents"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise SystemExit(f"--latents {path}: holds {sorted(tensors)}; name the latents tensor 'latents'")


def _read_images(paths: list[str]) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--image {path}: cannot read it ({err})") from None
    if len({a.shape for a in arrays}) > 1:
        raise SystemExit("--image: all images must have one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]


def run(args: argparse.Namespace) -> int:
    import torch

    from mmdit_flow.pipelines.likelihood import _check_options, encode_images, image_bound, latent_likelihood
    from mmdit_flow.pipelines.pipeline import TextToImagePipeline

    try:  # refuse bad options before loading anything
        _check_options(args.guidance, args.steps, args.divergence, args.probe, args.rtol, args.atol)
        if args.bound and not args.image:
            raise ValueError("--bound needs --image (it bounds the bits/dim of image files)")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = TextToImagePipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    source = "latents" if args.latents else "VAE posterior mean of the images"
    images = _read_images(args.image) if args.image else None
    latents = _read_latents(args.latents) if images is None else encode_images(pipe, images)
    prompts = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    options = {
        "divergence": args.divergence,
        "probes": args.probes,
        "probe": args.probe,
        "seed": args.seed,
        "rtol": args.rtol,
        "atol": args.atol,
    }
    try:
        result = latent_likelihood(pipe, latents, prompts, **options)
        bound = None
        if args.bound:
            extra = {"samples": args.samples, "pixel_sigma": args.pixel_sigma}
            bound = image_bound(pipe, images, prompts, **extra, **options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bits, se = result.bits_per_dim().tolist(), result.bits_stderr()
    se = se.tolist() if se is not None else [None] * len(bits)
    names = args.image or [f"{args.latents}[{i}]" for i in range(len(bits))]
    kind = "exact divergence" if result.stderr is None else f"Hutchinson, {args.probes} {args.probe} probes"
    print(f"latent bits/dim ({source}; D = {result.dim}; {kind}; rtol {args.rtol:g}, atol {args.atol:g})")
    for name, b, s, lp in zip(names, bits, se, result.log_prob.tolist(), strict=True):
        err = "" if s is None else f" +- {s:.4f}"
        print(f"  {name}: {b:.4f}{err} bits/dim  (log p = {lp:.2f} nats)")
    mean = sum(bits) / len(bits)
    print(
        f"mean {mean:.4f} bits/dim; {result.nfe} function evaluations ({result.steps} steps, "
        f"{result.rejected} rejected)"
    )
    if bound is not None:
        print(
            f"image bits/dim, an upper bound (-ELBO / (3 H W ln 2) with the VAE posterior, a discretized "
            f"Gaussian decoder of std {bound.pixel_sigma:g}, {args.samples} posterior draws; "
            f"{bound.nfe} function evaluations):"
        )
        se_b = bound.stderr.tolist() if bound.stderr is not None else [None] * len(bits)
        for name, b, s, rec in zip(
            names, bound.bits_per_dim.tolist(), se_b, bound.reconstruction_bits.tolist(), strict=True
        ):
            err = "" if s is None else f" +- {s:.4f}"
            print(f"  {name}: <= {b:.4f}{err} bits/dim  (reconstruction term {rec:.4f})")
    if args.json:
        from mmdit_flow.weights.io import write_json

        write_json(
            {
                "source": source,
                "dim": result.dim,
                "divergence": "exact" if result.stderr is None else "hutchinson",
                "probes": None if result.stderr is None else args.probes,
                "rtol": args.rtol,
                "atol": args.atol,
                "nfe": result.nfe,
                "items": [
                    {"name": n, "bits_per_dim": b, "bits_stderr": s, "log_prob_nats": lp}
                    for n, b, s, lp in zip(names, bits, se, result.log_prob.tolist(), strict=True)
                ],
                "mean_bits_per_dim": mean,
                "image_bound": None
                if bound is None
                else {
                    "pixel_sigma": bound.pixel_sigma,
                    "samples": args.samples,
                    "bits_per_dim": bound.bits_per_dim.tolist(),
                    "bits_stderr": None if bound.stderr is None else bound.stderr.tolist(),
                    "reconstruction_bits": bound.reconstruction_bits.tolist(),
                    "latent_bits": bound.latent_bits.tolist(),
                    "entropy_bits": bound.entropy_bits.tolist(),
                },
            },
            args.json,
        )
    return 0
