"""Flux: parity with diffusers' FluxTransformer2DModel; backends, checkpointing, compile, inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmdit_flow.models.flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    FluxConfig,
    FluxTransformer,
    pack,
    position_ids,
    unpack,
)
from mmdit_flow.weights.flux_keys import config_to_diffusers, from_diffusers

TINY = FluxConfig(
    in_channels=4,
    out_channels=4,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single=2,
    context_dim=32,
    vec_dim=24,
    axes_dim=(4, 14, 14),
    guidance_embed=True,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter non-zero and random (norm scales around 1), so zero-inits cannot hide a wrong map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1.0 if "norm" in name else noise)
    return model


def diffusers_pair(config: FluxConfig, seed: int = 0):
    """(diffusers model, our model) with the same random weights, both in eval mode."""
    from diffusers import FluxTransformer2DModel

    ref = randomize_(FluxTransformer2DModel.from_config(config_to_diffusers(config)), seed).eval()
    ours = FluxTransformer(config).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict(), config), strict=True)
    return ref, ours


def inputs(config: FluxConfig, batch: int, height: int, width: int, txt_len: int = 7, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    kw = {
        "x": torch.randn(batch, config.in_channels, height, width, generator=gen),
        "t": torch.rand(batch, generator=gen),
        "txt": torch.randn(batch, txt_len, config.context_dim, generator=gen),
        "vec": torch.randn(batch, config.vec_dim, generator=gen),
    }
    if config.guidance_embed:
        kw["guidance"] = 1.0 + 4.0 * torch.rand(batch, generator=gen)
    return kw


def diffusers_velocity(ref, x, t, txt, vec, guidance=None) -> torch.Tensor:
    """What FluxPipeline does around its transformer: pack, ids, timestep = sigma = t, unpack."""
    from diffusers import FluxPipeline

    B, C, H, W = x.shape
    out = ref(
        hidden_states=FluxPipeline._pack_latents(x, B, C, H, W),
        encoder_hidden_states=txt,
        pooled_projections=vec,
        timestep=t,  # FluxPipeline passes timestep / 1000 = sigma; the model multiplies by 1000 again
        guidance=guidance,
        img_ids=FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype),
        txt_ids=torch.zeros(txt.shape[1], 3),
    ).sample
    return FluxPipeline._unpack_latents(out, H * 8, W * 8, vae_scale_factor=8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "config, batch, height, width",
    [
        (TINY, 2, 6, 10),  # guidance-distilled (dev), non-square, batch > 1
        (dataclasses.replace(TINY, guidance_embed=False), 1, 8, 4),  # schnell-like
        (
            dataclasses.replace(TINY, in_channels=6, depth=1, axes_dim=(8, 12, 12)),
            3,
            4,
            4,
        ),  # fill-like C_in != C_out
    ],
)
def test_matches_diffusers(config, batch, height, width):
    ref, ours = diffusers_pair(config)
    kw = inputs(config, batch, height, width)
    with torch.no_grad():
        expected = diffusers_velocity(ref, **kw)
        got = ours(**kw)
    assert got.shape == (batch, config.out_channels, height, width)
    assert expected.abs().max() > 1.0  # a real signal, not a zero output
    assert rel_err(got, expected) < 1e-5


def test_batch_items_are_independent():
    _, ours = diffusers_pair(TINY)
    kw = inputs(TINY, 3, 4, 6)
    with torch.no_grad():
        full = ours(**kw)
        one = ours(**{k: v[1:2] for k, v in kw.items()})
    assert rel_err(one, full[1:2]) < 1e-5


def test_pack_and_ids_match_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 3, 4, 6))
    assert torch.equal(unpack(pack(x), 4, 6), x)
    ids = position_ids(5, 2, 3)
    assert torch.equal(ids[5:], FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32))
    assert torch.equal(ids[:5], torch.zeros(5, 3))


def test_sdpa_equals_reference_attention():
    _, ours = diffusers_pair(TINY)
    kw = inputs(TINY, 2, 4, 6)
    with torch.no_grad():
        sdpa = ours(**kw)
        ours.attention_backend = "reference"
        reference = ours(**kw)
        ours.attention_backend = "math"
        math = ours(**kw)
    assert rel_err(sdpa, reference) < 1e-5
    assert rel_err(math, reference) < 1e-5
    with pytest.raises(ValueError, match="sdpa"):
        ours.attention_backend = "flash"


def test_gradient_checkpointing_same_loss_and_gradients():
    _, ours = diffusers_pair(TINY)
    ours.train()
    kw = inputs(TINY, 2, 4, 4)

    def loss_and_grads():
        ours.zero_grad()
        loss = ours(**kw).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    loss, grads = loss_and_grads()
    ours.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiles_without_graph_breaks(checkpointing):
    _, ours = diffusers_pair(dataclasses.replace(TINY, depth=1, depth_single=1))
    ours.gradient_checkpointing = checkpointing
    kw = inputs(ours.config, 1, 4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    if checkpointing:
        compiled(**kw).square().mean().backward()
    else:
        with torch.no_grad():
            assert rel_err(compiled(**kw), ours(**kw)) < 1e-6


def test_bf16_close_to_fp32():
    _, ours = diffusers_pair(TINY)
    kw = inputs(TINY, 2, 4, 4)
    with torch.no_grad():
        full = ours(**kw)
        half = ours.to(torch.bfloat16)(**kw)  # fp32 inputs: the model casts them, returns x's dtype
    assert half.dtype == torch.float32
    assert rel_err(half, full) < 0.05


def test_fresh_model_is_adaln_zero():
    model = FluxTransformer(TINY)
    kw = inputs(TINY, 2, 4, 4)
    out = model(**kw)
    assert torch.equal(out, torch.zeros_like(out))  # zero final layer
    out.sum().backward()
    assert model.final_layer.linear.weight.grad.abs().max() > 0  # and still trainable
    assert torch.equal(
        model.double_blocks[0].img_mod.lin.weight, torch.zeros_like(model.double_blocks[0].img_mod.lin.weight)
    )


def test_bad_inputs_raise():
    model = FluxTransformer(TINY)
    kw = inputs(TINY, 2, 4, 6)
    cases = [
        ({"x": torch.randn(2, 4, 5, 6)}, "even"),
        ({"x": torch.randn(2, 4, 4, 7)}, "even"),
        ({"x": torch.randn(2, 3, 4, 6)}, "latents"),
        ({"txt": torch.randn(2, 7, 31)}, "txt"),
        ({"vec": torch.randn(1, 24)}, "vec"),
        ({"t": torch.rand(3)}, "t must"),
        ({"guidance": None}, "guidance-distilled"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**kw, **change})
    schnell = FluxTransformer(dataclasses.replace(TINY, guidance_embed=False))
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell(**kw)


def test_scalar_time_and_guidance_broadcast():
    _, ours = diffusers_pair(TINY)
    kw = inputs(TINY, 2, 4, 4)
    with torch.no_grad():
        full = ours(**{**kw, "t": torch.full((2,), 0.3), "guidance": torch.full((2,), 3.5)})
        scalar = ours(**{**kw, "t": 0.3, "guidance": 3.5})
    assert torch.equal(full, scalar)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FluxConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="sum to the head dim"):
        FluxConfig(axes_dim=(16, 56, 58))
    with pytest.raises(ValueError, match="even"):
        FluxConfig(axes_dim=(15, 57, 56))
    with pytest.raises(ValueError, match="depth"):
        FluxConfig(depth=-1)
    # the published diffusers transformer configs of FLUX.1-dev and FLUX.1-schnell
    published = {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
        "out_channels": None,
    }
    assert config_to_diffusers(FLUX_DEV) == {**published, "guidance_embeds": True}
    assert config_to_diffusers(FLUX_SCHNELL) == {**published, "guidance_embeds": False}


def test_gradients_equal_diffusers():
    """The split single-block GEMMs, freed temporaries and image-only last block keep the backward exact."""
    from mmdit_flow.weights.flux_keys import to_diffusers

    ref, ours = diffusers_pair(TINY)
    kw = inputs(TINY, 2, 6, 10)
    target = torch.randn(kw["x"].shape, generator=torch.Generator().manual_seed(3))
    ((diffusers_velocity(ref, **kw) - target) ** 2).mean().backward()
    ((ours(**kw) - target) ** 2).mean().backward()

    def grads(model):
        return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}

    expected, got = grads(ref), to_diffusers(grads(ours), TINY)
    assert got.keys() == expected.keys()
    # one scale for all: fp32 rounding is relative to the largest gradients, not to each tensor's own
    scale = max(g.abs().max() for g in expected.values())
    assert scale > 0
    for name, g in expected.items():
        assert (got[name] - g).abs().max() / scale < 1e-5, name
