"""SD3 / SD3.5 MMDiT: parity with diffusers' SD3Transformer2DModel on tiny random weights; our features."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmdit_flow.models.patch import crop_table, sincos_2d_table
from mmdit_flow.models.sd3 import PRESETS, SD3Config, SD3Transformer
from mmdit_flow.weights.sd3_keys import config_from_diffusers, from_diffusers, to_diffusers

TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=12,
)
VARIANTS = {
    "sd3": {},
    "sd3_qk_norm": {"qk_norm": "rms_norm"},
    "sd35_dual": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 2)},  # 2 = the last, pre-only block
}


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Fill every parameter with non-zero random values, so that no zero-init hides a wrong wire."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + 0.05)


def diffusers_pair(std: float = 0.3, **overrides) -> tuple[torch.nn.Module, SD3Transformer]:
    """A random tiny diffusers SD3Transformer2DModel and our model holding the same weights."""
    from diffusers import SD3Transformer2DModel

    theirs = SD3Transformer2DModel(**{**TINY, **overrides}).eval()
    randomize(theirs, std=std)
    config = config_from_diffusers(dict(theirs.config))
    ours = SD3Transformer(config).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), config), strict=True)
    return theirs, ours


def inputs(config: SD3Config, batch: int = 2, h: int = 10, w: int = 6, seq: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=gen)
    t = torch.rand(batch, generator=gen)
    txt = torch.randn(batch, seq, config.context_dim, generator=gen)
    vec = torch.randn(batch, config.vec_dim, generator=gen)
    return x, t, txt, vec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tiny_model(**overrides) -> SD3Transformer:
    config = config_from_diffusers({**TINY, **overrides})
    model = SD3Transformer(config)
    randomize(model)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch, h, w", [(1, 8, 8), (3, 10, 6), (2, 4, 14)])
def test_equals_diffusers(variant, batch, h, w):
    theirs, ours = diffusers_pair(**VARIANTS[variant])
    x, t, txt, vec = inputs(ours.config, batch, h, w)
    with torch.no_grad():
        ref = theirs(
            hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
        ).sample
        out = ours(x, t, txt, vec)
    assert out.shape == ref.shape
    assert ref.abs().mean() > 0.1  # a real signal, not the zero output of an untrained adaLN-Zero net
    assert rel_err(out, ref) < 1e-5


def test_position_table_and_crop_equal_diffusers():
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    # a table scaled to a latent smaller than the table (sample / patch = 6 of 16 positions), as SD3 has it
    table = sincos_2d_table(32, 16, base_size=6)
    expected = get_2d_sincos_pos_embed(32, 16, base_size=6, output_type="pt").float()
    assert torch.equal(table, expected)
    theirs = PatchEmbed(height=12, width=12, patch_size=2, in_channels=4, embed_dim=32, pos_embed_max_size=16)
    assert torch.equal(theirs.pos_embed, table[None])
    for h, w in [(16, 16), (5, 11), (12, 3), (1, 16), (7, 7)]:
        ref = theirs.cropped_pos_embed(h * 2, w * 2)
        assert torch.equal(crop_table(table[None], 16, h, w), ref)


def test_attention_backends_agree():
    model = tiny_model(qk_norm="rms_norm", dual_attention_layers=(1,)).eval()
    x, t, txt, vec = inputs(model.config)
    with torch.no_grad():
        sdpa = model(x, t, txt, vec)
        model.attention_backend = "reference"
        reference = model(x, t, txt, vec)
    assert rel_err(sdpa, reference) < 1e-5
    with pytest.raises(ValueError, match="sdpa"):
        model.attention_backend = "flash"


def test_math_attention_matches_reference_values_and_gradients():
    """fp32: the "math" backend is the reference to rounding, forward and backward; bf16 under autocast
    (the training path it exists for): no less accurate than sdpa's bf16 against the fp32 reference."""
    model = tiny_model(qk_norm="rms_norm", dual_attention_layers=(1,)).train()
    x, t, txt, vec = inputs(model.config)
    target = torch.randn_like(x)

    def run(backend: str, bf16: bool = False):
        model.attention_backend = backend
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, txt, vec).float()
        (out - target).pow(2).mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref_out, ref_grad = run("reference")
    out, grad = run("math")
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5
    math_out, math_grad = run("math", bf16=True)
    sdpa_out, sdpa_grad = run("sdpa", bf16=True)
    assert 0 < rel_err(math_out, ref_out) < 1.5 * rel_err(sdpa_out, ref_out) + 1e-3
    assert 0 < rel_err(math_grad, ref_grad) < 1.5 * rel_err(sdpa_grad, ref_grad) + 1e-3


