"""bench/'s shared pieces: the cases hold the same model twice, and the FLOP formulas (TFLOP/s on the GPU)
equal torch's count of our models' forward, so that gpu_bench.py's figures cannot go stale unnoticed when a
model learns to skip work."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    """bench/'s modules, imported as its scripts import them (their folder on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import cases
    import flops

    return cases, flops


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flop_formula_equals_flop_counter(family, bench):
    cases, flops = bench
    case = cases.build_case(family, "tiny")
    assert flops.forward_flops(case) == pytest.approx(flops.counted_flops(case), rel=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_case_sides_agree_and_are_not_trivial(family, bench):
    cases, _ = bench
    case = cases.build_case(family, "tiny")
    ours, theirs = case.run("ours"), case.run("diffusers")
    assert ours.shape == case.inputs.x.shape[:1] + (case.config.out_channels,) + case.inputs.x.shape[2:]
    assert ours.abs().mean() > 0.1  # random non-zero weights: diffusers' zero init would give v = 0
    assert case.relative_error() < 1e-5
    assert (ours - theirs).abs().max() < 1e-4
