"""The FLOP formulas of bench/gpu_bench.py (TFLOP/s on the GPU) equal torch's count of our models' forward,
so the GPU script's --smoke check cannot go stale unnoticed when a model learns to skip work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flop_formula_equals_flop_counter(family, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_bench

    models, _, flops, _ = gpu_bench.FAMILIES[family](None, True, torch.device("cpu"), torch.float32)
    counted = gpu_bench.counted_flops(*models["ours"])
    assert flops == pytest.approx(counted, rel=1e-6)
