"""Seconds per image end to end (prompt encoding, sampling, VAE decoding): our pipeline vs diffusers'
StableDiffusion3Pipeline / FluxPipeline on the same folder, on the CPU, in one run.

    python bench/pipeline.py                 # tiny and small SD3 and Flux, 5 interleaved repeats
    python bench/pipeline.py --repeats 9 --steps 8
    python bench/pipeline.py --cases sd3-shipped --images 1     # the shipped tiny-shapes model
    python bench/pipeline.py --best --cases sd3-shipped sd3-small-real --steps 4 --images 1 --repeats 5

``--best``: each side with every lossless option it has, against fp32 eager images of the same call. Ours:
``pipe.compile()`` (regional, its compile time printed), the prompt-embedding cache, and ``--dtype``
(default bfloat16: the CPU's AVX512-BF16 / AMX GEMMs; float32 to leave it out). Diffusers: torch.compile of
its transformer's blocks (Flux: its ``compile_repeated_blocks``; SD3, for which that raises: each
``transformer_blocks`` entry, the same regional compile) and the same dtype; ``--scope model`` compiles the
whole transformer on both sides instead. Both compile during the untimed warm-up calls. The images of each
side are compared with ours in fp32 eager (max and mean |diff|).

The cases are bench/pipeline_cases.py's: both pipelines load the same diffusers folder (ours runs our
transformer through load_transformer). The first call of each is the warm-up and the check that both make
the same images; then the calls follow bench/timing.py's protocol (interleaved, which side goes first
alternates, median, speed-up with a 95% interval over rounds), because these machines are noisy.
"""

from __future__ import annotations

import argparse

import torch
from pipeline_cases import CASES, compile_diffusers, load_pair
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


def bench_best(
    name: str,
    steps: int,
    repeats: int,
    images: int,
    dtype: torch.dtype,
    prompt_cache: bool = True,
    scope: str = "blocks",
) -> dict:
    """ms per image of each side's best lossless path, the speed-up, and each side's images against ours
    in fp32 eager."""
    import time

    torch._dynamo.reset()  # the previous case's graphs would count against dynamo's recompile limit
    pair = load_pair(name)
    reference = pair.run("ours", steps=steps, num_images=images)  # fp32, eager
    fp32_diff = float(abs(reference - pair.run("diffusers", steps=steps, num_images=images)).max())
    pair.ours.to(dtype)
    pair.theirs.to(dtype=dtype)
    report = pair.ours.compile(scope=scope)
    if scope == "blocks":
        compile_diffusers(pair.theirs, pair.case.family)
    else:  # torch.compile of the whole transformer, as diffusers' docs show it
        pair.theirs.transformer.compile()
    runs = {
        "ours": lambda: pair.run("ours", steps=steps, num_images=images, prompt_cache=prompt_cache),
        "diffusers": lambda: pair.run("diffusers", steps=steps, num_images=images),
    }
    first, diffs = {}, {}
    for side in SIDES:  # warm-up: diffusers compiles here; ours only runs its warmed graphs
        start = time.perf_counter()
        delta = abs(runs[side]() - reference)
        first[side] = time.perf_counter() - start
        diffs[side] = (float(delta.max()), float(delta.mean()))
    timings = interleaved(runs, rounds=repeats, warmup=0)
    o, d = (1e3 * timings.median(side) / images for side in SIDES)
    speedup = timings.ratio("diffusers", "ours")
    setting = f"{str(dtype).replace('torch.', '')}, {'' if prompt_cache else 'no '}prompt cache, {scope}"
    print(
        f"{name:15s} {pair.case.image_size:4d}px {setting}  ours {o:8.1f} ms/img  "
        f"diffusers {d:8.1f} ms/img  speed-up {speedup}\n"
        f"{'':15s} ours: {report}, first call {first['ours']:.1f} s; diffusers: first call (compiling) "
        f"{first['diffusers']:.1f} s\n{'':15s} |image - ours fp32 eager| max / mean: ours "
        f"{diffs['ours'][0]:.1e} / {diffs['ours'][1]:.1e}, diffusers {diffs['diffusers'][0]:.1e} / "
        f"{diffs['diffusers'][1]:.1e} (fp32 eager ours vs diffusers: {fp32_diff:.1e})",
        flush=True,
    )
    return {"case": name, "ours_ms": o, "diffusers_ms": d, "speedup": speedup.value, "max_diff": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--best", action="store_true", help="each side's best lossless path (see above)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="with --best")
    parser.add_argument(
        "--no-prompt-cache", action="store_true", help="with --best: ours encodes every call, as diffusers"
    )
    parser.add_argument(
        "--scope", choices=("blocks", "model"), default="blocks", help="with --best: what both sides compile"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
        f"{args.images} images per call, median of {args.repeats} interleaved repeats"
    )
    for name in args.cases:
        if args.best:
            dtype = getattr(torch, args.dtype)
            cache = not args.no_prompt_cache
            bench_best(name, args.steps, args.repeats, args.images, dtype, cache, args.scope)
        else:
            bench_case(name, args.steps, args.repeats, args.images)


if __name__ == "__main__":
    main()
