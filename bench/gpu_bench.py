"""GPU benchmark: ours vs diffusers, SD3-medium-shaped transformer at 1024^2 in bf16, eager and torch.compile.

    python bench/gpu_bench.py           # CUDA: 24 blocks, hidden 1536, 128x128 latents + 333 text tokens
    python bench/gpu_bench.py --smoke   # CPU, fp32, a tiny size: checks that the script itself works
    bash bench/gpu.sh                   # the same with the machine's details, results under $OUT

Reports milliseconds per forward (one sampling step at batch 1), and the achieved TFLOP/s: the matmul and
attention FLOPs of one forward, counted from the config (``sd3_flops``), over the measured time, also as a
share of the H200's 989 TFLOP/s dense bf16 peak. Both models hold the same random weights (ours loaded from
diffusers' state dict) and their outputs are compared before timing. Timings are medians of ``--steps``
forwards, ours and diffusers interleaved.

``--compile regional`` (default) compiles each block separately (identical blocks share one compiled graph,
so both compile in well under a minute); ``--compile full`` compiles the whole model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

PEAK_TFLOPS = 989.0  # H200 / H100 SXM dense bf16


def sd3_flops(c, n_img: int, n_txt: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one SD3 forward (2 per multiply-add; norms and pointwise ops left out).

    Per joint block and stream of n tokens: qkv 6 n D^2, output projection 2 n D^2, MLP 16 n D^2 (the last
    block's text stream: qkv only); the joint attention 4 N^2 D over N = n_img + n_txt; an MMDiT-X block adds
    an image-only attention (8 n D^2 + 4 n_img^2 D). Plus the embedders, the modulations and the final layer.
    """
    D, N = c.hidden_size, n_img + n_txt
    p2c = c.patch_size**2
    flops = 2 * n_img * c.in_channels * p2c * D + 2 * n_txt * c.context_dim * D  # patch + context embedders
    flops += 2 * (256 * D + D * D + c.vec_dim * D + D * D)  # timestep and pooled-text MLPs (per sample)
    for i in range(c.depth):
        last = i == c.depth - 1
        flops += 24 * n_img * D * D + (6 if last else 24) * n_txt * D * D + 4 * N * N * D
        flops += 2 * D * D * ((9 if i in c.dual_attention_layers else 6) + (2 if last else 6))  # modulations
        if i in c.dual_attention_layers:
            flops += 8 * n_img * D * D + 4 * n_img * n_img * D
    flops += 2 * D * 2 * D + 2 * n_img * D * p2c * c.out_channels  # final layer
    return float(batch * flops)


