"""Step caching (mmdit_flow/step_cache.py) on tiny random SD3 and Flux transformers and pipelines.

Values, not shapes: threshold 0 and interval 1 equal the uncached solve exactly; an infinite threshold equals
a hand-built reuse (the first block, then the first step's residual of the other blocks added by a stand-in
block); the TaylorSeer extrapolation is exact on residuals that are polynomials in t of its order; the state
never leaks from one trajectory, batch or call into the next.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from components import _randomize, save_diffusers_folder, sd3_components
from torch import nn

from mmdit_flow.models.flux import FluxConfig, FluxTransformer
from mmdit_flow.models.sd3 import SD3Config, SD3Transformer
from mmdit_flow.sampling import solve, timesteps
from mmdit_flow.step_cache import FirstBlockCacheConfig, StepCache, TaylorSeerCacheConfig

STEPS = 8


def sd3_model(depth: int = 3) -> SD3Transformer:
    config = SD3Config(
        in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=depth, context_dim=24, vec_dim=20,
        pos_embed_max_size=8, sample_size=8,
    )  # fmt: skip
    return _randomize(SD3Transformer(config), seed=0, scale=0.1)


def flux_model(depth: int = 2, depth_single: int = 2) -> FluxTransformer:
    config = FluxConfig(
        in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=depth, depth_single=depth_single,
        context_dim=24, vec_dim=20, axes_dim=(4, 6, 6), guidance_embed=False,
    )  # fmt: skip
    return _randomize(FluxTransformer(config), seed=0, scale=0.1)


MODELS = {"sd3": sd3_model, "flux": flux_model}


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    return x, {"txt": torch.randn(batch, 5, 24, generator=gen), "vec": torch.randn(batch, 20, generator=gen)}


@torch.no_grad()
def sample(model: nn.Module, x: torch.Tensor, cond: dict, steps: int = STEPS) -> torch.Tensor:
    return solve(model, x, timesteps(steps, shift=3.0), **cond)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("config", [FirstBlockCacheConfig(0.0), TaylorSeerCacheConfig(interval=1)])
def test_caching_nothing_is_the_uncached_solve(family, config):
    model = MODELS[family]()
    x, cond = inputs()
    plain = sample(model, x, cond)
    cache = model.enable_cache(config)
    assert torch.equal(sample(model, x, cond), plain)
    assert cache.stats.forwards == STEPS and cache.stats.blocks_skipped == 0
    model.disable_cache()
    assert model.step_cache is None and torch.equal(sample(model, x, cond), plain)


# --------------------------------------------------------------------------------------- hand-built reuse


class AddResidual(nn.Module):
    """A stand-in last block: the image tokens plus a fixed residual (an SD3 joint or a Flux single block)."""

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual

    def forward(self, x, *args, keep_from: int = 0, **kwargs):
        if isinstance(x, torch.Tensor) and x.ndim == 3 and keep_from:  # Flux: the joint [txt; img] tokens
            return x[:, keep_from:] + self.residual
        return x + self.residual, None  # SD3: (img, txt)


def block_lists(model: nn.Module) -> list[str]:
    return list(type(model).cache_block_lists)


def first_and_last_outputs(model: nn.Module, x, t, cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image tokens entering the stack, after its first block and after its last, from forward hooks."""
    lists = [getattr(model, name) for name in block_lists(model)]
    first, last = lists[0][0], [b for blocks in lists for b in blocks][-1]
    seen = {}

    def keep(name: str, value) -> None:
        seen.setdefault(name, value[0] if isinstance(value, tuple) else value)

    hooks = [
        first.register_forward_pre_hook(lambda m, args: keep("in", args)),
        first.register_forward_hook(lambda m, args, out: keep("first", out)),
        last.register_forward_hook(lambda m, args, out: keep("last", out)),
    ]
    try:
        model(x, t, **cond)
    finally:
        for h in hooks:
            h.remove()
    return seen["in"], seen["first"], seen["last"]


def with_stack(model: nn.Module, keep_first: bool, residual: torch.Tensor):
    """The model with its blocks replaced by [first block (if kept), AddResidual(residual)]; restorable."""
    names = block_lists(model)
    saved = {name: getattr(model, name) for name in names}
    head = [saved[names[0]][0]] if keep_first else []
    if len(names) == 1:  # SD3
        setattr(model, names[0], nn.ModuleList([*head, AddResidual(residual)]))
    else:  # Flux: the kept double block, then the stand-in as the last single block
        setattr(model, names[0], nn.ModuleList(head))
        setattr(model, names[1], nn.ModuleList([AddResidual(residual)]))
    return saved


