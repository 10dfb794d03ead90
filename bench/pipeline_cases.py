"""The pipeline cases: our ``TextToImagePipeline`` and diffusers' pipeline loading one folder, built offline.

``load_pair(name, device, dtype)`` writes the case's diffusers folder (random components, built here) or
takes the shipped one, loads it into both pipelines and returns a ``PipelinePair``, whose ``run(side)`` makes
the images of one call: the same prompt, seed, steps and guidance on each side, noise drawn from a CPU
generator on both, so the images can be compared on any device.

| case | transformer | VAE | text encoders (CLIP-L, CLIP-G, T5 widths) | image |
|---|---|---|---|---|
| sd3-tiny | 2 blocks, width 16 | 2x, 4 channels | 16 (proj. 8), 24 (16), 48 | 32 px |
| sd3-small | 6 blocks, width 128 | as tiny | as tiny | 64 px |
| sd3-mid | 12 blocks, width 768, 16 x 64 x 64 latents | SD3-like 8x, 16 channels | 768, 1280, 2048 | 512 px |
| sd3-small-real | 4 blocks, width 512, 1024 + 154 tokens | 2x, 16 channels | 768, 1280, 4096 | 128 px |
| sd3-shipped | the shipped tiny-shapes model (weights/tiny-shapes), as it is | | | 64 px |
| flux-tiny | 1 + 1 blocks, width 32 | 2x, 4 channels | 16, -, 32 | 32 px |
| flux-small | 2 + 4 blocks, width 128 | as tiny | as tiny | 64 px |
| flux-small-real | 2 + 4 blocks, width 512, 1024 + 512 tokens | 2x, 16 channels | 768, -, 4096 | 128 px |

The random sets take their tokenizers from the shipped model (its vocabulary, at the released checkpoints'
lengths: CLIP 77, T5 512): nothing is downloaded, and the prompt is one of its captions. The text encoders
have 3 (CLIP) and 2 (T5) layers; "sd3-mid" (0.3 B parameters) is the GPU's case. The "small-real" cases
have the transformer shapes and text widths of bench/cases.py's small real size behind a 2x VAE, so that
decoding (the same code on both sides) does not hide the transformer.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cases import SIZES, random_diffusers_transformer

from mmdit_flow.models.flux import FluxConfig
from mmdit_flow.models.sd3 import SD3Config

PROMPT = "a large red circle on the left and a small blue square on the right"
CLIP_LENGTH, T5_LENGTH = 77, 512


def tokenizers() -> dict[str, Any]:
    """The shipped model's CLIP-L, CLIP-G and T5 tokenizers at the released models' lengths."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from mmdit_flow.pipelines.loading import demo_folder

    folder = demo_folder()
    return {
        "clip_l": CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=CLIP_LENGTH),
        "clip_g": CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=CLIP_LENGTH),
        "t5": T5TokenizerFast.from_pretrained(folder / "tokenizer_3", model_max_length=T5_LENGTH),
    }