def test_gradient_checkpointing_same_loss_and_gradients():
    model = tiny_model(qk_norm="rms_norm", dual_attention_layers=(0,)).train()
    x, t, txt, vec = inputs(model.config)
    target = torch.randn_like(x)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early

    def loss_and_grads():
        model.zero_grad()
        loss = (model(x, t, txt, vec) - target).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    assert len(calls) == 1
    model.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 3  # forward + recomputation in the backward pass
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_no_graph_breaks_under_compile():
    model = tiny_model(qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    x, t, txt, vec = inputs(model.config, batch=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        out = compiled(x, t, txt, vec)
        ref = model(x, t, txt, vec)
    assert rel_err(out, ref) < 1e-6


def test_fresh_model_is_adaln_zero():
    """DiT init: zero modulations and final projection, so v = 0 and every block is the identity."""
    model = SD3Transformer(config_from_diffusers(TINY))
    x, t, txt, vec = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, txt, vec), torch.zeros_like(x))
    assert model.blocks[0].img.attn.qkv.weight.abs().sum() > 0
    assert model.blocks[0].img.mod.lin.weight.abs().sum() == 0


def test_bf16_weights_take_fp32_inputs():
    model = tiny_model(qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    x, t, txt, vec = inputs(model.config)
    with torch.no_grad():
        ref = model(x, t, txt, vec)
        out = model.to(torch.bfloat16)(x, t, txt, vec)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 5e-2


def test_presets_and_guidance():
    assert set(PRESETS) == {"sd3_medium", "sd35_medium", "sd35_large"}
    assert SD3Config.preset("sd35_large").hidden_size == 2432
    with pytest.raises(ValueError, match="sd3_medium"):
        SD3Config.preset("sd4")
    model = tiny_model()
    x, t, txt, vec = inputs(model.config)
    with pytest.raises(ValueError, match="guidance"):
        model(x, t, txt, vec, guidance=torch.ones(2))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": 30, "num_heads": 4}, "multiple of num_heads"),
        ({"hidden_size": 18, "num_heads": 3}, "multiple of 4"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"dual_attention_layers": (0, 3)}, "dual_attention_layers"),
        ({"depth": 0}, "depth"),
        ({"sample_size": 9}, "sample_size"),
    ],
)
def test_bad_config_raises(changes, match):
    base = SD3Config(hidden_size=32, num_heads=4, depth=3, context_dim=24, vec_dim=20, sample_size=8)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    "which, shape, match",
    [
        ("x", (2, 3, 10, 6), "latents"),
        ("x", (2, 4, 9, 6), "multiple of the patch"),
        ("x", (2, 4, 26, 6), "position table"),
        ("txt", (2, 5, 23), "txt"),
        ("txt", (1, 5, 24), "txt"),
        ("vec", (2, 19), "vec"),
        ("t", (3,), "t must be"),
    ],
)
def test_bad_inputs_raise(which, shape, match):
    model = tiny_model()
    args = dict(zip(("x", "t", "txt", "vec"), inputs(model.config), strict=True))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        model(**args)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["sd3", "sd35_dual"])
def test_gradients_equal_diffusers(variant):
    """The memory and speed paths (freed temporaries, query-free last text stream) keep the backward exact.

    Weights at std 0.1: at the forward tests' 0.3 the attention saturates and gradients reach 1e3, where
    fp32 rounding alone moves them by 1e-3 relative."""
    theirs, ours = diffusers_pair(std=0.1, **VARIANTS[variant])
    x, t, txt, vec = inputs(ours.config, 2, 10, 6)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref = theirs(hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t).sample
    ((ref - target) ** 2).mean().backward()
    ((ours(x, t, txt, vec) - target) ** 2).mean().backward()
    expected = _grads(theirs)
    got = to_diffusers(_grads(ours), ours.config)
    assert got.keys() == expected.keys()
    # one scale for all: fp32 rounding is relative to the largest gradients, not to each tensor's own
    scale = max(g.abs().max() for g in expected.values())
    assert scale > 0
    for name, g in expected.items():
        assert (got[name] - g).abs().max() / scale < 1e-5, name


def test_modulation_triples_name_the_chunks_in_checkpoint_order():
    """(shift, scale, gate) per sub-layer, e.g. SD3.5's MMDiT-X: attention, MLP, attn2."""
    from mmdit_flow.models.layers import Modulation

    mod = Modulation(4, 9)
    vec = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    chunks, triples = mod(vec), mod.triples(vec)
    assert len(triples) == 3
    for i, triple in enumerate(triples):
        for j, name in enumerate(("shift", "scale", "gate")):
            assert torch.equal(getattr(triple, name), chunks[3 * i + j])
    with pytest.raises(ValueError, match="2 chunks does not split"):
        Modulation(4, 2).triples(vec)