@torch.no_grad()
def euler_by_hand(model: nn.Module, x, cond, velocity_at) -> torch.Tensor:
    ts = timesteps(STEPS, shift=3.0).tolist()
    for i in range(STEPS):
        t = torch.full((x.shape[0],), ts[i])
        x = x + (ts[i + 1] - ts[i]) * velocity_at(i, x, t)
    return x


@pytest.mark.parametrize("family", MODELS)
def test_infinite_threshold_reuses_the_first_steps_residual(family):
    """Step 0 runs every block; every later step runs the first block and adds step 0's residual of the
    others (last block's output minus the first's), computed here with a stand-in block."""
    model = MODELS[family]()
    x, cond = inputs()
    state = {}

    def velocity_at(i, x, t):
        if i == 0:
            _, first, last = first_and_last_outputs(model, x, t, cond)
            state["residual"] = last - first
            return model(x, t, **cond)
        saved = with_stack(model, keep_first=True, residual=state["residual"])
        try:
            return model(x, t, **cond)
        finally:
            for name, blocks in saved.items():
                setattr(model, name, blocks)

    expected = euler_by_hand(model, x, cond, velocity_at)
    plain = sample(model, x, cond)
    cache = model.enable_cache(FirstBlockCacheConfig(math.inf))
    got = sample(model, x, cond)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # the reuse is not the full computation
    blocks = {"sd3": 3, "flux": 4}[family]
    assert cache.blocks == blocks
    assert (cache.stats.full, cache.stats.blocks_skipped) == (1, (STEPS - 1) * (blocks - 1))
    assert cache.stats.blocks_run == STEPS + blocks - 1


@pytest.mark.parametrize("family", MODELS)
def test_taylor_extrapolates_the_stack_residual_linearly_in_t(family):
    """interval 2, order 1, warmup 2: forwards 0, 1, 2, 4, 6 run in full; forwards 3, 5, 7 add the line
    through the last two full residuals (stack output minus input), at their t, to the input tokens."""
    model = MODELS[family]()
    x, cond = inputs()
    full = []  # (t, residual) of the full forwards

    def velocity_at(i, x, t):
        if i < 2 or i % 2 == 0:
            start, _, last = first_and_last_outputs(model, x, t, cond)
            full.append((float(t[0]), last - start))
            return model(x, t, **cond)
        (t1, r1), (t0, r0) = full[-2], full[-1]
        predicted = r0 + (r0 - r1) / (t0 - t1) * (float(t[0]) - t0)
        saved = with_stack(model, keep_first=False, residual=predicted)
        try:
            return model(x, t, **cond)
        finally:
            for name, blocks in saved.items():
                setattr(model, name, blocks)

    expected = euler_by_hand(model, x, cond, velocity_at)
    cache = model.enable_cache(TaylorSeerCacheConfig(interval=2, order=1, warmup=2))
    torch.testing.assert_close(sample(model, x, cond), expected, rtol=0, atol=1e-5)
    assert cache.stats.full == 5 and cache.stats.blocks_skipped == 3 * cache.blocks


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_taylor_is_exact_on_polynomial_residuals(order):
    """A stack whose residual is a polynomial of degree ``order`` in t (per row) is extrapolated exactly,
    on a non-uniform grid, with repeated times (Heun) replacing their node."""
    coefficients = torch.randn(order + 1, 2, 3, 4, dtype=torch.float64)

    def residual(t: torch.Tensor) -> torch.Tensor:
        return sum(c * t.view(-1, 1, 1) ** j for j, c in enumerate(coefficients))

    cache = StepCache(TaylorSeerCacheConfig(interval=4, order=order, warmup=order + 1), blocks=2)
    img = torch.randn(2, 3, 4, dtype=torch.float64)
    grid = [1.0, 0.93, 0.93, 0.8, 0.71, 0.6, 0.42, 0.3, 0.17, 0.05]
    with torch.no_grad():  # sampling
        for s in grid:
            t = torch.tensor([s, s], dtype=torch.float64)
            out = cache(t, img, head=lambda img: (img,), tail=lambda img, t=t: img + residual(t))
            torch.testing.assert_close(out, img + residual(t), rtol=1e-9, atol=1e-9)
    assert cache.stats.blocks_skipped > 0