def clip_encoder(tokenizer, hidden: int, projection: int | None, seed: int):
    """A random 3-layer CLIP text encoder; ``projection=None``: Flux's ``CLIPTextModel`` (no projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, projection_dim=projection or hidden,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_encoder(tokenizer, d_model: int, seed: int):
    """A random 2-layer T5 encoder (gated GELU, as T5 v1.1)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def vae(widths: tuple[int, ...], latent_channels: int, scaling: float, shift: float, seed: int, **kw):
    """A random AutoencoderKL with ``len(widths)`` levels: latents 2^(levels - 1) times smaller."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(widths)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths, latent_channels=latent_channels, scaling_factor=scaling,
        shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False, **kw,
    ).eval()  # fmt: skip


def scheduler(shift: float = 3.0, dynamic: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=shift, use_dynamic_shifting=dynamic, base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
        max_image_seq_len=256,
    )  # fmt: skip


def sd3_components(transformer: SD3Config, clip: tuple[int, int, int, int], t5: int, **vae_kw) -> dict:
    """``StableDiffusion3Pipeline``'s components: ``clip`` = (CLIP-L width, projection, CLIP-G width,
    projection), whose projections sum to ``transformer.vec_dim``; ``t5`` its width (``context_dim``)."""
    tok = tokenizers()
    return {
        "transformer": random_diffusers_transformer("sd3", transformer, seed=1),
        "scheduler": scheduler(),
        "vae": vae(seed=2, **vae_kw),
        "text_encoder": clip_encoder(tok["clip_l"], clip[0], clip[1], seed=3),
        "text_encoder_2": clip_encoder(tok["clip_g"], clip[2], clip[3], seed=4),
        "text_encoder_3": t5_encoder(tok["t5"], t5, seed=5),
        "tokenizer": tok["clip_l"],
        "tokenizer_2": tok["clip_g"],
        "tokenizer_3": tok["t5"],
    }


def flux_components(transformer: FluxConfig, **vae_kw) -> dict:
    """``FluxPipeline``'s components: CLIP-L of width ``vec_dim``, T5 of width ``context_dim``."""
    tok = tokenizers()
    return {
        "transformer": random_diffusers_transformer("flux", transformer, seed=1),
        "scheduler": scheduler(dynamic=True),
        "vae": vae(seed=2, **vae_kw),
        "text_encoder": clip_encoder(tok["clip_l"], transformer.vec_dim, None, seed=3),
        "text_encoder_2": t5_encoder(tok["t5"], transformer.context_dim, seed=5),
        "tokenizer": tok["clip_l"],
        "tokenizer_2": tok["t5"],
    }


# fmt: off
_TINY_VAE = dict(widths=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=32)
_SD3_VAE = dict(_TINY_VAE, scaling=1.5035, shift=0.0609)
_FLUX_VAE = dict(_TINY_VAE, scaling=0.3611, shift=0.1159)
_SD3_TINY = SD3Config(
    in_channels=4, out_channels=4, hidden_size=16, num_heads=2, depth=2, context_dim=48, vec_dim=24,
    pos_embed_max_size=16, sample_size=16,
)
_FLUX_TINY = FluxConfig(
    in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=1, depth_single=1, context_dim=32,
    vec_dim=16, axes_dim=(4, 6, 6),
)
_SD3_MID = SD3Config(
    hidden_size=768, num_heads=12, depth=12, context_dim=2048, vec_dim=2048, pos_embed_max_size=96,
    sample_size=64,
)
_SD3_MID_VAE = dict(  # SD3's layout at a quarter of the width
    widths=(64, 128, 256, 256), latent_channels=16, layers_per_block=2, norm_num_groups=32, sample_size=512,
    scaling=1.5305, shift=0.0609, force_upcast=False,  # both pipelines decode in the run dtype
)
_REAL_VAE = dict(_TINY_VAE, latent_channels=16, sample_size=128)  # 2x: 16 x 64 x 64 latents at 128 px
_SD3_REAL_VAE = dict(_REAL_VAE, scaling=1.5305, shift=0.0609)
_FLUX_REAL_VAE = dict(_REAL_VAE, scaling=0.3611, shift=0.1159)
# fmt: on


@dataclasses.dataclass(frozen=True)
class PipelineCase:
    family: str  # "sd3" | "flux"
    image_size: int
    guidance: float
    max_sequence_length: int  # T5 tokens, passed to both pipelines
    components: Callable[[], dict] | None  # None: the shipped model's folder as it is


CASES: dict[str, PipelineCase] = {
    "sd3-tiny": PipelineCase(
        "sd3", 32, 5.0, 64, lambda: sd3_components(_SD3_TINY, (16, 8, 24, 16), 48, **_SD3_VAE)
    ),
    "flux-tiny": PipelineCase("flux", 32, 3.5, 64, lambda: flux_components(_FLUX_TINY, **_FLUX_VAE)),
    "sd3-small": PipelineCase(
        "sd3",
        64,
        5.0,
        64,
        lambda: sd3_components(
            dataclasses.replace(
                _SD3_TINY, hidden_size=128, num_heads=4, depth=6, pos_embed_max_size=32, sample_size=32
            ),
            (16, 8, 24, 16),
            48,
            **_SD3_VAE,
        ),  # fmt: skip
    ),
    "flux-small": PipelineCase(
        "flux",
        64,
        3.5,
        64,
        lambda: flux_components(
            dataclasses.replace(
                _FLUX_TINY, hidden_size=128, num_heads=4, depth=2, depth_single=4, axes_dim=(8, 12, 12)
            ),
            **_FLUX_VAE,
        ),  # fmt: skip
    ),
    "sd3-mid": PipelineCase(
        "sd3", 512, 7.0, 256, lambda: sd3_components(_SD3_MID, (768, 768, 1280, 1280), 2048, **_SD3_MID_VAE)
    ),
    "sd3-shipped": PipelineCase("sd3", 64, 4.0, 32, None),
    "sd3-small-real": PipelineCase(
        "sd3",
        128,
        5.0,
        77,
        lambda: sd3_components(
            SIZES["sd3"]["small"].config, (768, 768, 1280, 1280), 4096, **_SD3_REAL_VAE
        ),  # fmt: skip
    ),
    "flux-small-real": PipelineCase(
        "flux",
        128,
        3.5,
        512,
        lambda: flux_components(SIZES["flux"]["small"].config, **_FLUX_REAL_VAE),
    ),
}


