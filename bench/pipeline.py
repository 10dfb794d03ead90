"""Seconds per image end to end (prompt encoding, sampling, VAE decoding): our pipeline vs diffusers'
StableDiffusion3Pipeline / FluxPipeline on the same random components, on the CPU, in one run.

    python bench/pipeline.py                 # tiny and small SD3 and Flux, 5 interleaved repeats
    python bench/pipeline.py --repeats 9 --steps 8

Both pipelines load the same diffusers folder (ours runs our transformer through load_transformer); runs are
interleaved (ours, diffusers, ours, ...) and the median is reported, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from components import flux_components, save_diffusers_folder, sd3_components  # noqa: E402


def small(components: dict) -> dict:
    """Swap in a bigger transformer (6 blocks, width 128) so that sampling dominates, as it does at scale."""
    from components import _randomize
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if "tokenizer_3" in components:
        model = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=48,
            caption_projection_dim=128,
            pooled_projection_dim=24,
            pos_embed_max_size=32,
        )
        components["transformer"] = _randomize(model, 1, scale=0.04)
    else:
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),
        )
        components["transformer"] = _randomize(model, 1, scale=0.04)
    return components


CASES = {  # name -> (components builder, image size, guidance)
    "sd3-tiny": (lambda: sd3_components(), 32, 5.0),
    "flux-tiny": (lambda: flux_components(), 32, 3.5),
    "sd3-small": (lambda: small(sd3_components()), 64, 5.0),
    "flux-small": (lambda: small(flux_components()), 64, 3.5),
}


def bench_case(name: str, steps: int, repeats: int, images: int) -> tuple[float, float]:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from mmdit_flow.pipelines import TextToImagePipeline

    build, size, guidance = CASES[name]
    folder = save_diffusers_folder(build(), Path(tempfile.mkdtemp()) / name)
    ours = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ref = (StableDiffusion3Pipeline if name.startswith("sd3") else FluxPipeline).from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    prompt = ["a photo of a red cat on a blue mat"]
    common = {"height": size, "width": size, "max_sequence_length": 64}

    def run_ours():
        return ours(
            prompt,
            steps=steps,
            guidance=guidance,
            seed=0,
            num_images=images,
            output="np",
            progress=False,
            **common,
        )

    def run_ref():
        gen = torch.Generator().manual_seed(0)
        return ref(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            num_images_per_prompt=images,
            output_type="np",
            **common,
        ).images

    diff = abs(run_ours() - run_ref()).max()  # warm-up, and the check that both make the same images
    times = {"ours": [], "diffusers": []}
    for _ in range(repeats):
        for label, fn in (("ours", run_ours), ("diffusers", run_ref)):
            start = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - start) / images)
    o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(
        f"{name:11s} {size:4d}px  ours {o * 1e3:8.1f} ms/img  diffusers {d * 1e3:8.1f} ms/img  "
        f"speed-up {d / o:5.2f}x  max|diff| {diff:.1e}",
        flush=True,
    )
    return o, d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
        f"{args.images} images per call, median of {args.repeats} interleaved repeats"
    )
    for name in args.cases:
        bench_case(name, args.steps, args.repeats, args.images)


if __name__ == "__main__":
    main()