@pytest.mark.parametrize("family", MODELS)
def test_forwards_that_record_gradients_run_every_block(family):
    """Training or a likelihood (gradients on) gets the exact field and its gradient from a model with a
    cache on, and leaves the cache's state alone."""
    model = MODELS[family]()
    x, cond = inputs()
    t = torch.full((2,), 0.5)
    plain = model(x.requires_grad_(), t, **cond)
    (grad,) = torch.autograd.grad(plain.sum(), x)
    cache = model.enable_cache(FirstBlockCacheConfig(math.inf))
    with torch.no_grad():
        model(x, torch.full((2,), 0.9), **cond)  # a full forward: the next one would reuse its residual
    cached = model(x, t, **cond)
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(cached.sum(), x)[0], grad, rtol=0, atol=0)
    assert cache.stats.forwards == 1


# --------------------------------------------------------------------------------------- state and batches


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("config", [FirstBlockCacheConfig(math.inf), TaylorSeerCacheConfig(2, 1, 1)])
def test_state_never_leaks_between_trajectories(family, config):
    """A second solve (t back at 1), a new batch size and other inputs each start afresh: they equal a
    freshly enabled cache's result; the statistics count the last trajectory only."""
    model = MODELS[family]()
    x, cond = inputs()
    model.enable_cache(config)
    first = sample(model, x, cond)
    skipped = model.step_cache.stats.blocks_skipped
    assert skipped > 0
    assert torch.equal(sample(model, x, cond), first)
    assert model.step_cache.stats.forwards == STEPS and model.step_cache.stats.blocks_skipped == skipped
    x3, cond3 = inputs(batch=3, seed=5)
    other = sample(model, x3, cond3)
    model.enable_cache(config)
    assert torch.equal(sample(model, x3, cond3), other)
    assert torch.equal(sample(model, x, cond), first)


@pytest.mark.parametrize("family", MODELS)
def test_a_batch_is_cached_by_its_largest_row_change(family):
    """One decision per forward: with CFG's [uncond, cond] rows in one batch, the recorded change is the
    largest row's (each row against its own reference), and a threshold between the rows' changes skips
    for the row alone but not for the batch."""
    model = MODELS[family]()
    x, cond = inputs()
    rows = {k: torch.cat([torch.zeros_like(v), v]) for k, v in cond.items()}  # [uncond, cond]
    x = torch.cat([x, x])
    ones = torch.ones(4)

    def two_forwards(threshold: float, row: slice) -> StepCache:
        cache = model.enable_cache(FirstBlockCacheConfig(threshold))
        with torch.no_grad():
            for t in (0.9, 0.8):
                model(x[row], t * ones[row], **{k: v[row] for k, v in rows.items()})
        return cache

    alone = [two_forwards(0.0, slice(i, i + 1)).stats.changes[0] for i in range(4)]
    assert two_forwards(0.0, slice(None)).stats.changes[0] == pytest.approx(max(alone), rel=1e-5)
    easiest = min(range(4), key=alone.__getitem__)
    between = (alone[easiest] + max(alone)) / 2
    assert max(alone) > 1.01 * alone[easiest]
    assert two_forwards(between, slice(easiest, easiest + 1)).stats.blocks_skipped > 0
    assert two_forwards(between, slice(None)).stats.blocks_skipped == 0


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("threshold", [-0.1, -math.inf, math.nan, "0.1", True, None])
def test_bad_thresholds_raise(threshold):
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        FirstBlockCacheConfig(threshold)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"interval": 0}, "interval"),
        ({"order": -1}, "order"),
        ({"order": 4}, "at most 3"),
        ({"warmup": 1.5}, "warmup"),
    ],
)
def test_bad_taylor_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        TaylorSeerCacheConfig(**kw)


def test_first_block_cache_needs_two_blocks():
    with pytest.raises(ValueError, match="needs a blocks block and another"):
        sd3_model(depth=1).enable_cache(FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="double_blocks"):
        flux_model(depth=0, depth_single=2).enable_cache(FirstBlockCacheConfig())
    flux_model(depth=0, depth_single=2).enable_cache(TaylorSeerCacheConfig())  # needs no first block
    with pytest.raises(TypeError, match="FirstBlockCacheConfig or TaylorSeerCacheConfig"):
        sd3_model().enable_cache(0.1)