@dataclasses.dataclass
class PipelinePair:
    """Our pipeline and diffusers' on the same folder."""

    name: str
    case: PipelineCase
    ours: Any  # mmdit_flow.pipelines.TextToImagePipeline
    theirs: Any  # diffusers.StableDiffusion3Pipeline | FluxPipeline

    def run(
        self, side: str, *, steps: int, num_images: int = 1, prompt: str = PROMPT, prompt_cache: bool = False
    ) -> np.ndarray:
        """float32 images [N, H, W, 3] in [0, 1] of one call of ``side`` ("ours" | "diffusers"), seed 0.
        Ours encodes the prompt in every call, as diffusers does, unless ``prompt_cache`` lets it reuse the
        last call's embeddings (bench/prompt_cache.py)."""
        c = self.case
        common = {"height": c.image_size, "width": c.image_size, "max_sequence_length": c.max_sequence_length}
        if side == "ours":
            if not prompt_cache:
                self.ours._prompt_cache.clear()
            return self.ours(
                [prompt], steps=steps, guidance=c.guidance, seed=0, num_images=num_images, output="np",
                progress=False, **common,
            )  # fmt: skip
        if side != "diffusers":
            raise ValueError(f"unknown side {side!r}; choose 'ours' or 'diffusers'")
        return self.theirs(
            [prompt], num_inference_steps=steps, guidance_scale=c.guidance, num_images_per_prompt=num_images,
            generator=torch.Generator().manual_seed(0), output_type="np", **common,
        ).images  # fmt: skip


def compile_diffusers(pipe: Any, family: str, backend: str = "inductor") -> None:
    """diffusers' regional compile of its transformer, in place: its own ``compile_repeated_blocks`` for
    Flux, the same loop over ``transformer_blocks`` for SD3 (whose class lists no repeated blocks, so
    ``compile_repeated_blocks`` raises)."""
    if family == "flux":
        pipe.transformer.compile_repeated_blocks(backend=backend)
    else:
        for block in pipe.transformer.transformer_blocks:
            block.compile(backend=backend)


def save_folder(components: dict, path: Path) -> Path:
    """The components as a diffusers pipeline folder (safetensors), as both pipelines load it."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if "tokenizer_3" in components else FluxPipeline
    cls(**components).save_pretrained(str(path))
    return path


def load_pair(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> PipelinePair:
    """Both pipelines of case ``name`` on ``device`` in ``dtype`` (the folder is temporary)."""
    import diffusers
    import transformers
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.pipelines.loading import demo_folder

    if name not in CASES:
        raise ValueError(f"unknown pipeline case {name!r}; choose one of {', '.join(CASES)}")
    case = CASES[name]
    diffusers.utils.logging.disable_progress_bar()  # saving and loading bars would bury the results
    transformers.utils.logging.disable_progress_bar()
    cls = StableDiffusion3Pipeline if case.family == "sd3" else FluxPipeline
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo_folder()
        if case.components is not None:
            folder = save_folder(case.components(), Path(tmp) / name)
        ours = TextToImagePipeline.from_pretrained(folder, device=device, dtype=dtype)
        theirs = cls.from_pretrained(folder, dtype=dtype).to(device)
    theirs.set_progress_bar_config(disable=True)
    return PipelinePair(name, case, ours, theirs)
