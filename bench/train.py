"""Training throughput: our SD3 transformer vs diffusers' ``SD3Transformer2DModel`` on the same step.

The same weights and inputs (bench/cases.py's SD3 case), the same batch and the same loss:
``mmdit_flow.flow.cfm_loss`` (logit-normal t, shift 3), fp32 backward and an AdamW step. The two are timed
by bench/timing.py's protocol (interleaved rounds, which side goes first alternates) so that machine noise
hits both; the result is images per second for each and their ratio with a 95% interval (goal: ours >=
1.1x). CPU, fp32, one process:

    python bench/train.py --size small --rounds 5 --steps 3

Sizes: bench/cases.py's, at batch 4; ``small`` (SD3 blocks at hidden 512 = 8 heads of 64, 4 blocks, 154 text
tokens of width 4096, pooled 2048) on 16-channel 32x32 latents (256 image tokens) here, ``tiny`` and
``shipped`` on their own latents.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from cases import SIDES, Case, build_case
from timing import interleaved

from mmdit_flow.flow import cfm_loss, sample_t, shift_t

BATCH = 4
LATENT = {"small": 32}  # latent side where it is not the case's own: a training step at 256 image tokens


def train_step(case: Case, side: str, seed: int = 0) -> Callable[[], float]:
    """One training step of ``side`` on a fixed batch: cfm_loss, backward, AdamW; returns the loss."""
    model = case.model(side).train()
    velocity = case.velocity(side)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(case.inputs.x.shape, generator=g)
    t = shift_t(sample_t(case.batch, "logit_normal", generator=g), 3.0)
    noise = torch.randn(x0.shape, generator=g)
    txt, vec = case.inputs.txt, case.inputs.vec

    def step() -> float:
        loss = cfm_loss(velocity, x0, t=t, noise=noise, txt=txt, vec=vec)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small", "shipped"), default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round and model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    case = build_case("sd3", args.size, batch=BATCH, latent=LATENT.get(args.size))
    # same function before any step: the comparison is of one computation
    print(f"forward relative error |ours - diffusers| / |diffusers| = {case.relative_error():.2e}")
    steps = {side: train_step(case, side) for side in SIDES}
    timings = interleaved(steps, rounds=args.rounds, warmup=1, calls=args.steps)
    print(
        f"size {args.size}, batch {case.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    for side in SIDES:
        print(f"  {side:9s} {case.batch / timings.median(side):8.2f} images/s")
    print(f"  ratio ours / diffusers = {timings.ratio('diffusers', 'ours')}")


if __name__ == "__main__":
    main()
