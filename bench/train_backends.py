"""Training-step speed of the tiny-shapes recipe per attention backend.

One step = forward under bf16 CPU autocast (as the recipe trains), fp32 loss, backward, gradient clipping
and an AdamW step, on a batch of the recipe's shapes (32 samples: 16 x 16 x 16 latents = 64 image tokens,
32 + 32 text tokens). Variants are timed by bench/timing.py's protocol (interleaved rounds, every variant
once per round, the order reversed every other round) so that machine noise hits all of them; the report is
steps per second (median over rounds) and the speed ratio to ``sdpa``, the default backend, with a 95%
interval. The recipe's ``model.overrides`` can be changed with ``key=value``::

    python bench/train_backends.py --threads 2 --rounds 5 --steps 20
    python bench/train_backends.py model.overrides.depth=8     # another shape of the recipe
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved

from mmdit_flow.training.config import load_config
from mmdit_flow.training.recipes.tiny_shapes.ship import CONFIG
from mmdit_flow.training.trainer import build_model

VARIANTS = ("sdpa", "math", "reference")


def make_step(overrides: list[str], backend: str):
    config = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    model = build_model(config)
    model.attention_backend = backend  # as the trainer does with model.attention_backend
    c, b = model.config, config.data.batch_size
    g = torch.Generator().manual_seed(1)
    side = c.sample_size
    x0 = torch.randn(b, c.in_channels, side, side, generator=g)
    txt = torch.randn(b, 2 * config.model.max_sequence_length, c.context_dim, generator=g)
    vec = torch.randn(b, c.vec_dim, generator=g)
    t = torch.rand(b, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(xt, t, txt, vec).float()
        (v - (noise - x0)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.overrides.depth=8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = {name: make_step(args.overrides, name) for name in VARIANTS}
    timings = interleaved(steps, rounds=args.rounds, warmup=3, calls=args.steps)
    print(f"\n{' '.join(args.overrides) or 'recipe'}, {args.threads} threads, bf16 autocast")
    print("| attention backend | steps/s | vs sdpa (95% interval) |\n|---|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {1 / timings.median(name):.2f} | {timings.ratio('sdpa', name)} |")


if __name__ == "__main__":
    main()
