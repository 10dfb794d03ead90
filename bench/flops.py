"""FLOPs of one transformer forward, counted from the config: the numerator of every TFLOP/s figure here.

Two per multiply-add; matmuls and attention only (norms, RoPE and pointwise ops are left out, as is usual for
model FLOP counts). ``counted_flops`` is torch's own count of the same forward (``FlopCounterMode``, with the
plain-matmul attention backend so that attention is counted as the two matmuls the formulas assume);
tests/test_bench_flops.py and ``gpu_bench.py --smoke`` hold the formulas to it, so that a formula cannot go
stale unnoticed when a model learns to skip work.
"""

from __future__ import annotations

from typing import Any

import torch


def sd3_flops(c: Any, n_img: int, n_txt: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one SD3 forward (``c`` an ``SD3Config``).

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


def flux_flops(c: Any, n_img: int, n_txt: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one Flux forward (``c`` a ``FluxConfig``).

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


FORMULAS = {"sd3": sd3_flops, "flux": flux_flops}


def forward_flops(case: Any) -> float:
    """The formula's FLOPs of one forward of a ``cases.Case`` on its inputs."""
    return FORMULAS[case.family](case.config, case.n_img, case.n_txt, batch=case.batch)


def counted_flops(case: Any) -> int:
    """FLOPs of our model's forward on the case's inputs as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = case.ours
    backend, model.attention_backend = model.attention_backend, "reference"
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            case.run("ours")
    finally:
        model.attention_backend = backend
    return counter.get_total_flops()
