"""The timing protocol of every benchmark here: interleaved rounds, medians, and ratios with an interval.

These machines are shared and noisy, so two things are never timed one after the other. ``interleaved``
warms every entry up, then runs ``rounds`` rounds; each round calls every entry once (``calls`` times in a
row, averaged), in an order that changes from round to round: reversed every other round (``"alternate"``,
so that with two entries each goes first equally often) or shuffled with a seeded generator
(``"random"``). With ``device`` a CUDA device, the device is synchronised around every timed sample.

``Timings`` holds one sample per round and entry, in seconds per call, on two clocks: wall (``perf_counter``)
and the process's CPU time (``process_time``, the sum over its threads). ``Timings.ratio(a, b)`` is
median(a) / median(b) with a 95% bootstrap interval over rounds: rounds are resampled as wholes, so noise
that hit one round hits both entries of the resample alike. Scripts that measure a sample themselves (a
whole training run) take the order from ``round_order`` and fill a ``Timings`` directly.

    timings = interleaved({"ours": run_ours, "diffusers": run_theirs}, rounds=7, warmup=2)
    timings.median("ours"), timings.ratio("diffusers", "ours")   # seconds; the speed-up "1.23x [1.10, 1.31]"
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ORDERS = ("alternate", "random")
CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class Ratio:
    """median(a) / median(b) and its bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.2f}x [{self.low:.2f}, {self.high:.2f}]"


@dataclass
class Timings:
    """Seconds per call, one sample per round, per entry name and clock ("wall" | "cpu")."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def samples(self, name: str, clock: str = "wall") -> list[float]:
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; choose one of {', '.join(CLOCKS)}")
        per_name = getattr(self, clock)
        if name not in per_name:
            raise KeyError(f"no {clock} samples for {name!r}; timed: {', '.join(per_name) or 'nothing'}")
        return per_name[name]

    def median(self, name: str, clock: str = "wall") -> float:
        return statistics.median(self.samples(name, clock))

    def ratio(self, a: str, b: str, clock: str = "wall", *, resamples: int = 2000, seed: int = 0) -> Ratio:
        """median(a) / median(b), with the 2.5% and 97.5% quantiles of the same over resampled rounds."""
        xs, ys = self.samples(a, clock), self.samples(b, clock)
        if len(xs) != len(ys):
            raise ValueError(f"{a!r} has {len(xs)} samples and {b!r} {len(ys)}: a ratio needs paired rounds")
        value = statistics.median(xs) / statistics.median(ys)
        if len(xs) < 2:
            return Ratio(value, value, value)
        rng = random.Random(seed)
        n = len(xs)
        draws = []
        for _ in range(resamples):
            rounds = [rng.randrange(n) for _ in range(n)]
            draws.append(statistics.median(xs[i] for i in rounds) / statistics.median(ys[i] for i in rounds))
        draws.sort()
        return Ratio(value, draws[int(0.025 * (resamples - 1))], draws[int(0.975 * (resamples - 1))])


def round_order(names: Sequence[str], index: int, order: str = "alternate", rng: random.Random | None = None):
    """The entries in the order round ``index`` runs them: as given in even rounds and reversed in odd ones
    ("alternate"), or shuffled by ``rng`` ("random")."""
    if order == "alternate":
        return list(names) if index % 2 == 0 else list(reversed(names))
    if order == "random":
        shuffled = list(names)
        (rng or random.Random(index)).shuffle(shuffled)
        return shuffled
    raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")


def sync(device: Any = None) -> None:
    """Wait for a CUDA device's queued work (no-op for anything else): a timer must not stop before it."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    calls: int = 1,
    order: str = "alternate",
    device: Any = None,
    seed: int = 0,
) -> Timings:
    """Time each entry of ``fns`` in ``rounds`` interleaved rounds after ``warmup`` untimed ones."""
    if rounds < 1 or calls < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, calls >= 1 and warmup >= 0, got {rounds}, {calls}, {warmup}")
    names = list(fns)
    rng = random.Random(seed)
    for r in range(warmup):
        for name in round_order(names, r, order, rng):
            fns[name]()
    timings = Timings(wall={n: [] for n in names}, cpu={n: [] for n in names})
    for r in range(rounds):
        for name in round_order(names, r, order, rng):
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fns[name]()
            sync(device)
            timings.cpu[name].append((time.process_time() - cpu) / calls)
            timings.wall[name].append((time.perf_counter() - wall) / calls)
    return timings
