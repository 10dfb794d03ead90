"""The transformer cases every benchmark runs: our model and diffusers', with the same weights and inputs.

``build_case(family, size)`` builds diffusers' ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` for a
size below, fills it with random non-zero weights (size "shipped": loads the shipped demo model's), loads the
same weights into ours through the family's key map (``mmdit_flow.weights.transformer.family``), and draws
one set of inputs. ``case.run(side)`` is one forward of ``side`` ("ours" | "diffusers") on those inputs;
``case.velocity(side)`` is that side as a velocity function with our signature ``v(x, t, txt, vec,
guidance)``, for scripts that bring their own inputs (training). Both return v in our layout [B, C, H, W].

| family | size | blocks, width | latents (C x H x W) | image + text tokens | batch |
|---|---|---|---|---|---|
| sd3 | tiny | 2, 64 | 16 x 16 x 16 | 64 + 16 | 2 |
| sd3 | small | 4, 512 (8 heads of 64) | 16 x 64 x 64 | 1024 + 154 | 1 |
| sd3 | small35 | small with SD3.5's QK RMS-norm, MMDiT-X attention in blocks 0 and 1 | | | |
| sd3 | shipped | the shipped tiny-shapes model and its weights: 6, 128 | 16 x 16 x 16 | 64 + 64 | 2 (CFG) |
| sd3 | medium | SD3-medium: 24, 1536 | 16 x 128 x 128 (1024^2 images) | 4096 + 333 | 1 |
| flux | tiny | 2 + 2, 64 | 4 x 16 x 16 | 64 + 16 | 1 |
| flux | small | 2 + 4, 512 (4 heads of 128, RoPE axes 16/56/56) | 16 x 64 x 64 | 1024 + 512 | 1 |
| flux | dev | FLUX.1-dev: 19 + 38, 3072 | 16 x 128 x 128 (1024^2 images) | 4096 + 512 | 1 |

"small" is the small real size: real block shapes and text widths (T5 4096, pooled 2048 / 768) at a depth
and token count a CPU times in seconds; "medium" and "dev" are the GPU sizes. Random weights: matrices
N(0, 1 / fan-in) (activations stay O(1) at any width, also in bf16), other parameters N(0, 0.1^2), norm
scales 1 + N(0, 0.1^2): non-zero everywhere, since diffusers zero-initialises the output layer and the adaLN
modulations and a zero velocity would make any parity check vacuous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from mmdit_flow.flow import VelocityFn
from mmdit_flow.models.flux import FluxConfig, pack, position_ids, unpack
from mmdit_flow.models.sd3 import SD3Config

SIDES = ("ours", "diffusers")


@dataclasses.dataclass(frozen=True)
class Size:
    """A case's model (``config``; None: read from ``pretrained``) and the shape of its inputs."""

    config: SD3Config | FluxConfig | None
    latent: int  # latent side H = W
    txt_len: int
    batch: int
    pretrained: str | None = None  # "shipped": the demo model's transformer


