"""Flux benchmark case: our FluxTransformer and diffusers' FluxTransformer2DModel, same weights and inputs.

``build_case(size)`` is the hook for ``bench/transformer.py --family flux``; run this file on its own for a
quick ours-vs-diffusers timing on the CPU in fp32 (``--threads 1`` gives steadier numbers on a busy machine):

    python bench/flux_transformer_case.py --size small --repeats 7

Sizes: ``tiny`` (hidden 64, 2 double + 2 single blocks, 16x16 latents = 64 image tokens, 16 text tokens) and
``small`` (FLUX.1 blocks at hidden 512 = 4 heads of 128 with the real RoPE axes (16, 56, 56): 2 double +
4 single blocks, 16-channel 64x64 latents = 1024 image tokens after 2x2 packing, 512 T5 tokens of width 4096
as FLUX.1-dev uses, pooled width 768, guidance embedding on). All weights are random and non-zero.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from mmdit_flow.weights.flux_keys import config_to_diffusers, from_diffusers
from torch import nn

from mmdit_flow.models.flux import FluxConfig, FluxTransformer, position_ids, unpack

SIZES: dict[str, tuple[FluxConfig, dict[str, int]]] = {
    "tiny": (
        FluxConfig(
            in_channels=4,
            out_channels=4,
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single=2,
            context_dim=32,
            vec_dim=24,
            axes_dim=(4, 14, 14),
        ),
        {"batch": 1, "height": 16, "width": 16, "txt_len": 16},
    ),
    "small": (
        FluxConfig(hidden_size=512, num_heads=4, depth=2, depth_single=4),
        {"batch": 1, "height": 64, "width": 64, "txt_len": 512},
    ),
}


@dataclass
class Case:
    """Ours and diffusers' model (``theirs``), same weights, and a zero-argument call for each returning v."""

    config: FluxConfig
    ours: FluxTransformer
    theirs: nn.Module  # diffusers
    run_ours: Callable[[], torch.Tensor]
    run_theirs: Callable[[], torch.Tensor]
    flops: float  # multiply-adds x 2 of one forward (matmuls and attention only)


def forward_flops(config: FluxConfig, batch: int, image_tokens: int, txt_len: int) -> float:
    """FLOPs of one forward: 2 per multiply-add in the block linears and in attention (q k^T and p v)."""
    D, S, N = config.hidden_size, image_tokens + txt_len, image_tokens
    mlp = 4 * D
    double = (3 * D * D + D * D + 2 * D * mlp) * S + 2 * 6 * D * D  # both streams: qkv, proj, mlp; modulation
    single = (3 * D * D + D * mlp + (D + mlp) * D) * S + 3 * D * D
    attn = 2 * S * S * D  # q k^T and p v
    per_sample = config.depth * (double + attn) + config.depth_single * (single + attn)
    per_sample += (
        N * 4 * config.in_channels * D + txt_len * config.context_dim * D + N * D * 4 * config.out_channels
    )
    return 2.0 * batch * per_sample


def build_case(
    size: str = "small",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """Ours and diffusers' Flux transformer for ``size`` ("tiny" | "small"), same weights and inputs."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    config, shape = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    theirs = FluxTransformer2DModel.from_config(config_to_diffusers(config))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            scale = 1.0 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
    ours = FluxTransformer(config)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config))
    ours.to(device, dtype).eval()
    theirs.to(device, dtype).eval()

    B, H, W, L = shape["batch"], shape["height"], shape["width"], shape["txt_len"]
    x = torch.randn(B, config.in_channels, H, W, generator=gen).to(device, dtype)
    t = torch.rand(B, generator=gen).to(device)
    txt = torch.randn(B, L, config.context_dim, generator=gen).to(device, dtype)
    vec = torch.randn(B, config.vec_dim, generator=gen).to(device, dtype)
    guidance = torch.full((B,), 3.5, device=device) if config.guidance_embed else None
    ids = position_ids(L, H // 2, W // 2, device=device)

    def run_ours() -> torch.Tensor:
        return ours(x, t, txt, vec, guidance)

    def run_theirs() -> torch.Tensor:
        out = theirs(
            hidden_states=FluxPipeline._pack_latents(x, B, config.in_channels, H, W),
            encoder_hidden_states=txt,
            pooled_projections=vec,
            timestep=t.to(dtype),
            guidance=guidance,
            img_ids=ids[L:],
            txt_ids=ids[:L],
        ).sample
        return unpack(out, H, W)

    flops = forward_flops(config, B, (H // 2) * (W // 2), L)
    return Case(config, ours, theirs, run_ours, run_theirs, flops)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _forward_backward(model: nn.Module, run: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        run().square().mean().backward()

    return step


def saved_activation_bytes(run: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``run`` (parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack_hook(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
        out = run()
    del out
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    case = build_case(args.size)
    with torch.no_grad():
        ref, got = case.run_theirs(), case.run_ours()
    error = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"flux {args.size}: {case.flops / 1e9:.1f} GFLOP per forward, max relative difference {error:.1e}")

    for mode in ("forward", "forward+backward"):
        if mode == "forward":
            fns = {"ours": case.run_ours, "diffusers": case.run_theirs}
        else:
            fns = {
                "ours": _forward_backward(case.ours, case.run_ours),
                "diffusers": _forward_backward(case.theirs, case.run_theirs),
            }
        times: dict[str, list[float]] = {name: [] for name in fns}
        with torch.set_grad_enabled(mode != "forward"):
            for fn in fns.values():  # warm-up
                fn()
            for i in range(args.repeats):  # interleaved, alternating who goes first, so noise hits both alike
                for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
                    times[name].append(_time(fns[name]))
        ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        print(
            f"  {mode:17s} ours {ours_s * 1e3:8.1f} ms   diffusers {theirs_s * 1e3:8.1f} ms   "
            f"speed-up {theirs_s / ours_s:.2f}x   (median of {args.repeats})"
        )

    ours_mem = saved_activation_bytes(case.run_ours, list(case.ours.parameters()))
    theirs_mem = saved_activation_bytes(case.run_theirs, list(case.theirs.parameters()))
    print(
        f"  saved activations ours {ours_mem / 2**20:.1f} MiB   diffusers {theirs_mem / 2**20:.1f} MiB   "
        f"ratio {ours_mem / theirs_mem:.2f}"
    )


if __name__ == "__main__":
    main()