def sd3_models(depth: int | None, smoke: bool, device: torch.device, dtype: torch.dtype):
    """(ours, diffusers, inputs, flops) for the SD3-medium shape (or a tiny one with ``smoke``)."""
    from diffusers import SD3Transformer2DModel
    from mmdit_flow.weights.sd3_keys import config_to_diffusers, from_diffusers

    from mmdit_flow.models.sd3 import SD3Config, SD3Transformer

    if smoke:
        config = SD3Config(
            hidden_size=64, num_heads=2, depth=2, context_dim=32, vec_dim=16, pos_embed_max_size=16
        )
        latent, n_txt = 16, 12
    else:
        config = SD3Config.preset("sd3_medium")
        latent, n_txt = 128, 333  # 1024^2 images; 77 CLIP + 256 T5 tokens
    if depth is not None:
        config = dataclasses.replace(config, depth=depth)
    with torch.device(device):
        theirs = SD3Transformer2DModel.from_config(config_to_diffusers(config))
        gen = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
        ours = SD3Transformer(config)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config))
    theirs, ours = theirs.to(dtype).eval(), ours.to(dtype).eval()
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, config.in_channels, latent, latent, generator=gen, device=device, dtype=dtype)
    t = torch.rand(1, generator=gen, device=device)
    txt = torch.randn(1, n_txt, config.context_dim, generator=gen, device=device, dtype=dtype)
    vec = torch.randn(1, config.vec_dim, generator=gen, device=device, dtype=dtype)
    n_img = (latent // config.patch_size) ** 2

    def run_ours(model):
        return model(x, t, txt, vec)

    def run_theirs(model):
        return model(
            hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
        ).sample

    blocks = {"ours": lambda m: m.blocks, "diffusers": lambda m: m.transformer_blocks}
    models = {"ours": (ours, run_ours), "diffusers": (theirs, run_theirs)}
    return models, blocks, sd3_flops(config, n_img, n_txt), config


def flux_flops(c, n_img: int, n_txt: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one Flux forward (2 per multiply-add; norms, RoPE, pointwise left out).

    With D the width, M = 4 D the MLP width and N = n_img + n_txt: a double block costs 12 n D^2 multiply-adds
    per stream of n tokens (qkv 3, output projection 1, MLP 8) and a single block 12 N D^2 (linear1 D -> 3 D
    + M, linear2 D + M -> D); every block's joint attention costs 2 N^2 D (q k^T and p v). Per sample: the
    modulations (6 D^2 per stream of a double block, 3 D^2 per single block, 2 D^2 in the final layer) and
    the timestep / guidance / pooled-text MLPs. Plus the image, text and output projections.
    """
    D, N, M = c.hidden_size, n_img + n_txt, int(4 * c.hidden_size)
    macs = n_img * 4 * c.in_channels * D + n_txt * c.context_dim * D  # img_in on packed 2x2 patches, txt_in
    macs += (256 * D + D * D) * (2 if c.guidance_embed else 1) + c.vec_dim * D + D * D  # time/guidance/vec
    macs += c.depth * (N * (3 * D * D + D * D + 2 * D * M) + 2 * 6 * D * D + 2 * N * N * D)
    macs += c.depth_single * (N * (D * (3 * D + M) + (D + M) * D) + 3 * D * D + 2 * N * N * D)
    macs += 2 * D * D + n_img * D * 4 * c.out_channels  # final modulation and projection
    return float(2 * batch * macs)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (Flux-dev in fp32 twice would be 96 GB before the cast)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flux_models(depth: int | None, smoke: bool, device: torch.device, dtype: torch.dtype):
    """(ours, diffusers, inputs, flops) for the FLUX.1-dev shape at 1024^2 (or a tiny one with ``smoke``).

    1024^2 images are 128x128 latents of 16 channels, packed 2x2 into 4096 image tokens, with 512 T5 tokens
    and the guidance embedding. ``depth`` sets the double blocks, and twice as many single blocks (dev: 19,
    38).
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from mmdit_flow.weights.flux_keys import config_to_diffusers, from_diffusers

    from mmdit_flow.models.flux import PRESETS, FluxConfig, FluxTransformer, position_ids

    if smoke:
        config = FluxConfig(
            in_channels=4,
            out_channels=4,
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single=2,
            context_dim=32,
            vec_dim=16,
            axes_dim=(4, 14, 14),
        )
        latent, n_txt = 16, 12
    else:
        config = PRESETS["flux-dev"]
        latent, n_txt = 128, 512  # 1024^2 images; FLUX.1-dev's 512 T5 tokens
    if depth is not None:
        config = dataclasses.replace(config, depth=depth, depth_single=2 * depth)
    with torch.device(device), default_dtype(dtype):
        theirs = FluxTransformer2DModel.from_config(config_to_diffusers(config))
        gen = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for name, p in theirs.named_parameters():  # norm weights near 1 (q/k RMS-norms), the rest small
                noise = torch.randn(p.shape, generator=gen, device=device) * 0.02
                p.copy_(noise + (1.0 if "norm" in name else 0.0))
        ours = FluxTransformer(config)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config))
    theirs, ours = theirs.to(dtype).eval(), ours.to(dtype).eval()
    gen = torch.Generator(device).manual_seed(1)
    C = config.in_channels
    x = torch.randn(1, C, latent, latent, generator=gen, device=device, dtype=dtype)
    t = torch.rand(1, generator=gen, device=device)
    txt = torch.randn(1, n_txt, config.context_dim, generator=gen, device=device, dtype=dtype)
    vec = torch.randn(1, config.vec_dim, generator=gen, device=device, dtype=dtype)
    guidance = torch.full((1,), 3.5, device=device) if config.guidance_embed else None
    ids = position_ids(n_txt, latent // 2, latent // 2, device=device)  # [n_txt + n_img, 3]
    packed = FluxPipeline._pack_latents(x, 1, C, latent, latent)  # [1, n_img, 4 C]
    n_img = (latent // 2) ** 2

    def run_ours(model):
        return model(x, t, txt, vec, guidance)

    def run_theirs(model):
        out = model(
            hidden_states=packed,
            encoder_hidden_states=txt,
            pooled_projections=vec,
            timestep=t.to(dtype),
            guidance=guidance,
            img_ids=ids[n_txt:],
            txt_ids=ids[:n_txt],
        ).sample  # [1, n_img, 4 C_out]
        return FluxPipeline._unpack_latents(out, 8 * latent, 8 * latent, 8)  # [1, C_out, latent, latent]

    blocks = {
        "ours": lambda m: list(m.double_blocks) + list(m.single_blocks),
        "diffusers": lambda m: list(m.transformer_blocks) + list(m.single_transformer_blocks),
    }
    models = {"ours": (ours, run_ours), "diffusers": (theirs, run_theirs)}
    return models, blocks, flux_flops(config, n_img, n_txt), config


FAMILIES = {"sd3": sd3_models, "flux": flux_models}


def counted_flops(model: torch.nn.Module, run: Callable) -> int:
    """FLOPs of one forward as torch's FlopCounterMode counts them, with the plain-matmul attention backend
    (so that attention is counted as the two matmuls the formulas assume)."""
    from torch.utils.flop_counter import FlopCounterMode

    backend, model.attention_backend = model.attention_backend, "reference"
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run(model)
    finally:
        model.attention_backend = backend
    return counter.get_total_flops()


def compiled(model: torch.nn.Module, blocks: Callable, how: str, smoke: bool) -> torch.nn.Module:
    """The model with torch.compile applied to the whole model or to each block ("regional")."""
    backend = "eager" if smoke else "inductor"  # eager: checks tracing on the CPU without codegen
    if how == "full":
        return torch.compile(model, backend=backend)
    for block in blocks(model):
        block.compile(backend=backend)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(runs: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per forward of each entry, interleaved, after ``warmup`` calls each."""
    with torch.no_grad():
        for _ in range(warmup):
            for model, run in runs.values():
                run(model)
        sync(device)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(steps):
            for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
                model, run = runs[name]
                sync(device)
                start = time.perf_counter()
                run(model)
                sync(device)
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd3")
    parser.add_argument("--smoke", action="store_true", help="tiny size, CPU, fp32: checks the script only")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", choices=("regional", "full", "none"), default="regional")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON results ($OUT)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.steps, args.warmup = min(args.steps, 3), 1
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")

    models, blocks, flops, config = FAMILIES[args.family](args.depth, args.smoke, device, dtype)
    with torch.no_grad():
        out_ours, out_theirs = (run(model).float() for model, run in models.values())
    err = ((out_ours - out_theirs).norm() / out_theirs.norm()).item()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not err < tolerance:
        message = f"ours and diffusers disagree: relative error {err:.3e} > {tolerance}"
        if dtype == torch.float32:
            raise SystemExit(message)
        print(f"WARNING: {message} (bf16; timing anyway, the result is marked)", flush=True)

    if args.smoke:  # the FLOP formula against torch's count (norms and pointwise ops are not counted there)
        counted = counted_flops(*models["ours"])
        print(f"FLOPs per forward: formula {flops:.6g}, FlopCounterMode {counted:.6g}")
        if abs(flops - counted) > 1e-3 * counted:
            raise SystemExit(f"the {args.family} FLOP formula is off: {flops:.6g} vs counted {counted:.6g}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = f"{args.family} depth {config.depth} hidden {config.hidden_size}"
    print(f"{shape}, {dtype}, {name}, torch {torch.__version__}")
    print(f"forward: {flops / 1e12:.2f} TFLOP; ours vs diffusers relative error {err:.2e}")
    results = {
        "family": args.family,
        "device": name,
        "dtype": str(dtype),
        "config": dataclasses.asdict(config),
    }
    results.update(tflop_per_forward=flops / 1e12, relative_error=err, parity_ok=err < tolerance, runs=[])
    modes = ["eager"] + ([] if args.compile == "none" else [f"compile-{args.compile}"])
    for mode in modes:
        runs = dict(models)
        start = time.perf_counter()
        if mode != "eager":
            runs = {k: (compiled(m, blocks[k], args.compile, args.smoke), r) for k, (m, r) in models.items()}
        ms = time_pair(runs, args.steps, args.warmup, device)
        setup_s = time.perf_counter() - start
        for impl, value in ms.items():
            tflops = flops / value / 1e9
            row = dict(mode=mode, impl=impl, ms=value, tflops=tflops, peak_share=tflops / PEAK_TFLOPS)
            results["runs"].append(row)
            share = 100 * tflops / PEAK_TFLOPS
            print(f"{mode:16} {impl:9} {value:9.2f} ms  {tflops:7.1f} TFLOP/s  {share:5.1f}% of peak")
        speedup = ms["diffusers"] / ms["ours"]
        print(f"{mode:16} speedup ours/diffusers {speedup:.2f}x  ({setup_s:.0f} s incl. compile and warmup)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gpu_bench_{args.family}{'_smoke' if args.smoke else ''}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
