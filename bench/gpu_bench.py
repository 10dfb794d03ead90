"""GPU benchmark: ours vs diffusers in bf16 on one CUDA device; ``bash bench/gpu.sh`` runs every case.

    python bench/gpu_bench.py --family sd3       # SD3-medium shape: 24 blocks, hidden 1536, 4096 + 333 tokens
    python bench/gpu_bench.py --family flux      # FLUX.1-dev shape: 19 + 38 blocks, hidden 3072, 4096 + 512
    python bench/gpu_bench.py --family pipeline  # end to end, 512^2, 28 steps, mid-size random SD3 folder
    python bench/gpu_bench.py --family flux --smoke   # CPU, fp32, a tiny size: checks the script itself
    python bench/gpu_bench.py --summary --out DIR     # gpu_bench_*.json of DIR -> summary.md + summary.json

Transformers (sd3, flux): milliseconds per forward (one sampling step at batch 1, 1024^2 images) and the
achieved TFLOP/s: the matmul and attention FLOPs of one forward, counted from the config (``sd3_flops``,
``flux_flops``; ``--smoke`` checks both against torch's FlopCounterMode), over the measured time, also as a
share of the H200's 989 TFLOP/s dense bf16 peak. Both models hold the same random weights (ours loaded from
diffusers' state dict) and their outputs are compared before timing (fp32: relative error < 1e-4 or stop;
bf16: < 5e-2, else a warning and a mark in the results). Timings are medians of ``--steps`` forwards, ours
and diffusers interleaved. ``--compile regional`` (default) compiles each block separately (identical blocks
share one compiled graph); ``--compile full`` compiles the whole model.

Pipeline: seconds per image of our TextToImagePipeline and diffusers' StableDiffusion3Pipeline on the same
folder (median of ``--repeats``, interleaved, after a warm-up that also compares the images). The mid-size
components are built here from tests/components.py's builders; the smoke run uses bench/pipeline.py's tiny
SD3 set. Progress lines carry the UTC time and the seconds since start; with ``--out`` (default $OUT) the
results go to gpu_bench_<family>[_smoke].json.

Estimated full run on an H200 (not yet measured): per transformer case well under a minute of timing plus
the regional compile of two block types for each model; the pipeline case about half a minute.
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

    Per joint block and stream of n tokens: qkv 6 n D^2, output projection 2 n D^2, MLP 16 n D^2; the joint
    attention 4 N^2 D over N = n_img + n_txt; an MMDiT-X block adds an image-only attention (8 n D^2 +
    4 n_img^2 D). The last block's text stream only supplies keys and values (4 n_txt D^2) and only image
    queries attend (4 n_img N D): its text outputs are discarded, and ours skips them (diffusers computes
    them; both are credited with this useful work). Plus the embedders, the modulations and the final layer.
    """
    D, N = c.hidden_size, n_img + n_txt
    p2c = c.patch_size**2
    flops = 2 * n_img * c.in_channels * p2c * D + 2 * n_txt * c.context_dim * D  # patch + context embedders
    flops += 2 * (256 * D + D * D + c.vec_dim * D + D * D)  # timestep and pooled-text MLPs (per sample)
    for i in range(c.depth):
        last = i == c.depth - 1
        flops += 24 * n_img * D * D + (4 if last else 24) * n_txt * D * D + 4 * (n_img if last else N) * N * D
        flops += 2 * D * D * ((9 if i in c.dual_attention_layers else 6) + (2 if last else 6))  # modulations
        if i in c.dual_attention_layers:
            flops += 8 * n_img * D * D + 4 * n_img * n_img * D
    flops += 2 * D * 2 * D + 2 * n_img * D * p2c * c.out_channels  # final layer
    return float(batch * flops)


