"""bench/timing.py, the interleaved timing protocol of every benchmark script: the order of each round,
what is timed and how often, and the ratio's interval."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def timing(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import timing

    return timing


def test_round_order_alternates_and_shuffles(timing):
    names = ["a", "b", "c"]
    assert [timing.round_order(names, r) for r in range(3)] == [names, ["c", "b", "a"], names]
    rng = random.Random(0)
    shuffled = [timing.round_order(names, r, "random", rng) for r in range(20)]
    assert all(sorted(order) == names for order in shuffled)
    assert len({tuple(order) for order in shuffled}) > 1
    with pytest.raises(ValueError, match="alternate"):
        timing.round_order(names, 0, "sorted")


def test_interleaved_runs_warmup_then_alternating_rounds(timing):
    log: list[str] = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    result = timing.interleaved(fns, rounds=3, warmup=1, calls=2)
    # warm-up a b (once each), then rounds a a b b | b b a a | a a b b (calls=2 in a row)
    assert "".join(log) == "ab" + "aabb" + "bbaa" + "aabb"
    assert [len(result.samples(n, c)) for n in "ab" for c in ("wall", "cpu")] == [3, 3, 3, 3]
    assert all(s >= 0 for s in result.wall["a"] + result.cpu["b"])


def test_ratio_is_ratio_of_medians_with_an_interval(timing):
    t = timing.Timings(wall={"slow": [2.0, 2.2, 1.8, 2.1, 1.9], "fast": [1.0, 1.0, 1.0, 1.1, 0.9]})
    r = t.ratio("slow", "fast")
    assert r.value == pytest.approx(2.0 / 1.0)
    assert 1.6 <= r.low <= r.value <= r.high <= 2.5
    assert r.low < r.high
    assert str(r) == f"2.00x [{r.low:.2f}, {r.high:.2f}]"
    # one round: no spread to resample
    one = timing.Timings(wall={"a": [3.0], "b": [1.5]}).ratio("a", "b")
    assert (one.value, one.low, one.high) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="paired"):
        timing.Timings(wall={"a": [1.0, 2.0], "b": [1.0]}).ratio("a", "b")
    with pytest.raises(KeyError, match="timed: slow, fast"):
        t.median("missing")
