"""``mmdit-flow generate``: text to PNG files with a diffusers SD3 / Flux folder (or the demo model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "Generate images from a text prompt and write them as PNG files."
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument("--model", default=None, help="diffusers SD3 / Flux folder (default: the demo model)")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (SD3: CFG, Flux dev: distilled)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (same seed, same image)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    parser.add_argument("--sampler", default="euler", help="euler | midpoint | heun | rk4")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (SD3 256, Flux 512)")
    parser.add_argument(
        "-o", "--output", default="out.png", help="output PNG; several: out-0.png, out-1.png ..."
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--offload", action="store_true", help="keep models on the CPU, move each while it runs"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def output_paths(output: str, n: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png ... for several."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def run(args: argparse.Namespace) -> int:
    """Generate and save; bad arguments or folders print the error and return 2."""
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmdit-flow generate: error: {err}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    import torch

    from mmdit_flow.pipelines import TextToImagePipeline

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = TextToImagePipeline.from_pretrained(
        args.model, device=args.device, dtype=dtype, offload=args.offload
    )
    images = pipe(
        [args.prompt],
        steps=args.steps,
        guidance=args.guidance,
        negative_prompt=args.negative,
        height=args.height,
        width=args.width,
        seed=args.seed,
        num_images=args.num_images,
        sampler=args.sampler,
        max_sequence_length=args.max_sequence_length,
        progress=not args.no_progress,
    )
    paths = output_paths(args.output, len(images))
    for image, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    return 0
