"""VAE tiling changes nothing but seams and statistics (RELIABILITY item 6): ``pipe.set_vae_tiling()`` gives
the same images within a stated tolerance, and the tiled decoder really runs.

diffusers' tiled decode cuts the latent into overlapping tiles, decodes each alone and blends the overlaps
linearly. It is not bit-exact: every tile has its own GroupNorm statistics and its own mid-block attention
(both see the whole latent when untiled), so each tile's pixels shift a little; the blending hides the seams.
On a trained VAE that is invisible; on a random one the statistics of a tile differ from those of the image
by sampling noise, which shrinks as tiles grow (measured on this VAE: the mean |difference| halves from tiles
of a quarter to tiles of half the latent side). The test uses tiles of half the latent side (3 x 3 tiles with
a quarter overlap), the share of the image a tile covers when SD3's VAE (1024 px tiles) decodes a 2048 px
image.
"""

from __future__ import annotations

import torch
from components import flux_components, save_diffusers_folder

from mmdit_flow.pipelines import TextToImagePipeline

SIZE = 128  # pixels: 64x64 latents (the tiny VAE halves the size)
TILE = 32  # latent pixels per tile (64 image pixels): tiles start at 0, 24, 48 -> 3 x 3 tiles
# Measured with these components (CPU, fp32, seed 0): max |tiled - untiled| = 0.059, mean 0.0048 on [0, 1]
# images. Thresholds: those with a ~20 % margin. A broken tiled path (tiles misplaced, not blended, the latent
# scaling or shift skipped) moves pixels by about the image's own spread: seeds 0 and 1 differ by a mean of
# 0.088, 18x the tiling difference.
MAX_DIFF, MEAN_DIFF = 0.07, 0.006


def test_vae_tiling_gives_the_same_images_within_tolerance(tmp_path):
    folder = save_diffusers_folder(flux_components(), tmp_path / "flux")
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    vae = pipe.codec.vae
    vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = TILE, 2 * TILE, 0.25
    decoder_calls = []
    vae.decoder.register_forward_hook(lambda module, args, out: decoder_calls.append(args[0].shape[-1]))

    def generate(seed: int) -> torch.Tensor:
        decoder_calls.clear()
        kwargs = dict(steps=2, seed=seed, height=SIZE, width=SIZE, output="pt", progress=False)
        return pipe("a photo of a red cat", **kwargs)

    plain = generate(0)
    assert decoder_calls == [SIZE // 2]  # one decode of the whole latent
    other_seed = generate(1)
    pipe.set_vae_tiling()
    tiled = generate(0)
    # the tiled path ran: nine decodes of 32-latent tiles (the last row and column are cut at the border)
    assert decoder_calls == [TILE, TILE, SIZE // 2 - 48] * 3
    pipe.set_vae_tiling(False)
    assert torch.equal(generate(0), plain)  # and switching it off restores the plain decode

    diff = (tiled - plain).abs()
    assert tiled.shape == plain.shape == (1, 3, SIZE, SIZE)
    assert diff.max() > 1e-3  # per-tile statistics do move pixels: identical images would mean no tiling
    assert diff.max() < MAX_DIFF, f"max |tiled - untiled| = {diff.max():.4f}"
    assert diff.mean() < MEAN_DIFF, f"mean |tiled - untiled| = {diff.mean():.5f}"
    # relative to a real change of image: another seed is more than 10x further away
    assert (other_seed - plain).abs().mean() > 10 * diff.mean()