def sd3_models(depth: int | None, smoke: bool, device: torch.device, dtype: torch.dtype):
    """(ours, diffusers, inputs, flops) for the SD3-medium shape (or a tiny one with ``smoke``)."""
    from diffusers import SD3Transformer2DModel

    from mmdit_flow.models.sd3 import SD3Config, SD3Transformer
    from mmdit_flow.weights.sd3_keys import config_to_diffusers, from_diffusers

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
    the timestep / guidance / pooled-text MLPs. Plus the image, text and output projections. The last single
    block's text rows only supply keys and values (2 n_txt D^2) and only image queries attend (2 n_img N D):
    their outputs are discarded, and ours skips them (both implementations are credited with this work).
    """
    D, N, M = c.hidden_size, n_img + n_txt, int(4 * c.hidden_size)
    macs = n_img * 4 * c.in_channels * D + n_txt * c.context_dim * D  # img_in on packed 2x2 patches, txt_in
    macs += (256 * D + D * D) * (2 if c.guidance_embed else 1) + c.vec_dim * D + D * D  # time/guidance/vec
    macs += c.depth * (N * (3 * D * D + D * D + 2 * D * M) + 2 * 6 * D * D + 2 * N * N * D)
    single = N * (D * (3 * D + M) + (D + M) * D) + 3 * D * D + 2 * N * N * D
    last_single = n_img * (D * (3 * D + M) + (D + M) * D) + n_txt * 2 * D * D + 3 * D * D + 2 * n_img * N * D
    macs += (c.depth_single - 1) * single + last_single if c.depth_single else 0
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

    from mmdit_flow.models.flux import PRESETS, FluxTransformer, position_ids
    from mmdit_flow.weights.flux_keys import config_to_diffusers, from_diffusers

    if smoke:
        from flux_transformer_case import SIZES  # bench/flux_transformer_case.py, the CPU benchmark's sizes

        config, size = SIZES["tiny"]
        latent, n_txt = size["height"], size["txt_len"]
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


def log(message: str) -> None:
    """A progress line with the UTC time and the seconds since the script started."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"[{stamp} +{time.perf_counter() - _START:5.0f}s] {message}", flush=True)


_START = time.perf_counter()


def sd3_pipeline_components(smoke: bool) -> tuple[dict, int]:
    """(components of ``StableDiffusion3Pipeline``, image size): bench/pipeline.py's tiny set with ``smoke``,
    else a mid-size random set at 512^2 built offline (about 0.3 B parameters).

    Mid-size: SD3-layout transformer with 12 joint blocks of width 768 (12 heads of 64) over 32x32 patches of
    16-channel 64x64 latents; a 4-level AutoencoderKL (8x, widths 64-128-256-256, 16 latent channels, no
    quant convs, as SD3's); 3-layer CLIP-L (768) and CLIP-G (1280) and a 2-layer T5 of width 2048 (the
    joint-attention width: the CLIP pair, 768 + 1280, is zero-padded to it, as in SD3).
    """
    import pipeline as cpu_bench  # bench/pipeline.py, which also puts tests/ on the path for components

    if smoke:
        build, size, _ = cpu_bench.CASES["sd3-tiny"]
        return build(), size
    from components import _randomize, clip_encoder, clip_tokenizer, t5_encoder, t5_tokenizer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tok_l, tok_g, tok_t5 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=12,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=2048,
        caption_projection_dim=768,
        pooled_projection_dim=2048,  # CLIP-L projection (768) + CLIP-G projection (1280)
        pos_embed_max_size=96,
    )
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=False,  # both pipelines decode in the run dtype
    ).eval()
    components = {
        "transformer": _randomize(transformer, 1, scale=0.02),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae,
        "text_encoder": clip_encoder(tok_l, hidden=768, projection=768, seed=3),
        "text_encoder_2": clip_encoder(tok_g, hidden=1280, projection=1280, seed=4),
        "text_encoder_3": t5_encoder(tok_t5, d_model=2048, seed=5),
        "tokenizer": tok_l,
        "tokenizer_2": tok_g,
        "tokenizer_3": tok_t5,
    }
    return components, 512