# --------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from mmdit_flow.pipelines import TextToImagePipeline

    folder = save_diffusers_folder(sd3_components(), tmp_path_factory.mktemp("sd3"))
    return TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def generate(pipe, **kw) -> torch.Tensor:
    args = {"steps": 6, "guidance": 4.0, "seed": [0, 1], "height": 32, "width": 32, "progress": False}
    return pipe(["a red circle", "a blue square"], output="latent", **{**args, **kw})


def test_pipeline_step_cache(pipe, caplog):
    plain = generate(pipe)
    pipe.enable_step_cache(0.0)
    assert torch.equal(generate(pipe), plain)
    pipe.enable_step_cache(threshold=math.inf)
    with caplog.at_level("INFO", logger="mmdit_flow.pipelines.pipeline"):
        cached = generate(pipe)
    assert "step cache: skipped 5 of 12 block evaluations" in caplog.text
    assert not torch.allclose(cached, plain, atol=1e-3)
    assert torch.equal(generate(pipe), cached)  # the next call starts afresh
    pipe.enable_step_cache(config=TaylorSeerCacheConfig(interval=2, order=1, warmup=2))
    assert pipe.transformer.step_cache.config.interval == 2
    pipe.disable_step_cache()
    assert torch.equal(generate(pipe), plain)
    with pytest.raises(ValueError, match="threshold"):
        pipe.enable_step_cache(-1.0)
    with pytest.raises(ValueError, match="either"):
        pipe.enable_step_cache(0.1, config=TaylorSeerCacheConfig())


def test_generate_cli_step_cache(tmp_path, capsys):
    """`mmdit-flow generate --step-cache T` (a Flux folder) writes the cached pipeline's image, records T in
    the PNG so that --from-png makes it again, and refuses a bad T before loading a model."""
    import numpy as np
    from components import flux_components
    from PIL import Image

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.cli import main
    from mmdit_flow.pipelines.parameters import GenerationParameters

    folder = save_diffusers_folder(flux_components(), tmp_path / "flux")
    argv = ["generate", "a cat", "--model", str(folder), "--steps", "4", "--seed", "0", "--height", "16"]
    argv += ["--width", "16", "--no-progress", "--device", "cpu", "--dtype", "fp32", "--step-cache", "1e9"]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    call = {"steps": 4, "seed": 0, "height": 16, "width": 16, "progress": False}
    plain = np.asarray(pipe("a cat", **call))
    pipe.enable_step_cache(1e9)
    cached = np.asarray(pipe("a cat", **call))
    assert pipe.transformer.step_cache.stats.blocks_skipped == 3  # 1 double + 1 single block, steps 1-3
    written = np.asarray(Image.open(tmp_path / "a.png"))
    np.testing.assert_array_equal(written, cached)
    assert np.abs(written.astype(int) - plain).max() > 0
    assert GenerationParameters.from_png(tmp_path / "a.png").step_cache == 1e9
    assert main(["generate", "--from-png", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), cached)
    capsys.readouterr()
    assert main([*argv[:-1], "-1", "-o", str(tmp_path / "c.png")]) == 2
    assert "--step-cache: step cache threshold must be a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_compiled_blocks_stay_compiled_under_the_cache(family, tmp_path):
    """pipe.compile() then caching: the cache only decides whether to call the compiled blocks, at the same
    batch, so no call compiles again, and the cached images equal eager cached ones to fp32 rounding."""
    from components import flux_components

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.compiling import compiled_graphs

    components = sd3_components() if family == "sd3" else flux_components()
    folder = save_diffusers_folder(components, tmp_path / family)
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    configs = [FirstBlockCacheConfig(math.inf), TaylorSeerCacheConfig(2, 1, 1)]
    kw = {"steps": 5, "num_images": 2, "seed": 0, "output": "np", "progress": False}
    if family == "flux":
        kw.update(true_cfg_scale=2.0, negative_prompt="bad")

    def images() -> list:
        out = []
        for config in configs:
            pipe.enable_step_cache(config=config)
            out.append(pipe("a photo of a cat", **kw))
            assert pipe.transformer.step_cache.stats.blocks_skipped > 0
        return out

    eager = images()
    torch._dynamo.reset()
    pipe.disable_step_cache()
    pipe.compile(backend="aot_eager")
    after_warmup = compiled_graphs()
    for a, b in zip(images(), eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert compiled_graphs() == after_warmup, "a cached call compiled again"
    torch._dynamo.reset()
