"""Latent bits per dimension of the shipped tiny-shapes models on training and held-out images.

Scenes are rendered (``shapes.render``) from the first ``--n`` training scenes (those the model was trained
on: ``ship.TRAIN_IMAGES`` scenes of seed 0, the training split) and the first ``--n`` held-out scenes (each
holds a colour-shape pair never seen in training), encoded through each model's VAE posterior mean, and
scored under each model's transformer at guidance 1 with their own captions
(``mmdit_flow.pipelines.likelihood.latent_likelihood``: adaptive Dormand-Prince at ``--tol``, Hutchinson with
``--probes`` Rademacher probes). Reported per model and split: mean bits/dim with its standard error over
images, the mean Hutchinson standard error of one image, function evaluations and seconds; and the paired
difference of each model to the first on the same latents. ``--bound`` adds the upper bound on the images'
own bits/dim (``image_bound``: ELBO with the VAE posterior, 2 draws, a discretized Gaussian decoder of std
``--pixel-sigma``).

    OMP_NUM_THREADS=1 python bench/likelihood.py --n 16
    OMP_NUM_THREADS=1 python bench/likelihood.py --model teacher=weights/tiny-shapes --tol 1e-4

Bits/dim of continuous latents can be negative (a density above 1); they compare models and splits on the
same latents, not with pixel bits/dim.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mmdit_flow.pipelines import TextToImagePipeline
from mmdit_flow.pipelines.likelihood import encode_images, image_bound, latent_likelihood
from mmdit_flow.training.recipes.tiny_shapes import shapes, ship

MODELS = ["teacher=weights/tiny-shapes", "turbo=weights/tiny-shapes-turbo"]


def scenes(split: str, n: int) -> list:
    if split == "train":
        return shapes.sample_scenes(
            ship.TRAIN_IMAGES, seed=0, split="train", two_object_share=ship.TWO_OBJECT_SHARE
        )[:n]
    return shapes.heldout_scenes(n)


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="NAME=FOLDER (default: both shipped)")
    parser.add_argument("--n", type=int, default=16, help="images per split (default: 16)")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the solve (default: 1e-3)")
    parser.add_argument("--probes", type=int, default=4, help="Hutchinson probes (default: 4)")
    parser.add_argument("--bound", action="store_true", help="also the upper bound on image bits/dim")
    parser.add_argument(
        "--pixel-sigma", type=float, default=0.03, help="--bound: decoder std (default: 0.03)"
    )
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args()
    models = [m.split("=", 1) for m in (args.model or MODELS)]
    splits = {s: scenes(s, args.n) for s in ("train", "heldout")}
    images = {
        s: torch.stack([torch.from_numpy(shapes.render(x)) for x in sc]).permute(0, 3, 1, 2) / 255
        for s, sc in splits.items()
    }
    rows, bits = [], {}
    for name, folder in models:
        pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
        for split, sc in splits.items():
            z = encode_images(pipe, images[split])
            start = time.perf_counter()
            r = latent_likelihood(
                pipe, z, [shapes.caption(x) for x in sc], probes=args.probes, rtol=args.tol, atol=args.tol
            )
            seconds = time.perf_counter() - start
            b = r.bits_per_dim()
            bits[name, split] = b
            m, se = mean_se(b)
            bound = {}
            if args.bound:
                ib = image_bound(
                    pipe,
                    images[split],
                    [shapes.caption(x) for x in sc],
                    pixel_sigma=args.pixel_sigma,
                    probes=args.probes,
                    rtol=args.tol,
                    atol=args.tol,
                )
                bm, bse = mean_se(ib.bits_per_dim)
                bound = {
                    "image_bound": bm,
                    "image_bound_se": bse,
                    "reconstruction": ib.reconstruction_bits.mean().item(),
                }
            rows.append(
                {
                    **bound,
                    "model": name,
                    "split": split,
                    "bits_per_dim": m,
                    "se_over_images": se,
                    "hutchinson_se": r.bits_stderr().mean().item(),
                    "nfe": r.nfe,
                    "seconds": seconds,
                }
            )
    print(
        f"latent bits/dim (D = 16 x 16 x 16; n = {args.n} per split; rtol = atol = {args.tol:g}; "
        f"{args.probes} Rademacher probes)\n"
    )
    print("| model | split | bits/dim (+- se over images) | Hutchinson se per image | NFE | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['split']} | {r['bits_per_dim']:.3f} +- {r['se_over_images']:.3f} | "
            f"{r['hutchinson_se']:.4f} | {r['nfe']} | {r['seconds']:.0f} |"
        )
    if args.bound:
        print(f"\nimage bits/dim, upper bound (D = 3 x 64 x 64; pixel_sigma {args.pixel_sigma:g})\n")
        print("| model | split | bound (+- se over images) | reconstruction term |")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['model']} | {r['split']} | {r['image_bound']:.3f} +- {r['image_bound_se']:.3f} | "
                f"{r['reconstruction']:.3f} |"
            )
    print("\n| difference | bits/dim +- se |")
    print("|---|---|")
    first = models[0][0]
    for name, _ in models:
        (mh, seh), (mt, set_) = mean_se(bits[name, "heldout"]), mean_se(bits[name, "train"])
        se = math.hypot(seh, set_)
        print(f"| {name}: held-out - train (different images) | {mh - mt:+.3f} +- {se:.3f} |")
        if name != first:  # paired: the same latents
            for split in splits:
                m, se = mean_se(bits[name, split] - bits[first, split])
                print(f"| {name} - {first}, {split} | {m:+.3f} +- {se:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