def pipeline_bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """End-to-end seconds per image (encode, sample with CFG, decode): our TextToImagePipeline vs diffusers'
    StableDiffusion3Pipeline loading the same folder; interleaved runs, median, after one warm-up each."""
    import tempfile
    from pathlib import Path

    import pipeline as cpu_bench  # bench/pipeline.py
    from diffusers import StableDiffusion3Pipeline

    from mmdit_flow.pipelines import TextToImagePipeline

    log("building the SD3 pipeline components")
    components, size = sd3_pipeline_components(args.smoke)
    steps = args.pipeline_steps or (2 if args.smoke else 28)
    repeats = min(args.repeats, 2) if args.smoke else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        folder = cpu_bench.save_diffusers_folder(components, Path(tmp) / "sd3")
        del components
        log(f"loading both pipelines ({device}, {dtype})")
        ours = TextToImagePipeline.from_pretrained(folder, device=device, dtype=dtype)
        ref = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype).to(device)
    ref.set_progress_bar_config(disable=True)
    prompt = ["a photo of a red cat on a blue mat"]
    common = {"height": size, "width": size, "max_sequence_length": 256}

    def run_ours():
        return ours(prompt, steps=steps, guidance=7.0, seed=0, output="np", progress=False, **common)

    def run_ref():
        gen = torch.Generator(device).manual_seed(0)
        return ref(
            prompt, num_inference_steps=steps, guidance_scale=7.0, generator=gen, output_type="np", **common
        ).images

    log(f"warm-up and image check: {size}^2, {steps} steps, CFG 7")
    with torch.no_grad():
        diff = float(abs(run_ours() - run_ref()).max())
    if dtype == torch.float32 and diff > 1e-3:
        raise SystemExit(f"our images and diffusers' differ by {diff:.2e} in fp32")
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for i in range(repeats):
        for name, fn in list((("ours", run_ours), ("diffusers", run_ref)))[:: 1 if i % 2 == 0 else -1]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    log(
        f"pipeline {size}^2 {steps} steps: ours {o:.3f} s/img, diffusers {d:.3f} s/img, "
        f"speed-up {d / o:.2f}x, max |image diff| {diff:.1e} (median of {repeats})"
    )
    return {
        "family": "pipeline",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "image_size": size,
        "steps": steps,
        "cfg": 7.0,
        "max_image_diff": diff,
        "runs": [
            {"mode": "end-to-end", "impl": "ours", "s_per_image": o},
            {"mode": "end-to-end", "impl": "diffusers", "s_per_image": d},
        ],
    }


