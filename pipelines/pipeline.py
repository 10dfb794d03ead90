"""The text-to-image pipeline: prompts -> text embeddings -> ODE from noise (t = 1) to data (t = 0) -> VAE.

    pipe = TextToImagePipeline.from_pretrained("path/to/sd3-or-flux")     # a diffusers folder
    image = pipe("a cat", steps=28, seed=0)                               # one PIL image
    edited = pipe("a red cat", image=image, strength=0.6)                 # image-to-image (edit.py)

For the same weights, prompts and seed the images equal those of diffusers' ``StableDiffusion3Pipeline`` /
``FluxPipeline`` (tested on tiny random components). Where it differs on purpose:

- the ODE state stays fp32 while the network runs in the pipeline dtype (diffusers rounds it to bf16 each
  step);
- classifier-free guidance runs cond and uncond in one batched forward, and the positive and negative
  prompts go through each text encoder in one batch;
- bad input raises a ValueError that says how to fix it (sizes in pixels), non-finite latents raise before
  decoding and non-finite decoded images before conversion;
- arguments left unset take the model folder's defaults (``mmdit_flow.json``, see ``defaults.py``; shown as
  ``pipe.defaults``), and a prompt with words the model never saw, or a size outside those it was trained
  at, gives one warning each where the folder records them;
- diffusers' names ``num_inference_steps``, ``guidance_scale``, ``num_images_per_prompt`` and
  ``output_type`` are accepted for ours (giving both is an error); ``pipe.to(device, dtype)`` as in diffusers;
- ``output="latent"`` returns Flux latents unpacked, [N, C, h, w] like SD3's (diffusers returns them packed).

Guidance: for SD3 ``guidance`` is the CFG scale w in v = v_u + w (v_c - v_u) (default 7; w <= 1 runs the cond
forward only, as in diffusers). For a Flux model with a guidance embedding (dev) it is the distilled guidance
fed to the network (default 3.5); true CFG with a negative prompt is ``true_cfg_scale`` > 1, as in diffusers.

Speed (docs/generating.md): ``pipe.compile()`` (or ``from_pretrained(..., compile=True)``) compiles the
transformer's repeated blocks with torch.compile and returns what it cost (``CompileReport``); later calls
at any batch, size, step count or prompt reuse the graphs. ``pipe.to(torch.bfloat16)`` runs the networks in
bf16 (on CPUs with AVX512-BF16 or AMX too); the ODE state stays fp32.

Offloading (``from_pretrained(..., offload=True)``): every model stays on the CPU and is moved to the device
only while it runs (text encoders, then the transformer, then the VAE), so that a GPU needs room for the
largest model alone. It is slower by the transfers and gives the same images.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmdit_flow.pipelines import checks
from mmdit_flow.pipelines.compiling import CompileReport
from mmdit_flow.pipelines.defaults import FILE as DEFAULTS_FILE
from mmdit_flow.pipelines.defaults import ModelDefaults, native_size, read_defaults
from mmdit_flow.pipelines.edit import ImageEdit
from mmdit_flow.pipelines.loading import Components, default_device_dtype, demo_folder, load_components
from mmdit_flow.pipelines.text import ClipEncoder, FluxTextEncoder, PromptEmbeds, SD3TextEncoder, T5Encoder
from mmdit_flow.pipelines.vae import LatentCodec, to_numpy, to_pil
from mmdit_flow.step_cache import CacheConfig, cache_config

FLUX_PACK = 2  # Flux packs 2x2 latent patches into one token
logger = logging.getLogger(__name__)
STEP_CACHE_WITH_WHOLE_MODEL = (
    "step caching and compile(scope='model') do not go together: the cache decides per step which blocks "
    "run, so the whole compiled forward would be compiled again at every step. Use compile() (scope="
    "'blocks', the default: the cached blocks stay compiled) or leave the step cache off"
)


PROMPT_CACHE = 8  # text-embedding results kept by encode_prompt


class TextToImagePipeline:
    """Text-to-image generation with an SD3 / SD3.5 or Flux transformer; see the module docstring."""

    def __init__(
        self,
        components: Components,
        *,
        device: torch.device,
        dtype: torch.dtype,
        offload: bool = False,
        defaults: ModelDefaults | None = None,
    ):
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
        scale = self.codec.scale_factor
        # the largest image side the SD3 position table covers (Flux's rotary positions have no limit)
        table = getattr(self.transformer.config, "pos_embed_max_size", None)
        self.largest = table * self.patch * scale if self.family == "sd3" and table else None
        native = native_size(self.family, components.transformer_config, scale)
        # what a call uses for the arguments it leaves unset (steps, guidance, size, max_sequence_length)
        self.defaults = defaults or ModelDefaults.from_json(
            None, family=self.family, native_size=native, source="(no mmdit_flow.json)"
        )
        # the text embeddings of the last calls, keyed by prompts, length, device and the encoders' weights
        self._prompt_cache: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self.compile_report: CompileReport | None = None  # set by compile()

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
        compile: bool = False,
    ) -> TextToImagePipeline:
        """Load a diffusers SD3 / SD3.5 / Flux pipeline folder (``path=None``: the shipped demo model;
        ``"shipped:NAME"``: another shipped model, e.g. ``shipped:tiny-shapes-turbo``).

        Defaults: CUDA in bfloat16 when available, else the CPU in float32. ``offload=True`` keeps the models
        on the CPU and moves each to ``device`` only while it runs. Pickle-only folders need ``allow_pickle``.
        ``compile=True`` runs ``pipe.compile()`` (its report is ``pipe.compile_report``).
        """
        from mmdit_flow.shipped import model_folder

        folder = Path(model_folder(str(path), "path")) if path is not None else demo_folder()
        device, dtype = default_device_dtype(device, dtype)
        defaults = read_defaults(folder)
        components = load_components(
            folder, device=device, dtype=dtype, allow_pickle=allow_pickle, offload=offload
        )
        pipe = cls(components, device=device, dtype=dtype, offload=offload, defaults=defaults)
        if compile:
            pipe.compile()
        return pipe

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a diffusers folder (safetensors) that diffusers' own pipelines load, with the model's
        ``mmdit_flow.json`` defaults when it came with them."""
        from mmdit_flow.pipelines.loading import save_components
        from mmdit_flow.weights.io import write_json

        folder = save_components(self.components, Path(path))
        if self.defaults.recorded:
            write_json(self.defaults.to_json(), Path(path) / DEFAULTS_FILE)
        return folder

    def to(
        self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> TextToImagePipeline:
        """Move every model to ``device`` and/or cast it to ``dtype``, as diffusers' ``pipe.to`` does (also
        ``pipe.to(torch.bfloat16)``); returns the pipeline. The precision rules of ``from_pretrained`` hold:
        T5 never runs in float16 (float32 instead) and a VAE whose config sets ``force_upcast`` stays
        float32. With offloading the models stay on the CPU and ``device`` is where each one runs."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device if dtype is None else dtype
        self.device, self.dtype = default_device_dtype(
            self.device if device is None else device, self.dtype if dtype is None else dtype
        )
        place = torch.device("cpu") if self.offload else self.device
        self.transformer.to(place, self.dtype)
        for model in self.components.text_encoders.values():
            is_t5 = "T5" in type(model).__name__
            model.to(place, torch.float32 if is_t5 and self.dtype == torch.float16 else self.dtype)
        self.codec.vae.to(place, torch.float32 if self.codec.force_upcast else self.dtype)
        return self

    def compile(
        self,
        *,
        dynamic: bool | None = True,
        backend: str = "inductor",
        mode: str | None = None,
        warmup: bool = True,
        scope: str = "blocks",
    ) -> CompileReport:
        """torch.compile the transformer's repeated blocks in place (regional compilation, see
        ``compiling.py``; ``scope="model"``: its whole forward, faster for small models, not with step
        caching) and, with ``warmup``, compile them now: one forward at batch 1 and one at batch 2
        at the default size, timed. The report (also logged, and kept as ``pipe.compile_report``) gives the
        blocks, the graphs and the seconds. With ``dynamic=True`` later calls at any batch, image size, step
        count, guidance or prompt compile nothing more; changing the dtype or device (``pipe.to``) compiles
        again on the next call. Images equal eager ones up to float rounding (fp32: within 1e-5; the whole
        model 5e-5). On the CPU ``backend="inductor"`` needs a C++ compiler; ``"aot_eager"`` only traces."""
        from mmdit_flow.pipelines.compiling import compile_blocks, timed_warmup

        if scope == "model" and getattr(self.transformer, "step_cache", None) is not None:
            raise ValueError(STEP_CACHE_WITH_WHOLE_MODEL)
        options = {"dynamic": dynamic, "backend": backend, "mode": mode, "scope": scope}
        blocks = compile_blocks(self.transformer, self.family, **options)
        graphs, seconds = timed_warmup([self._warmup_forward(b) for b in (1, 2)]) if warmup else (0, 0.0)
        self.compile_report = CompileReport(blocks, graphs, seconds, scope)
        logger.info("%s", self.compile_report)
        return self.compile_report

    def _warmup_forward(self, batch: int) -> Callable[[], torch.Tensor]:
        """One transformer forward at ``batch`` with the default size and text length, as a call runs it."""
        d, scale = self.defaults, self.codec.scale_factor
        embeds = self.encode_prompt([""] * batch, d.max_sequence_length).to(self.device, self.dtype)
        shape = (batch, self.codec.channels, d.height // scale, d.width // scale)
        x = torch.zeros(shape, device=self.device, dtype=self.dtype)
        t = torch.full((batch,), 0.5, device=self.device)
        guidance = None
        if self.family == "flux" and self.guidance_embeds:
            guidance = torch.full((batch,), float(d.guidance), device=self.device)

        def forward() -> torch.Tensor:
            with self._on_device(self.transformer):
                return self.transformer(x, t, embeds.txt, embeds.vec, guidance=guidance)

        return forward

    def load_lora(
        self,
        path: str | Path,
        scale: float = 1.0,
        *,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        allow_pickle: bool = False,
    ) -> str:
        """Load a LoRA as an adapter active at ``scale``; returns its name (``default_<n>`` unless given).

        A file (or, as in diffusers, a folder holding ``pytorch_lora_weights.safetensors`` or one
        ``.safetensors``) in diffusers / peft, ai-toolkit, kohya or ComfyUI format, for this pipeline's
        family, adapting the transformer and, in whole-pipeline files, the text encoders. Several adapters
        are active at once (``set_adapters``); the models hold W0 + sum_i w_i B_i A_i, so generation costs
        what it costs without LoRAs, and ``unload_lora`` restores the base weights bit for bit
        (``weights/lora_adapters.py``)."""
        return self._lora_adapters().load(
            path, scale, adapter_name=adapter_name, weight_name=weight_name, allow_pickle=allow_pickle
        )

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activate exactly the adapters ``names`` with ``weights`` (one each or one for all; default 1)."""
        self._lora_adapters().set_adapters(names, weights)

    def unload_lora(self) -> None:
        """Remove every LoRA adapter: the base weights again, bit for bit."""
        self._lora_adapters().unload()

    def fuse_lora(self) -> None:
        """Make the current (adapted) weights the base: frees the base copies and adapters; generation is
        already as fast as without LoRAs, since adapters are merged when they change."""
        self._lora_adapters().fuse()

    def _lora_adapters(self) -> Any:  # a weights.lora_adapters.LoraAdapters, made on first use
        from mmdit_flow.weights.lora_adapters import LoraAdapters

        if getattr(self, "_adapters", None) is None:
            self._adapters = LoraAdapters({"transformer": self.transformer, **self.components.text_encoders})
        return self._adapters

    def enable_step_cache(self, threshold: float | None = None, *, config: CacheConfig | None = None) -> None:
        """Lossy step caching (``mmdit_flow/step_cache.py``, docs/generating.md): the first-block cache at
        ``threshold`` (default 0.1), or ``config`` (``FirstBlockCacheConfig`` or ``TaylorSeerCacheConfig``).
        Every call starts afresh; what it skipped is logged and kept in
        ``pipe.transformer.step_cache.stats``. Not with ``compile(scope="model")``: the compiled forward
        would be compiled again at every step; the blocks' compile (the default scope) works with it."""
        config = cache_config(threshold, config)
        if self.compile_report is not None and self.compile_report.scope == "model":
            raise ValueError(STEP_CACHE_WITH_WHOLE_MODEL)
        self.transformer.enable_cache(config)

    def disable_step_cache(self) -> None:
        """Every block at every step again."""
        self.transformer.disable_cache()

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
        """Text embeddings of prompts (an empty string is allowed here: it is the unconditional prompt).

        The last ``PROMPT_CACHE`` results are kept: a call with the same prompts (and negatives), length and
        device while the text encoders' weights are unchanged (their tensors and in-place versions, so a LoRA
        merged into an encoder counts as a change) reuses them, the same numbers without running the
        encoders (a seeds loop over one prompt encodes it once)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        models = [m for m in self.components.text_encoders.values()]
        tensors = [t for m in models for t in (*m.parameters(), *m.buffers())]
        key = (tuple(prompts), max_sequence_length, str(self.device), self.dtype)
        key += tuple((id(t), t._version) for t in tensors)
        hit = self._prompt_cache.get(key)
        # an id is only an identity while its tensor lives: the entry's weak references say it still does
        if hit is not None and all(ref() is not None for ref in hit[1]):
            self._prompt_cache.move_to_end(key)
            return PromptEmbeds(hit[0].txt.clone(), hit[0].vec.clone())  # callers may change theirs in place
        with self._on_device(*models):
            embeds = self.text.encode(prompts, max_sequence_length)
        embeds = embeds.to(device=self.device)
        refs = [weakref.ref(t) for t in tensors]
        self._prompt_cache[key] = (PromptEmbeds(embeds.txt.clone(), embeds.vec.clone()), refs)
        while len(self._prompt_cache) > PROMPT_CACHE:
            self._prompt_cache.popitem(last=False)
        return embeds

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

    def _warn_outside_training(self, prompts: list[str], height: int, width: int, steps: int) -> None:
        """One warning for the words of a call the model never saw, one for a size it was not trained at,
        one for a step count that a few-step student was not distilled for."""
        made_for = self.defaults.distilled_steps
        if made_for is not None and steps not in made_for:
            counts = ", ".join(map(str, made_for[:-1])) + " or " * (len(made_for) > 1) + str(made_for[-1])
            warnings.warn(
                f"this model was distilled to sample in {counts} steps; {steps} steps may give worse "
                f"images (leave steps unset for its default, {self.defaults.steps})",
                UserWarning,
                stacklevel=3,
            )
        unknown = self.defaults.unknown_words(prompts)
        if unknown:
            warnings.warn(
                f"this model never saw the word(s) {', '.join(map(repr, unknown))} in training, so they "
                "will be ignored or misread; pipe.defaults.vocabulary lists the "
                f"{len(self.defaults.vocabulary)} words it knows",
                UserWarning,
                stacklevel=3,
            )
        if self.defaults.outside_trained_sizes(height, width):
            low, high = self.defaults.trained_sizes
            trained = f"{low} px" if low == high else f"{low} to {high} px"
            warnings.warn(
                f"{height}x{width} px is outside the sizes this model was trained at ({trained} a side); "
                f"expect worse images, or use height=width={self.defaults.height}",
                UserWarning,
                stacklevel=3,
            )

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
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images: int | None = None,
        sampler: str = "euler",
        latents: torch.Tensor | None = None,
        output: str | None = None,
        max_sequence_length: int | None = None,
        progress: bool = True,
        callback: Callable[[int, float, torch.Tensor], None] | None = None,
        true_cfg_scale: float = 1.0,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        **diffusers_names: Any,
    ) -> Any:
        """Generate images; returns one PIL image for a str prompt with ``num_images=1``, else a list
        (``output="np"``: float32 [N, H, W, 3] in [0, 1]; ``"pt"``: [N, 3, H, W]; ``"latent"``: [N, C, h, w]).

        Unset arguments take the model's defaults (``pipe.defaults``: steps, guidance, height, width,
        max_sequence_length; for folders without ``mmdit_flow.json`` diffusers' 28 steps, guidance 7 / 3.5
        and the native size), ``num_images`` 1 and ``output`` "pil". diffusers' names
        ``num_inference_steps``, ``guidance_scale``, ``num_images_per_prompt`` and ``output_type`` are taken
        for ours. ``callback(i, t, latents)`` runs after step i with the time reached and the fp32 latents.

        With ``image`` (PIL, numpy or tensor) it is image-to-image from ``strength`` (default 0.6) along
        the path to noise, and with ``mask_image`` as well inpainting (white regenerated, the rest kept);
        ``height`` / ``width`` default to the image's size. See ``edit.py``.
        """
        from mmdit_flow.sampling import cfg, solve

        named = checks.diffusers_names(
            diffusers_names,
            {"steps": steps, "guidance": guidance, "num_images": num_images, "output": output},
        )
        d = self.defaults
        scale = self.codec.scale_factor
        edit = ImageEdit.from_call(image, mask_image, strength, latents)  # None: text-to-image
        if edit is not None:
            height, width = edit.size(height, width, scale * self.patch)
        guidance = named["guidance"]
        steps = d.steps if named["steps"] is None else named["steps"]
        num_images = 1 if named["num_images"] is None else named["num_images"]
        output = "pil" if named["output"] is None else named["output"]
        height = d.height if height is None else height
        width = d.width if width is None else width
        max_sequence_length = d.max_sequence_length if max_sequence_length is None else max_sequence_length
        args = checks.check_call(
            family=self.family,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=d.guidance if guidance is None else guidance,
            guidance_given=guidance is not None,
            guidance_embeds=self.guidance_embeds,
            true_cfg_scale=true_cfg_scale,
            height=height,
            width=width,
            multiple=scale * self.patch,
            largest=self.largest,
            num_images=num_images,
            sampler=sampler,
            output=output,
            seed=seed,
            generator=generator,
            given=checks.GivenEmbeds.from_tensors(
                prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
            ),
            embed_dims=(self.transformer.config.context_dim, self.transformer.config.vec_dim),
            max_sequence_length=max_sequence_length,
            limit=self.text.limit,
            progress=progress,
            callback=callback,
        )
        steps, num_images, height, width = args.steps, args.num_images, args.height, args.width
        self._warn_outside_training(args.prompts + [n for n in args.negatives if n], height, width, steps)
        h, w = height // scale, width // scale
        n = args.batch * num_images
        if latents is not None:
            checks.check_latents(latents, (n, self.codec.channels, h, w))
        ts = self._grid(steps, h, w)  # before any model runs: a grid too fine for fp32 raises here
        if edit is not None:
            edit.prepare(height, width, n, scale)
            ts = edit.grid(ts)

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

        def draw_noise() -> torch.Tensor:
            return self._noise(n, h, w, args.generators)

        if latents is not None:
            x = latents.to(self.device, self.dtype)
        elif edit is not None:
            with self._on_device(self.codec.vae):
                start = edit.start(self.codec, float(ts[0]), n, args.generators, draw_noise)
            x = start.x
        else:
            x = draw_noise()

        from tqdm.auto import tqdm

        cache = self.transformer.step_cache  # when enabled: a new trajectory, nothing kept from the last call
        if cache is not None:
            cache.reset()
        with tqdm(total=len(ts) - 1, disable=not progress, desc="sampling") as bar:

            def step_done(i: int, t: float, state: torch.Tensor) -> None:
                bar.update()
                if callback is not None:
                    callback(i, t, state)

            with self._on_device(self.transformer):
                if edit is None:
                    z = solve(fn, x, ts, method=sampler, callback=step_done, **kwargs)
                else:
                    z = edit.integrate(start, fn, ts, method=sampler, callback=step_done, **kwargs)
        if cache is not None:
            logger.info("%s", cache.stats)

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
