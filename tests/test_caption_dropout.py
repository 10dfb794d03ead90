"""Caption dropout draws: per encoder (``{encoder: p}`` / ``{all: p}``) and joint (``{joint: p}``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mmdit_flow.training.trainer import sample_draws

ENCODERS = ("clip_l", "clip_g", "t5")
SHAPE = (2, 4, 4)


def _objective(caption_dropout: dict[str, float]) -> SimpleNamespace:
    return SimpleNamespace(
        scheme="uniform", shift=1.0, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
        caption_dropout=caption_dropout,
    )  # fmt: skip


def _draw(caption_dropout: dict[str, float], n: int = 1500):
    return sample_draws(torch.arange(n), SHAPE, _objective(caption_dropout), ENCODERS)


def _rate_ok(rate: float, p: float, n: int) -> bool:
    """Within 4.5 binomial standard deviations of p (a false alarm about once in 150 000 runs)."""
    return abs(rate - p) <= 4.5 * (p * (1 - p) / n) ** 0.5


def test_joint_drops_all_encoders_together_at_its_rate():
    n, p = 1500, 0.1
    _, _, flags = _draw({"joint": p}, n)
    stacked = torch.stack([flags[e] for e in ENCODERS], dim=1)  # [n, E]
    assert torch.equal(stacked.all(dim=1), stacked.any(dim=1)), "a sample kept some encoders and lost others"
    assert _rate_ok(stacked[:, 0].float().mean().item(), p, n)


def test_per_encoder_dropout_is_independent_and_joint_adds_to_it():
    n = 1500
    _, _, alone = _draw({"all": 0.4}, n)
    _, _, both = _draw({"all": 0.4, "joint": 0.5}, n)
    for e in ENCODERS:
        assert _rate_ok(alone[e].float().mean().item(), 0.4, n)
        assert bool((both[e] | ~alone[e]).all()), "joint dropout must only add drops to the per-encoder ones"
        assert _rate_ok(both[e].float().mean().item(), 1 - 0.6 * 0.5, n)
    all_three = alone["clip_l"] & alone["clip_g"] & alone["t5"]
    assert _rate_ok(all_three.float().mean().item(), 0.4**3, n)  # independent: 6.4 %, not 40 %


def test_joint_leaves_the_other_draws_unchanged():
    """It is drawn after t and the noise, so adding it to a config changes nothing else of a run."""
    t0, noise0, flags0 = _draw({"t5": 0.3}, 64)
    t1, noise1, flags1 = _draw({"t5": 0.3, "joint": 0.2}, 64)
    assert torch.equal(t0, t1) and torch.equal(noise0, noise1)
    assert bool((flags1["t5"] | ~flags0["t5"]).all())
    assert not torch.equal(flags0["clip_l"], flags1["clip_l"])  # joint drops did happen to clip_l


def test_no_dropout_keeps_every_caption():
    _, _, flags = _draw({}, 256)
    assert not any(bool(f.any()) for f in flags.values())