def transformer_bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """ms per forward and TFLOP/s, eager and compiled, ours vs diffusers, for ``args.family``."""
    log(f"building the {args.family} models ({device}, {dtype})")
    models, blocks, flops, config = FAMILIES[args.family](args.depth, args.smoke, device, dtype)
    with torch.no_grad():
        out_ours, out_theirs = (run(model).float() for model, run in models.values())
    err = ((out_ours - out_theirs).norm() / out_theirs.norm()).item()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not err < tolerance:
        message = f"ours and diffusers disagree: relative error {err:.3e} > {tolerance}"
        if dtype == torch.float32:
            raise SystemExit(message)
        log(f"WARNING: {message} (bf16; timing anyway, the result is marked)")

    if args.smoke:  # the FLOP formula against torch's count (norms and pointwise ops are not counted there)
        counted = counted_flops(*models["ours"])
        log(f"FLOPs per forward: formula {flops:.6g}, FlopCounterMode {counted:.6g}")
        if abs(flops - counted) > 1e-3 * counted:
            raise SystemExit(f"the {args.family} FLOP formula is off: {flops:.6g} vs counted {counted:.6g}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = f"{args.family} depth {config.depth} hidden {config.hidden_size}"
    log(f"{shape}, {dtype}, {name}, torch {torch.__version__}")
    log(f"forward: {flops / 1e12:.2f} TFLOP; ours vs diffusers relative error {err:.2e}")
    results = {
        "family": args.family,
        "device": name,
        "dtype": str(dtype),
        "config": dataclasses.asdict(config),
    }
    results.update(tflop_per_forward=flops / 1e12, relative_error=err, parity_ok=err < tolerance, runs=[])
    modes = ["eager"] + ([] if args.compile == "none" else [f"compile-{args.compile}"])
    for mode in modes:
        log(f"timing {mode}: {args.warmup} warm-up + {args.steps} forwards each")
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
            log(f"{mode:16} {impl:9} {value:9.2f} ms  {tflops:7.1f} TFLOP/s  {share:5.1f}% of peak")
        speedup = ms["diffusers"] / ms["ours"]
        log(f"{mode:16} speedup ours/diffusers {speedup:.2f}x  ({setup_s:.0f} s incl. compile and warmup)")
    return results


def summarize(folder: str) -> str:
    """Collect the gpu_bench_*.json files of ``folder`` into summary.json and a markdown table summary.md."""
    import glob

    results = []
    for path in sorted(glob.glob(os.path.join(folder, "gpu_bench_*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    lines = ["| case | mode | ours | diffusers | speed-up | ours TFLOP/s (% peak) | diffusers TFLOP/s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        by_mode: dict[str, dict[str, dict]] = {}
        for row in r["runs"]:
            by_mode.setdefault(row["mode"], {})[row["impl"]] = row
        for mode, rows in by_mode.items():
            o, d = rows["ours"], rows["diffusers"]
            case = f"{r['family']} ({r['dtype'].replace('torch.', '')}, {r['device']})"
            if "ms" in o:
                lines.append(
                    f"| {case} | {mode} | {o['ms']:.1f} ms | {d['ms']:.1f} ms | {d['ms'] / o['ms']:.2f}x | "
                    f"{o['tflops']:.0f} ({100 * o['peak_share']:.0f}%) | {d['tflops']:.0f} |"
                )
            else:
                o_s, d_s = o["s_per_image"], d["s_per_image"]
                lines.append(
                    f"| {case}, {r['image_size']}^2, {r['steps']} steps | {mode} | {o_s:.3f} s/img"
                    f" | {d_s:.3f} s/img | {d_s / o_s:.2f}x | | |"
                )
        if "relative_error" in r:
            ok = "" if r.get("parity_ok", True) else " (ABOVE TOLERANCE)"
            lines.append(f"| {r['family']} parity | | relative error {r['relative_error']:.2e}{ok} | | | | |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(f"GPU benchmark, peak = {PEAK_TFLOPS:.0f} TFLOP/s dense bf16\n\n" + table)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES) + ["pipeline"], default="sd3")
    parser.add_argument("--smoke", action="store_true", help="tiny size, CPU, fp32: checks the script only")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--steps", type=int, default=10, help="timed forwards per model and mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", choices=("regional", "full", "none"), default="regional")
    parser.add_argument("--pipeline-steps", type=int, default=None, help="sampling steps (default 28)")
    parser.add_argument("--repeats", type=int, default=5, help="timed images per pipeline")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON results ($OUT)")
    parser.add_argument("--summary", action="store_true", help="only collect --out's JSON files into a table")
    args = parser.parse_args(argv)
    if args.summary:
        if not args.out:
            raise SystemExit("--summary needs --out (or $OUT): the folder holding the gpu_bench_*.json files")
        print(summarize(args.out), end="")
        return
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.steps, args.warmup = min(args.steps, 3), 1
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")

    if args.family == "pipeline":
        results = pipeline_bench(args, device, dtype)
    else:
        results = transformer_bench(args, device, dtype)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gpu_bench_{args.family}{'_smoke' if args.smoke else ''}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
