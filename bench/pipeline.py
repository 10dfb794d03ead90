"""Seconds per image end to end (prompt encoding, sampling, VAE decoding): our pipeline vs diffusers'
StableDiffusion3Pipeline / FluxPipeline on the same folder, on the CPU, in one run.

    python bench/pipeline.py                 # tiny and small SD3 and Flux, 5 interleaved repeats
    python bench/pipeline.py --repeats 9 --steps 8
    python bench/pipeline.py --cases sd3-shipped --images 1     # the shipped tiny-shapes model

The cases are bench/pipeline_cases.py's: both pipelines load the same diffusers folder (ours runs our
transformer through load_transformer). The first call of each is the warm-up and the check that both make
the same images; then the calls follow bench/timing.py's protocol (interleaved, which side goes first
alternates, median, speed-up with a 95% interval over rounds), because these machines are noisy.
"""

from __future__ import annotations

import argparse

import torch
from pipeline_cases import CASES, load_pair
from timing import interleaved

SIDES = ("ours", "diffusers")
DEFAULT_CASES = ["sd3-tiny", "flux-tiny", "sd3-small", "flux-small"]


def bench_case(name: str, steps: int, repeats: int, images: int) -> dict:
    """ms per image of each side, the speed-up and the largest image difference, for one case."""
    pair = load_pair(name)
    runs = {side: (lambda side=side: pair.run(side, steps=steps, num_images=images)) for side in SIDES}
    diff = float(abs(runs["ours"]() - runs["diffusers"]()).max())  # warm-up, and the images agree
    timings = interleaved(runs, rounds=repeats, warmup=0)
    o, d = (1e3 * timings.median(side) / images for side in SIDES)
    speedup = timings.ratio("diffusers", "ours")
    size = pair.case.image_size
    print(
        f"{name:11s} {size:4d}px  ours {o:8.1f} ms/img  diffusers {d:8.1f} ms/img  "
        f"speed-up {speedup}  max|diff| {diff:.1e}",
        flush=True,
    )
    return {"case": name, "ours_ms": o, "diffusers_ms": d, "speedup": speedup.value, "max_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(CASES))
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
        f"{args.images} images per call, median of {args.repeats} interleaved repeats"
    )
    for name in args.cases:
        bench_case(name, args.steps, args.repeats, args.images)


if __name__ == "__main__":
    main()
