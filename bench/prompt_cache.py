"""What the pipeline's text-embedding cache saves on a seeds loop (one prompt, many seeds).

For each shipped model at its default steps and guidance, ``--seeds`` calls of one prompt with seeds 0..n-1
are timed as a whole, with the cache (the prompt is encoded once) and without (the cache cleared before every
call), side by side (``timing.interleaved``); the images of both are compared (they must be equal).

    python bench/prompt_cache.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved

PROMPT = "a small yellow triangle above a large green square on a black background"


def main() -> None:
    from mmdit_flow.pipelines import TextToImagePipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="shipped:tiny-shapes,shipped:tiny-shapes-turbo")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| model | steps | guidance | {args.seeds} seeds, cached (s) | uncached (s) | uncached / cached |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        pipe = TextToImagePipeline.from_pretrained(name, device="cpu", dtype=torch.float32)

        def loop(clear: bool, pipe=pipe) -> list[torch.Tensor]:
            out = []
            for seed in range(args.seeds):
                if clear:
                    pipe._prompt_cache.clear()
                out.append(pipe(PROMPT, seed=seed, output="latent", progress=False))
            return out

        if not all(torch.equal(a, b) for a, b in zip(loop(False), loop(True), strict=True)):
            raise SystemExit(f"{name}: cached and uncached images differ")
        t = interleaved({"cached": lambda: loop(False), "uncached": lambda: loop(True)}, rounds=args.rounds)
        d = pipe.defaults
        cached, uncached = t.median("cached"), t.median("uncached")
        print(
            f"| {name} | {d.steps} | {d.guidance:g} | {cached:.3f} | {uncached:.3f} | "
            f"{t.ratio('uncached', 'cached')} |"
        )


if __name__ == "__main__":
    main()