# fmt: off
_SD3_TINY = SD3Config(
    hidden_size=64, num_heads=2, depth=2, context_dim=64, vec_dim=32, pos_embed_max_size=16, sample_size=16
)
_SD3_SMALL = SD3Config(
    hidden_size=512, num_heads=8, depth=4, context_dim=4096, vec_dim=2048, pos_embed_max_size=96
)
_FLUX_TINY = FluxConfig(
    in_channels=4, out_channels=4, hidden_size=64, num_heads=2, depth=2, depth_single=2, context_dim=32,
    vec_dim=24, axes_dim=(4, 14, 14),
)
SIZES: dict[str, dict[str, Size]] = {
    "sd3": {
        "tiny": Size(_SD3_TINY, latent=16, txt_len=16, batch=2),
        "small": Size(_SD3_SMALL, latent=64, txt_len=154, batch=1),
        "small35": Size(
            dataclasses.replace(_SD3_SMALL, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
            latent=64, txt_len=154, batch=1,
        ),
        # the shipped model as it samples: 32 CLIP + 32 T5 tokens, cond and uncond in one batch
        "shipped": Size(None, latent=16, txt_len=64, batch=2, pretrained="shipped"),
        "medium": Size(SD3Config.preset("sd3_medium"), latent=128, txt_len=333, batch=1),  # 77 CLIP + 256 T5
    },
    "flux": {
        "tiny": Size(_FLUX_TINY, latent=16, txt_len=16, batch=1),
        "small": Size(FluxConfig(hidden_size=512, num_heads=4, depth=2, depth_single=4), 64, 512, 1),
        "dev": Size(FluxConfig(), latent=128, txt_len=512, batch=1),  # FLUX.1-dev's 512 T5 tokens
    },
}
# fmt: on


class Inputs(NamedTuple):
    """One forward's inputs in our layout: x [B, C, H, W], t [B] in [0, 1], txt [B, L, D], vec [B, P]."""

    x: torch.Tensor
    t: torch.Tensor
    txt: torch.Tensor
    vec: torch.Tensor
    guidance: torch.Tensor | None  # Flux-dev's guidance scale [B]; None for SD3 and schnell


@dataclasses.dataclass
class Case:
    """Ours and diffusers' transformer with the same weights, and one set of inputs."""

    family: str  # "sd3" | "flux"
    size: str
    config: SD3Config | FluxConfig
    ours: nn.Module
    theirs: nn.Module  # diffusers'
    inputs: Inputs

    @property
    def batch(self) -> int:
        return self.inputs.x.shape[0]

    @property
    def n_img(self) -> int:
        patch = self.config.patch_size if self.family == "sd3" else 2
        return (self.inputs.x.shape[2] // patch) * (self.inputs.x.shape[3] // patch)

    @property
    def n_txt(self) -> int:
        return self.inputs.txt.shape[1]

    def model(self, side: str) -> nn.Module:
        return {"ours": self.ours, "diffusers": self.theirs}[_checked(side)]

    def velocity(self, side: str, model: nn.Module | None = None) -> VelocityFn:
        """``side`` (or ``model``, e.g. its compiled form) as ``v(x, t, txt, vec, guidance=None)``."""
        model = model if model is not None else self.model(side)
        return model if side == "ours" else diffusers_velocity(self.family, model)

    def run(self, side: str, model: nn.Module | None = None) -> torch.Tensor:
        """One forward of ``side`` (or of ``model``) on the case's inputs."""
        return self.velocity(side, model)(*self.inputs)

    def blocks(self, side: str, model: nn.Module | None = None) -> list[nn.Module]:
        """The repeated blocks (what a regional torch.compile compiles one by one)."""
        m = model if model is not None else self.model(side)
        if side == "ours":
            return list(m.blocks) if self.family == "sd3" else [*m.double_blocks, *m.single_blocks]
        if self.family == "sd3":
            return list(m.transformer_blocks)
        return [*m.transformer_blocks, *m.single_transformer_blocks]

    def relative_error(self) -> float:
        """|v_ours - v_diffusers| / |v_diffusers| on the case's inputs, in eval mode and fp32 arithmetic."""
        self.ours.eval()
        self.theirs.eval()
        with torch.no_grad():
            a, b = self.run("ours").float(), self.run("diffusers").float()
        return ((a - b).norm() / b.norm()).item()


def _checked(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose one of {', '.join(SIDES)}")
    return side


def diffusers_velocity(family: str, model: nn.Module) -> VelocityFn:
    """diffusers' transformer behind our signature: timestep 1000 t for SD3, t for Flux (which scales it
    itself); Flux's latents packed into 2x2 tokens with their position ids, and the output unpacked."""
    if family == "sd3":

        def sd3(x, t, txt, vec, guidance=None):
            return model(
                hidden_states=x, encoder_hidden_states=txt, pooled_projections=vec, timestep=1000 * t
            ).sample

        return sd3

    def flux(x, t, txt, vec, guidance=None):
        H, W, L = x.shape[2], x.shape[3], txt.shape[1]
        ids = position_ids(L, H // 2, W // 2, device=x.device)  # [L + n_img, 3]
        out = model(
            hidden_states=pack(x), encoder_hidden_states=txt, pooled_projections=vec, timestep=t.to(x.dtype),
            guidance=guidance, img_ids=ids[L:], txt_ids=ids[:L],
        ).sample  # fmt: skip
        return unpack(out, H, W)  # [B, C_out, H, W]

    return flux


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero weights (see the module docstring), drawn on the parameters' (one) device."""
    device = next(module.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (FLUX.1-dev in fp32 would be 48 GB per model before a cast)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_diffusers_transformer(family: str, config: SD3Config | FluxConfig, seed: int = 0) -> nn.Module:
    """diffusers' transformer for our ``config`` with ``randomize``'s weights, on the default device/dtype."""
    import diffusers

    from mmdit_flow.weights.transformer import family as key_format

    fam = key_format(family)
    cls = getattr(diffusers, fam.diffusers_class_name)
    return randomize(cls.from_config(fam.config_to_diffusers(config)), seed).eval()


def sizes(family: str) -> dict[str, Size]:
    if family not in SIZES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(SIZES)}")
    return SIZES[family]


def build_case(
    family: str,
    size: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    depth: int | None = None,
    batch: int | None = None,
    latent: int | None = None,
) -> Case:
    """Ours and diffusers' ``family`` transformer at ``size``, same weights, on ``device`` in ``dtype``.

    ``depth`` overrides the number of blocks (Flux: ``depth`` double and ``2 depth`` single blocks, the
    released models' ratio); ``batch`` and ``latent`` (the latent side) override the inputs' shape.
    """
    import diffusers

    from mmdit_flow.weights.transformer import family as key_format

    spec = sizes(family).get(size)
    if spec is None:
        raise ValueError(f"unknown {family} size {size!r}; choose one of {', '.join(SIZES[family])}")
    fam = key_format(family)
    cls = getattr(diffusers, fam.diffusers_class_name)
    device = torch.device(device)
    if spec.pretrained is not None:
        from mmdit_flow.pipelines.loading import demo_folder

        theirs = cls.from_pretrained(demo_folder() / "transformer", dtype=dtype).to(device)
        config = fam.config_from_diffusers(dict(theirs.config))
    else:
        config = spec.config
        if depth is not None:
            extra = {"depth_single": 2 * depth} if family == "flux" else {}
            config = dataclasses.replace(config, depth=depth, **extra)
        with torch.device(device), default_dtype(dtype):
            theirs = random_diffusers_transformer(family, config, seed)
    with torch.device(device), default_dtype(dtype):
        ours = fam.model_cls(config)
    ours.load_state_dict(fam.from_diffusers(theirs.state_dict(), config))
    inputs = draw_inputs(family, config, spec, seed + 1, device, dtype, batch=batch, latent=latent)
    return Case(family, size, config, ours.eval(), theirs.eval(), inputs)


def draw_inputs(
    family: str,
    config: SD3Config | FluxConfig,
    spec: Size,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int | None = None,
    latent: int | None = None,
) -> Inputs:
    """Random inputs for ``spec``'s shape, drawn on the CPU (the same on every device); t stays fp32."""
    gen = torch.Generator().manual_seed(seed)
    B, n, L = batch or spec.batch, latent or spec.latent, spec.txt_len
    x = torch.randn(B, config.in_channels, n, n, generator=gen)
    t = torch.rand(B, generator=gen)
    txt = torch.randn(B, L, config.context_dim, generator=gen)
    vec = torch.randn(B, config.vec_dim, generator=gen)
    guidance = torch.full((B,), 3.5) if family == "flux" and config.guidance_embed else None
    moved = [v.to(device, dtype) for v in (x, txt, vec)]
    return Inputs(
        moved[0], t.to(device), moved[1], moved[2], None if guidance is None else guidance.to(device)
    )
