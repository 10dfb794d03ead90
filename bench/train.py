"""Training throughput: our SD3 transformer vs diffusers' ``SD3Transformer2DModel`` on the same step.

The same weights (ours converted from the diffusers model through ``weights/sd3_keys.py``), the same batch
and the same loss: ``mmdit_flow.flow.cfm_loss`` (logit-normal t, shift 3), fp32 backward and an AdamW step.
The two are timed interleaved (round i runs ours then diffusers) so that machine noise hits both; the
result is images per second for each and their ratio (goal: ours >= 1.1x). CPU, fp32, one process:

    python bench/train.py --size small --rounds 5 --steps 3

Sizes: ``tiny`` (hidden 64, 2 blocks, 4-channel 16x16 latents) and ``small`` (SD3 blocks at hidden 512 =
8 heads of 64, 4 blocks, 16-channel 32x32 latents = 256 image tokens, 77 + 77 text tokens of width 4096,
pooled 2048).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmdit_flow.flow import cfm_loss, sample_t, shift_t

SIZES = {
    "tiny": dict(hidden=64, heads=2, depth=2, channels=4, side=16, txt=24, context=32, pooled=16, batch=4),
    "small": dict(
        hidden=512, heads=8, depth=4, channels=16, side=32, txt=154, context=4096, pooled=2048, batch=4
    ),
}


def build(size: str):
    from diffusers import SD3Transformer2DModel

    from mmdit_flow.models.sd3 import SD3Transformer
    from mmdit_flow.weights.sd3_keys import config_from_diffusers, from_diffusers

    s = SIZES[size]
    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(
        sample_size=s["side"], patch_size=2, in_channels=s["channels"], out_channels=s["channels"],
        num_layers=s["depth"], attention_head_dim=s["hidden"] // s["heads"], num_attention_heads=s["heads"],
        joint_attention_dim=s["context"], caption_projection_dim=s["hidden"],
        pooled_projection_dim=s["pooled"], pos_embed_max_size=s["side"],
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():  # non-zero everywhere (diffusers zero-inits nothing we rely on here)
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    config = config_from_diffusers(dict(theirs.config))
    ours = SD3Transformer(config)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config))
    return ours.train(), theirs.train(), s


def batch(s: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(s["batch"], s["channels"], s["side"], s["side"], generator=g)
    txt = torch.randn(s["batch"], s["txt"], s["context"], generator=g)
    vec = torch.randn(s["batch"], s["pooled"], generator=g)
    t = shift_t(sample_t(s["batch"], "logit_normal", generator=g), 3.0)
    noise = torch.randn(x0.shape, generator=g)
    return x0, txt, vec, t, noise


def step_fn(model, diffusers: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def velocity(x, t, txt, vec):
        if diffusers:
            return model(
                hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
            ).sample
        return model(x, t, txt, vec)

    def step(x0, txt, vec, t, noise) -> float:
        loss = cfm_loss(velocity, x0, t=t, noise=noise, txt=txt, vec=vec)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round and model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs, s = build(args.size)
    data = batch(s)
    # same function before any step: the comparison is of one computation
    with torch.no_grad():
        a = ours(data[0], data[3], data[1], data[2])
        b = theirs(hidden_states=data[0], encoder_hidden_states=data[1], pooled_projections=data[2],
                   timestep=1000 * data[3]).sample  # fmt: skip
    print(f"forward max |ours - diffusers| = {(a - b).abs().max():.2e}")
    steps = {"ours": step_fn(ours, False), "diffusers": step_fn(theirs, True)}
    for fn in steps.values():
        fn(*data)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(*data)
            times[name].append((time.perf_counter() - start) / args.steps)
    speed = {k: s["batch"] / statistics.median(v) for k, v in times.items()}
    print(
        f"size {args.size}, batch {s['batch']}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} rounds"
    )
    for name, v in speed.items():
        print(f"  {name:9s} {v:8.2f} images/s")
    print(f"  ratio ours / diffusers = {speed['ours'] / speed['diffusers']:.3f}")


if __name__ == "__main__":
    main()
