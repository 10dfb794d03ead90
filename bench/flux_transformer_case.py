"""Flux benchmark case: our FluxTransformer and diffusers' FluxTransformer2DModel, same weights and inputs.

``build_case(size)`` is the hook for ``bench/transformer.py --family flux``, which times it (forward and
forward+backward, CPU, fp32), measures peak memory and checks parity; running this file is a shortcut for
one size of that run:

    python bench/flux_transformer_case.py --size small --repeats 7
    # the same as: python bench/transformer.py --family flux --sizes small --repeats 7 --threads 1

Sizes: ``tiny`` (hidden 64, 2 double + 2 single blocks, 16x16 latents = 64 image tokens, 16 text tokens) and
``small`` (FLUX.1 blocks at hidden 512 = 4 heads of 128 with the real RoPE axes (16, 56, 56): 2 double +
4 single blocks, 16-channel 64x64 latents = 1024 image tokens after 2x2 packing, 512 T5 tokens of width 4096
as FLUX.1-dev uses, pooled width 768, guidance embedding on). All weights are random and non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmdit_flow.weights.flux_keys import config_to_diffusers, from_diffusers

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling bench modules
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import flux_flops  # noqa: E402

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
    flops: float  # FLOPs of one forward, matmuls and attention (gpu_bench.flux_flops)


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
    for model in (ours, theirs):
        model.to(device).eval()
        if dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op one)
            model.to(dtype)

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

    flops = flux_flops(config, (H // 2) * (W // 2), L, batch=B)
    return Case(config, ours, theirs, run_ours, run_theirs, flops)


def main(argv: list[str] | None = None) -> None:
    """The ``bench/transformer.py --family flux`` run for one size (timing, memory and parity live there)."""
    from transformer import main as transformer_main

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is exact)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    args = parser.parse_args(argv)
    forwarded = ["--family", "flux", "--sizes", args.size, "--repeats", str(args.repeats)]
    forwarded += ["--threads", str(args.threads)] + (["--no-memory"] if args.no_memory else [])
    transformer_main(forwarded)


if __name__ == "__main__":
    main()
