"""Step caching: reuse the transformer blocks' work of earlier sampling steps (lossy, off by default).

Neighbouring sampling steps feed the network nearly the same input, so most of what its block stack adds to
the image tokens changes little from one step to the next. Two policies skip the stack at some steps:

- ``FirstBlockCacheConfig(threshold)`` (first-block cache, as ParaAttention's and diffusers'): every forward
  runs the first block; when the residual it adds to the image tokens differs from that of the last full
  forward by less than ``threshold`` (relative mean absolute change), the remaining blocks are skipped and
  the residual they added at that forward is added instead. The decision adapts to the trajectory: many
  skips where the field is smooth, none where it changes.
- ``TaylorSeerCacheConfig(interval, order, warmup)`` (TaylorSeer-style, Liu et al. 2025): the first
  ``warmup`` forwards run in full, then one in every ``interval``; in between, the residual of the whole
  stack (image tokens after the last block minus those entering the first) is extrapolated in t by the
  polynomial of degree ``order`` through the last ``order + 1`` full forwards (Newton's divided
  differences; order 0 reuses the last full forward's residual as it is), and no block runs. The variable
  is t, not the step index: shifted grids are far from uniform in t.

Glossary: ``head`` the first block, ``tail`` the blocks after it; ``probe`` the residual the head adds to
the image tokens; a "full" forward runs every block.

Rules shared by both:

- One decision per forward for the whole batch. Classifier-free guidance runs cond and uncond in one
  batched forward, and they are cached together: each row keeps its own residuals, and the first-block rule
  skips only when *every* row (each image's cond and uncond alike) is within the threshold of its own
  reference, so no image is reused past the threshold because others in its batch changed little. Skipping
  part of a batch would run the tail on a sub-batch of a new shape (a new graph under torch.compile).
- Only the image tokens' residual is kept: both families' final layers read the image tokens alone.
- The state belongs to one trajectory. ``reset()`` clears it (the pipeline calls it at the start of every
  call), and a forward whose batch, token count, dtype or device differs from the last one's, or whose t is
  later than the last forward's (sampling runs t from 1 down to 0, so a new trajectory starts), resets it
  by itself. Residuals are stored detached.
- ``stats`` counts forwards and block evaluations run and skipped since the last reset.
- Caching is for sampling, which runs without gradients (the pipeline's call): a forward that records
  gradients (training, the likelihood's divergence) runs every block and leaves the state alone.

Models take the cache through ``StepCacheMixin``: ``model.enable_cache(config)``, ``model.disable_cache()``
(diffusers' names); with no cache the forward is the plain loop, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_ORDER = 3  # extrapolating further from noisy residuals only amplifies their noise


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """Skip the blocks after the first when the first block's residual changed by less than ``threshold``
    (mean |r - r_ref| / mean |r_ref| per row, r_ref from the last full forward). 0 never skips; ``math.inf``
    runs the other blocks at the first forward only."""

    threshold: float = 0.1

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t) or t < 0:
            raise ValueError(
                "step cache threshold must be a number >= 0 (0 caches nothing, inf reuses the first step's "
                f"blocks at every later step; 0.05-0.2 is usual), got {t!r}"
            )


@dataclass(frozen=True)
class TaylorSeerCacheConfig:
    """Run the first ``warmup`` forwards and then one in ``interval`` in full; extrapolate the stack's
    residual in t (degree ``order``) at the others. ``interval=1`` never skips.

    The default order is 0 (reuse) because on the shipped model a linear extrapolation was no better at
    interval 2 or 3 and much worse at 4, and a quadratic one worse everywhere (docs/quality.md)."""

    interval: int = 3
    order: int = 0
    warmup: int = 2

    def __post_init__(self) -> None:
        for name, low in (("interval", 1), ("order", 0), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TaylorSeerCacheConfig.{name} must be an int >= {low}, got {value!r}")
        if self.order > MAX_ORDER:
            raise ValueError(f"TaylorSeerCacheConfig.order must be at most {MAX_ORDER}, got {self.order}")


CacheConfig = FirstBlockCacheConfig | TaylorSeerCacheConfig
Head = Callable[..., tuple]  # head(img, *streams) -> (img, *streams) after the first block
Tail = Callable[..., torch.Tensor]  # tail(img, *streams) -> the image tokens after the last block


@dataclass
class CacheStats:
    """What the cache did since its last reset."""

    forwards: int = 0  # model evaluations
    full: int = 0  # of them, with every block run
    blocks_run: int = 0  # block evaluations (one block over the whole batch counts once)
    blocks_skipped: int = 0
    # first-block rule: the largest row's change at each forward after the first
    changes: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        total = self.blocks_run + self.blocks_skipped
        share = self.blocks_skipped / total if total else 0.0
        return (
            f"step cache: skipped {self.blocks_skipped} of {total} block evaluations ({share:.0%}); "
            f"{self.full} of {self.forwards} forwards ran every block"
        )


class StepCache:
    """The state and policy of one model's step cache; called by the model's forward (see the module doc)."""

    def __init__(self, config: CacheConfig, blocks: int):
        if not isinstance(config, FirstBlockCacheConfig | TaylorSeerCacheConfig):
            raise TypeError(
                "step cache config must be a FirstBlockCacheConfig or TaylorSeerCacheConfig, got "
                f"{type(config).__name__}"
            )
        self.config, self.blocks = config, blocks
        self.reset()

    def reset(self) -> None:
        """Forget the trajectory: the next forward runs every block."""
        self.stats = CacheStats()
        self._key: tuple | None = None  # (shape, dtype, device) of the image tokens
        self._t_last: torch.Tensor | None = None  # [B] t of the last forward
        # first-block rule: the head's residual at the last full forward, and the tail's there
        self._probe_ref: torch.Tensor | None = None
        self._tail_residual: torch.Tensor | None = None
        # TaylorSeer: (t [B, 1, 1], stack residual) of the last full forwards, newest first, and the
        # Newton coefficients over them
        self._nodes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._coefficients: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor, img: torch.Tensor, *streams: torch.Tensor, head: Head, tail: Tail):
        """The image tokens after the block stack, for image tokens ``img`` [B, N, D] entering it at times
        ``t`` [B] and the other streams the blocks take (Flux's and SD3's text tokens)."""
        if torch.is_grad_enabled():  # training, likelihoods: the exact field, and the state left alone
            return tail(*head(img, *streams))
        self._begin(t, img)
        self.stats.forwards += 1
        if isinstance(self.config, FirstBlockCacheConfig):
            return self._first_block(img, streams, head, tail)
        return self._taylor(t, img, streams, head, tail)

    # ------------------------------------------------------------------------------------- trajectory

    @torch.compiler.disable
    def _begin(self, t: torch.Tensor, img: torch.Tensor) -> None:
        """Reset when this forward cannot continue the stored trajectory."""
        key = (tuple(img.shape), img.dtype, img.device)
        t = t.detach().to(torch.float32)
        if key != self._key or self._t_last is None or bool((t > self._t_last).any()):
            self.reset()
            self._key = key
        self._t_last = t

    def _full(self, skipped: int = 0) -> None:
        self.stats.full += skipped == 0
        self.stats.blocks_run += self.blocks - skipped
        self.stats.blocks_skipped += skipped

    # ------------------------------------------------------------------------------------- first block

    def _first_block(self, img: torch.Tensor, streams: tuple, head: Head, tail: Tail) -> torch.Tensor:
        after_head = head(img, *streams)
        first = after_head[0]
        probe = first - img
        if self._reuse(probe):
            self._full(skipped=self.blocks - 1)
            return first + self._tail_residual
        out = tail(*after_head)
        self._full()
        self._probe_ref, self._tail_residual = probe.detach(), (out - first).detach()
        return out

    @torch.compiler.disable
    def _reuse(self, probe: torch.Tensor) -> bool:
        """Whether every row's head residual is within the threshold of its reference (relative L1)."""
        if self._probe_ref is None:
            return False
        dims = tuple(range(1, probe.ndim))
        ref = self._probe_ref.to(torch.float32)
        change = (probe.to(torch.float32) - ref).abs().mean(dims) / ref.abs().mean(dims)  # [B]
        worst = float(change.max())  # nan (a zero reference) compares False: the blocks run
        self.stats.changes.append(worst)
        return worst < self.config.threshold

    # ------------------------------------------------------------------------------------- TaylorSeer

    def _taylor(self, t: torch.Tensor, img: torch.Tensor, streams: tuple, head: Head, tail: Tail):
        c = self.config
        k = self.stats.forwards - 1  # this forward's index in the trajectory (stats reset with it)
        if k < c.warmup or (k - c.warmup) % c.interval == 0 or not self._nodes:
            out = tail(*head(img, *streams))
            self._full()
            self._add_node(t, (out - img).detach())
            return out
        self._full(skipped=self.blocks)
        return img + self._extrapolate(t).to(img.dtype)

    def _add_node(self, t: torch.Tensor, residual: torch.Tensor) -> None:
        """Keep the last order + 1 full forwards (a repeated t replaces its node: Heun and RK4 evaluate twice
        at one time) and their divided differences: coefficient j is f[t_0, ..., t_j], t_0 the newest."""
        dtype = torch.promote_types(residual.dtype, torch.float32)  # differences of bf16 residuals in fp32
        tt = t.detach().to(dtype).view(-1, *[1] * (residual.ndim - 1))  # [B, 1, 1]
        if self._nodes and bool((self._nodes[0][0] == tt).all()):
            self._nodes.pop(0)
        self._nodes = [(tt, residual.to(dtype))] + self._nodes[: self.config.order]
        # the table's top row: f[t_0], f[t_0, t_1], ...; built from the bottom of the Newton triangle
        column = [f for _, f in self._nodes]
        times = [s for s, _ in self._nodes]
        coefficients = [column[0]]
        for j in range(1, len(column)):
            column = [(column[i] - column[i + 1]) / (times[i] - times[i + j]) for i in range(len(column) - 1)]
            coefficients.append(column[0])
        self._coefficients = coefficients

    def _extrapolate(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) = f[t_0] + f[t_0, t_1] (t - t_0) + f[t_0, t_1, t_2] (t - t_0)(t - t_1) + ..."""
        tt = t.detach().to(self._nodes[0][0].dtype).view_as(self._nodes[0][0])
        value, product = self._coefficients[0], torch.ones_like(tt)
        for j in range(1, len(self._coefficients)):
            product = product * (tt - self._nodes[j - 1][0])
            value = value + self._coefficients[j] * product
        return value


class StepCacheMixin:
    """``enable_cache(config)`` / ``disable_cache()`` for a transformer whose block lists are named in
    ``cache_block_lists``; its forward calls ``self.step_cache`` when one is set."""

    cache_block_lists: tuple[str, ...] = ()
    step_cache: StepCache | None = None

    def enable_cache(self, config: CacheConfig) -> StepCache:
        """Turn step caching on (replacing any earlier cache); returns the cache, whose ``stats`` say what
        it skipped since the last reset."""
        counts = [len(getattr(self, name)) for name in self.cache_block_lists]
        if isinstance(config, FirstBlockCacheConfig) and (counts[0] < 1 or sum(counts) < 2):
            raise ValueError(
                f"the first-block cache needs a {self.cache_block_lists[0]} block and another after it; this "
                f"model has {dict(zip(self.cache_block_lists, counts, strict=True))} (use "
                "TaylorSeerCacheConfig instead)"
            )
        self.step_cache = StepCache(config, blocks=sum(counts))
        return self.step_cache

    def disable_cache(self) -> None:
        """Turn step caching off: the forward is the plain one again."""
        self.step_cache = None


def cache_config(threshold: float | None = None, config: CacheConfig | None = None) -> CacheConfig:
    """What ``enable_step_cache(threshold, config=...)`` asks for: the first-block cache at ``threshold``
    (default 0.1) or ``config``, not both."""
    if threshold is not None and config is not None:
        raise ValueError("pass either a first-block threshold or a config, not both")
    return config if config is not None else FirstBlockCacheConfig(0.1 if threshold is None else threshold)
