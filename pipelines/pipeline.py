"""The text-to-image pipeline: prompts -> text embeddings -> ODE from noise (t = 1) to data (t = 0) -> VAE.

    pipe = TextToImagePipeline.from_pretrained("path/to/sd3-or-flux")     # a diffusers folder
    image = pipe("a cat", steps=28, seed=0)                               # one PIL image

For the same weights, prompts and seed the images equal those of diffusers' ``StableDiffusion3Pipeline`` /
``FluxPipeline`` (tested on tiny random components). Where it differs on purpose:

- the ODE state stays fp32 while the network runs in the pipeline dtype (diffusers rounds it to bf16 each
  step);
- classifier-free guidance runs cond and uncond in one batched forward, and the positive and negative
  prompts go through each text encoder in one batch;
- bad input raises a ValueError that says how to fix it, and non-finite latents raise before decoding;
- ``output="latent"`` returns Flux latents unpacked, [N, C, h, w] like SD3's (diffusers returns them packed).

Guidance: for SD3 ``guidance`` is the CFG scale w in v = v_u + w (v_c - v_u) (default 7; w <= 1 runs the cond
forward only, as in diffusers). For a Flux model with a guidance embedding (dev) it is the distilled guidance
fed to the network (default 3.5); true CFG with a negative prompt is ``true_cfg_scale`` > 1, as in diffusers.

Offloading (``from_pretrained(..., offload=True)``): every model stays on the CPU and is moved to the device
only while it runs (text encoders, then the transformer, then the VAE), so that a GPU needs room for the
largest model alone. It is slower by the transfers and gives the same images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmdit_flow.pipelines import checks
from mmdit_flow.pipelines.loading import Components, default_device_dtype, demo_folder, load_components
from mmdit_flow.pipelines.text import ClipEncoder, FluxTextEncoder, PromptEmbeds, SD3TextEncoder, T5Encoder
from mmdit_flow.pipelines.vae import LatentCodec, to_numpy, to_pil

DEFAULT_GUIDANCE = {"sd3": 7.0, "flux": 3.5}
FLUX_PACK = 2  # Flux packs 2x2 latent patches into one token


class TextToImagePipeline:
    """Text-to-image generation with an SD3 / SD3.5 or Flux transformer; see the module docstring."""

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype, offload=False):
        self.components, self.family = components, components.family
        self.device, self.dtype, self.offload = device, dtype, offload
        self.transformer = components.transformer
        self.codec = LatentCodec(components.vae)
        enc, tok = components.text_encoders, components.tokenizers
        if self.family == "sd3":
            t5 = T5Encoder(tok["tokenizer_3"], enc["text_encoder_3"]) if "text_encoder_3" in enc else None
            self.text = SD3TextEncoder(
                ClipEncoder(tok["tokenizer"], enc["text_encoder"], "CLIP-L"),
                ClipEncoder(tok["tokenizer_2"], enc["text_encoder_2"], "CLIP-G"),
                t5,
                t5_width=int(components.transformer_config["joint_attention_dim"]),
            )
            self.patch = int(components.transformer_config.get("patch_size", 2))
        else:
            self.text = FluxTextEncoder(
                ClipEncoder(tok["tokenizer"], enc["text_encoder"], "CLIP-L"),
                T5Encoder(tok["tokenizer_2"], enc["text_encoder_2"]),
            )
            self.patch = FLUX_PACK
        self.guidance_embeds = bool(components.transformer_config.get("guidance_embeds", False))

    # -------------------------------------------------------------------------------------- loading, saving

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
        offload: bool = False,
    ) -> TextToImagePipeline:
        """Load a diffusers SD3 / SD3.5 / Flux pipeline folder (``path=None``: the shipped demo model).

        Defaults: CUDA in bfloat16 when available, else the CPU in float32. ``offload=True`` keeps the models
        on the CPU and moves each to ``device`` only while it runs. Pickle-only folders need ``allow_pickle``.
        """
        folder = Path(path) if path is not None else demo_folder()
        device, dtype = default_device_dtype(device, dtype)
        components = load_components(
            folder, device=device, dtype=dtype, allow_pickle=allow_pickle, offload=offload
        )
        return cls(components, device=device, dtype=dtype, offload=offload)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a diffusers folder (safetensors) that diffusers' own pipelines load."""
        from mmdit_flow.pipelines.loading import save_components

        return save_components(self.components, Path(path))

    def load_lora(
        self,
        path: str | Path,
        scale: float = 1.0,
        *,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """Merge a diffusers-format SD3 LoRA (ours or diffusers'; a file, or as in diffusers a folder holding
        ``pytorch_lora_weights.safetensors`` or one ``.safetensors``) into the transformer:
        W <- W + scale * B A. Merging again adds again; reload the pipeline to remove a LoRA."""
        from mmdit_flow.weights.lora import load_lora

        load_lora(self.transformer, path, scale, weight_name=weight_name, allow_pickle=allow_pickle)

    def set_vae_tiling(self, enabled: bool = True) -> None:
        """Decode tile by tile: bounded memory for large images; seams are blended, pixels change slightly."""
        self.codec.set_tiling(enabled)

    @contextlib.contextmanager
    def _on_device(self, *modules: torch.nn.Module) -> Iterator[None]:
        """With offloading, move the modules to the device for the duration of the block, then back."""
        if not self.offload:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    # ------------------------------------------------------------------------------------------ encoding

    def encode_prompt(self, prompts: str | list[str], max_sequence_length: int | None = None) -> PromptEmbeds:
        """Text embeddings of prompts (an empty string is allowed here: it is the unconditional prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        models = [m for m in self.components.text_encoders.values()]
        with self._on_device(*models):
            embeds = self.text.encode(prompts, max_sequence_length)
        return embeds.to(device=self.device)

    def _embeddings(self, prompts, negatives, given: checks.GivenEmbeds, guided: bool, max_len) -> tuple:
        """(cond, uncond or None), each [B, ...]: one encoder batch holds the prompts and the negatives."""
        if given.cond is not None:
            cond = given.cond
            uncond = given.uncond if guided and given.uncond is not None else None
            if guided and uncond is None:
                uncond = self.encode_prompt(negatives, max_len)
            return cond, uncond
        if not guided:
            return self.encode_prompt(prompts, max_len), None
        both = self.encode_prompt(prompts + negatives, max_len)
        b = len(prompts)
        return PromptEmbeds(both.txt[:b], both.vec[:b]), PromptEmbeds(both.txt[b:], both.vec[b:])

    # ------------------------------------------------------------------------------------------ sampling

    def _grid(self, steps: int, h: int, w: int) -> torch.Tensor:
        """The sampling times [steps + 1] for a latent of h x w, from the scheduler config."""
        from mmdit_flow.flow import flux_mu
        from mmdit_flow.sampling import timesteps

        config = self.components.scheduler_config
        dynamic = self.family == "flux" or bool(config.get("use_dynamic_shifting", False))
        if not dynamic:
            return timesteps(steps, shift=float(config.get("shift", 1.0)), grid="scheduler")
        mu = flux_mu(
            (h // self.patch) * (w // self.patch),
            int(config.get("base_image_seq_len", 256)),
            int(config.get("max_image_seq_len", 4096)),
            float(config.get("base_shift", 0.5)),
            float(config.get("max_shift", 1.16 if self.family == "sd3" else 1.15)),
        )
        return timesteps(steps, mu=mu, grid="linear" if self.family == "flux" else "scheduler")

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, txt, vec, guidance=None) -> torch.Tensor:
        return self.transformer(x, t, txt, vec, guidance=guidance)

    def _noise(self, n: int, h: int, w: int, generators: list[torch.Generator] | None) -> torch.Tensor:
        """Starting latents [n, C, h, w] drawn on the CPU as diffusers' randn_tensor draws them."""
        shape = (n, self.codec.channels, h, w)
        if generators is None:
            noise = torch.randn(shape, dtype=self.dtype)
        elif len(generators) == 1:
            noise = torch.randn(shape, generator=generators[0], dtype=self.dtype)
        else:
            noise = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, dtype=self.dtype) for g in generators]
            )
        return noise.to(self.device)

    # ------------------------------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        steps: int = 28,
        guidance: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images: int = 1,
        sampler: str = "euler",
        latents: torch.Tensor | None = None,
        output: str = "pil",
        max_sequence_length: int | None = None,
        progress: bool = True,
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        true_cfg_scale: float = 1.0,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> Any:
        """Generate images; returns one PIL image for a str prompt with ``num_images=1``, else a list
        (``output="np"``: float32 [N, H, W, 3] in [0, 1]; ``"pt"``: [N, 3, H, W]; ``"latent"``: [N, C, h, w]).

        ``callback(i, t, latents)`` runs after step i with the time reached and the fp32 latents.
        """
        from mmdit_flow.sampling import cfg, solve

        scale = self.codec.scale_factor
        default = (
            128 * scale
            if self.family == "flux"
            else int(self.components.transformer_config.get("sample_size", 128)) * scale
        )
        height, width = height or default, width or default
        args = checks.check_call(
            family=self.family,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=DEFAULT_GUIDANCE[self.family] if guidance is None else guidance,
            guidance_given=guidance is not None,
            guidance_embeds=self.guidance_embeds,
            true_cfg_scale=true_cfg_scale,
            height=height,
            width=width,
            multiple=scale * self.patch,
            num_images=num_images,
            sampler=sampler,
            output=output,
            seed=seed,
            generator=generator,
            given=checks.GivenEmbeds.from_tensors(
                prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
            ),
            max_sequence_length=max_sequence_length,
            limit=self.text.limit,
        )
        h, w = height // scale, width // scale
        n = args.batch * num_images

        cond, uncond = self._embeddings(
            args.prompts, args.negatives, args.given, args.guided, max_sequence_length
        )
        cond = cond.repeat(num_images).to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"txt": cond.txt, "vec": cond.vec}
        if self.family == "flux" and self.guidance_embeds:
            kwargs["guidance"] = torch.full((n,), float(args.guidance), device=self.device)
        fn: Callable[..., torch.Tensor] = self._velocity
        if uncond is not None:
            uncond = uncond.repeat(num_images).to(self.device, self.dtype)
            fn = cfg(fn, args.cfg_scale, **{**kwargs, "txt": uncond.txt, "vec": uncond.vec})

        if latents is not None:
            checks.check_latents(latents, (n, self.codec.channels, h, w))
            x = latents.to(self.device, self.dtype)
        else:
            x = self._noise(n, h, w, args.generators)

        ts = self._grid(steps, h, w)
        from tqdm.auto import tqdm

        with tqdm(total=steps, disable=not progress, desc="sampling") as bar:

            def step_done(i: int, t: float, state: torch.Tensor) -> None:
                bar.update()
                if callback is not None:
                    callback(i, t, state)

            with self._on_device(self.transformer):
                z = solve(fn, x, ts, method=sampler, callback=step_done, **kwargs)

        if output == "latent":
            return z
        with self._on_device(self.codec.vae):
            images = self.codec.decode(z)
        if output == "pt":
            return images
        if output == "np":
            return to_numpy(images)
        pil = to_pil(images)
        return pil[0] if isinstance(prompt, str) and num_images == 1 else pil
