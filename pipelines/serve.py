"""``mmdit-flow serve``: a local web page to generate and edit images (docs/serving.md).

The page (Gradio, the ``serve`` extra) takes a prompt and a negative, the model, steps, guidance, seed, size
and sampler, shows the image forming step by step (the predicted clean image of each step, decoded), edits an
uploaded image (image-to-image; with a mask, inpainting) and keeps a gallery of what was made with its
parameters. One model is in memory at a time (picking another replaces it) and requests wait in one queue.

``Studio`` is the request handler, usable without Gradio: ``Studio.generate(...)`` returns a ``Result``
whose ``error`` holds the message of bad input (the pipeline's ValueError) instead of raising it.
Light: torch and Gradio are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HELP = (
    "Open a local web page to generate and edit images, watch them form and keep a gallery "
    "(needs the serve extra: pip install 'mmdit-flow[serve]')."
)
SAMPLERS = ("euler", "midpoint", "heun", "rk4")
GALLERY_SIZE = 64  # the newest images the gallery keeps
# the result fills its box, small images scaled up without blur
CSS = "#result img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="shipped:tiny-shapes",
        help="diffusers SD3 / Flux folder or shipped:NAME, loaded at start (default shipped:tiny-shapes); "
        "the page offers it and the shipped models",
    )
    parser.add_argument("--port", type=int, default=7860, help="port on localhost (default 7860)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no-preview", action="store_true", help="show only the finished image, no steps")


@dataclasses.dataclass
class Result:
    """What one request made: the image and its parameters, or the error message for the page."""

    image: Any = None  # PIL image
    parameters: dict[str, Any] | None = None
    error: str | None = None


def _number(value: Any, name: str, kind: type, positive: bool = True) -> Any:
    """A form value as ``kind`` (None stays None); ValueError naming the field otherwise."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if kind is int:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        number = int(number)
    if positive and number <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return number


class Studio:
    """The page's request handler: one pipeline in memory, one request at a time, and the gallery.

    ``loader(model, device)`` makes a pipeline (default ``TextToImagePipeline.from_pretrained``).
    """

    def __init__(
        self,
        model: str = "shipped:tiny-shapes",
        device: str | None = None,
        loader: Callable[[str, str | None], Any] | None = None,
    ) -> None:
        self.device = device
        self._loader = loader
        self._lock = threading.Lock()  # one model, one request: a second waits (the page queues as well)
        self.model: str | None = None
        self.pipe: Any = None
        self.gallery: list[tuple[Any, dict[str, Any]]] = []  # (image, parameters), newest first
        self.load(model)

    def load(self, model: str) -> Any:
        """The pipeline of ``model``, loaded in place of the one in memory if it is another."""
        if model != self.model:
            previous, self.pipe, self.model = self.model, None, None  # free the old one before the next loads
            try:
                self.pipe = self._make(model)
            except Exception:
                if previous is not None:  # a model that does not load leaves the one that did
                    self.pipe = self._make(previous)
                    self.model = previous
                raise
            self.model = model
        return self.pipe

    def _make(self, model: str) -> Any:
        if self._loader is not None:
            return self._loader(model, self.device)
        from mmdit_flow.pipelines import TextToImagePipeline

        return TextToImagePipeline.from_pretrained(model, device=self.device)

    @property
    def models(self) -> list[str]:
        """The models the page offers: the one given at start and the shipped ones."""
        from mmdit_flow.shipped import SHIPPED, shipped_models

        shipped = [SHIPPED + name for name in shipped_models()]
        return [*([] if self.model in shipped else [self.model]), *shipped]

    def generate(
        self,
        prompt: str,
        negative: str | None = None,
        *,
        model: str | None = None,
        steps: Any = None,
        guidance: Any = None,
        seed: Any = None,
        height: Any = None,
        width: Any = None,
        sampler: str = "euler",
        image: Any = None,
        mask: Any = None,
        strength: Any = None,
        preview: Callable[[int, int, Any], None] | None = None,
    ) -> Result:
        """Make one image; a blank field takes the model's default, a blank seed is drawn at random.

        ``preview(i, steps, image)`` gets each step's predicted clean image. Bad input comes back as
        ``Result.error`` (the message to show), never as an exception.
        """
        with self._lock:
            try:
                return self._generate(
                    prompt,
                    negative,
                    model,
                    steps,
                    guidance,
                    seed,
                    height,
                    width,
                    sampler,
                    image,
                    mask,
                    strength,
                    preview,
                )
            except ValueError as err:
                return Result(error=str(err))
            except Exception as err:  # noqa: BLE001 - the server answers every request and stays up
                return Result(error=f"generation failed: {type(err).__name__}: {err}")

    def _generate(
        self,
        prompt,
        negative,
        model,
        steps,
        guidance,
        seed,
        height,
        width,
        sampler,
        image,
        mask,
        strength,
        preview,
    ) -> Result:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt: type a prompt (the text the image should show)")
        if mask is not None and image is None:
            raise ValueError("mask: upload the image to inpaint as well (the mask marks its region to redo)")
        steps = _number(steps, "steps", int)
        guidance = _number(guidance, "guidance", float, positive=False)
        height = _number(height, "height", int)
        width = _number(width, "width", int)
        seed = _number(seed, "seed", int, positive=False)
        if seed is not None and not 0 <= seed < 2**64:
            raise ValueError(
                f"seed must be between 0 and 2**64 - 1, got {seed}; leave it blank for a random one"
            )
        if seed is None:
            seed = secrets.randbelow(2**32)
        negative = negative or None
        edit: dict[str, Any] = {}
        if image is not None:
            edit["image"] = image
            if mask is not None:
                edit["mask_image"] = mask
            if strength is not None:
                edit["strength"] = _number(strength, "strength", float, positive=False)
        pipe = self.load(model or self.model)
        given = {"steps": steps, "guidance": guidance, "height": height, "width": width}
        given = {k: v for k, v in given.items() if v is not None}
        started = time.perf_counter()
        out = pipe(
            prompt,
            negative_prompt=negative,
            seed=seed,
            sampler=sampler,
            progress=False,
            callback=None
            if preview is None
            else self._previewer(pipe, preview, steps or pipe.defaults.steps),
            **edit,
            **given,
        )
        from mmdit_flow.pipelines.parameters import resolved_settings

        settings = resolved_settings(
            pipe,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            max_sequence_length=None,
        )
        parameters = {
            "prompt": prompt,
            "negative": negative,
            "model": self.model,
            **settings,
            "height": out.height,  # an edit takes its input's size
            "width": out.width,
            "seed": seed,
            "sampler": sampler,
            "edit": "inpaint" if mask is not None else "img2img" if image is not None else None,
            "strength": edit.get("strength", 0.6) if image is not None else None,
            "seconds": round(time.perf_counter() - started, 2),
        }
        self.gallery.insert(0, (out, parameters))
        del self.gallery[GALLERY_SIZE:]
        return Result(image=out, parameters=parameters)

    @staticmethod
    def _previewer(pipe: Any, preview: Callable[[int, int, Any], None], steps: int) -> Callable:
        """A pipeline callback that decodes each step's predicted clean latents x0 = x_t - t v, with the
        velocity v taken from the step just made (exact for Euler); the first step shows x_t itself."""
        import torch

        from mmdit_flow.pipelines.vae import to_pil

        last: dict[str, Any] = {}

        def callback(i: int, t: float, latents: torch.Tensor) -> None:
            x0 = latents
            if last and last["t"] != t:
                v = (latents - last["x"]) / (t - last["t"])
                x0 = latents - t * v
            last.update(x=latents.clone(), t=t)
            with torch.no_grad():
                preview(i + 1, steps, to_pil(pipe.codec.decode(x0[:1].to(pipe.device)))[0])

        return callback


def caption(parameters: dict[str, Any]) -> str:
    """A gallery caption: the prompt and the settings that make the image again."""
    p = parameters
    text = f"{p['prompt']} | {p['steps']} steps, guidance {p['guidance']}, seed {p['seed']}, {p['sampler']}"
    text += f", {p['width']}x{p['height']}, {p['model']}"
    if p.get("negative"):
        text += f" | negative: {p['negative']}"
    if p.get("edit"):
        text += f" | {p['edit']}, strength {p['strength']}"
    return text


def build_app(studio: Studio, show_preview: bool = True) -> Any:
    """The Gradio page over ``studio`` (needs the serve extra)."""
    import itertools
    import queue
    import tempfile
    from pathlib import Path

    import gradio as gr

    from mmdit_flow.weights.io import atomic_path

    d = studio.pipe.defaults
    # Every image goes to the page as a PNG file of its own, written once (atomically). Gradio caches a PIL
    # image by its content and rewrites that file in place each time it is sent, so an image sent twice (the
    # gallery, the last step's preview) could be read half-written by the browser.
    folder = Path(tempfile.mkdtemp(prefix="mmdit-flow-serve-"))
    names = itertools.count()
    files: dict[int, tuple[Any, str]] = {}  # id(image) -> (image, its file) for the gallery's images
    previews: list[Path] = []  # the last request's preview files, removed when the next one starts
    lock = threading.Lock()

    def to_file(image: Any) -> str:
        path = folder / f"{next(names):06d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        return str(path)

    def gallery_items() -> list[tuple[str, str]]:
        with lock:
            entries = {}
            for image, _ in studio.gallery:
                entry = files.get(id(image))
                entries[id(image)] = (
                    entry if entry is not None and entry[0] is image else (image, to_file(image))
                )
            for key in files.keys() - entries.keys():  # left the gallery
                Path(files[key][1]).unlink(missing_ok=True)
            files.clear()
            files.update(entries)
            return [(files[id(image)][1], caption(p)) for image, p in studio.gallery]

    def run(prompt, negative, model, steps, guidance, seed, height, width, sampler, image, mask, strength):
        updates: queue.Queue = queue.Queue()
        for path in previews:
            path.unlink(missing_ok=True)
        previews.clear()

        def preview(i: int, n: int, img: Any) -> None:
            if i < n:  # the last step's preview is the finished image
                previews.append(Path(to_file(img)))
                updates.put((str(previews[-1]), f"step {i} / {n}"))

        result: list[Result] = []

        def work() -> None:
            result.append(
                studio.generate(
                    prompt,
                    negative,
                    model=model,
                    steps=steps,
                    guidance=guidance,
                    seed=seed,
                    height=height,
                    width=width,
                    sampler=sampler,
                    image=image,
                    mask=mask,
                    strength=strength,
                    preview=preview if show_preview else None,
                )
            )
            updates.put(None)

        threading.Thread(target=work, daemon=True).start()
        yield gr.update(), "generating ...", gr.update(), gr.update()
        while (item := updates.get()) is not None:
            yield item[0], item[1], gr.update(), gr.update()
        res = result[0]
        if res.error is not None:
            yield None, f"**Error:** {res.error}", None, gr.update()
            return
        p = res.parameters
        status = f"done in {p['seconds']} s (seed {p['seed']})"
        items = gallery_items()
        yield items[0][0], status, p, items

    with gr.Blocks(title="mmdit-flow", analytics_enabled=False) as app:
        gr.Markdown("# mmdit-flow\nType a prompt and press Generate. Blank fields take the model's defaults.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                model = gr.Dropdown(studio.models, value=studio.model, label="Model", elem_id="model")
                with gr.Row():
                    steps = gr.Number(d.steps, label="Steps", precision=0, elem_id="steps")
                    guidance = gr.Number(d.guidance, label="Guidance", elem_id="guidance")
                    seed = gr.Number(None, label="Seed (blank: random)", precision=0, elem_id="seed")
                with gr.Row():
                    height = gr.Number(d.height, label="Height", precision=0, elem_id="height")
                    width = gr.Number(d.width, label="Width", precision=0, elem_id="width")
                    sampler = gr.Dropdown(list(SAMPLERS), value="euler", label="Sampler", elem_id="sampler")
                with gr.Accordion("Edit an image (image-to-image, inpainting)", open=False):
                    image = gr.Image(label="Image to edit", type="pil", elem_id="image")
                    mask = gr.Image(label="Mask (white: regenerate)", type="pil", elem_id="mask")
                    strength = gr.Slider(
                        0.05, 1.0, value=0.6, step=0.05, label="Strength", elem_id="strength"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                result = gr.Image(
                    label="Image", type="filepath", interactive=False, height=384, elem_id="result"
                )
                status = gr.Markdown(elem_id="status")
                parameters = gr.JSON(label="Parameters", elem_id="parameters")
        gallery = gr.Gallery(gallery_items(), label="Gallery", columns=6, elem_id="gallery")
        inputs = [
            prompt,
            negative,
            model,
            steps,
            guidance,
            seed,
            height,
            width,
            sampler,
            image,
            mask,
            strength,
        ]
        outputs = [result, status, parameters, gallery]
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)  # Enter in the prompt box
        app.load(gallery_items, None, gallery, api_name=False)  # a reloaded page shows the gallery so far
    app.queue(default_concurrency_limit=1)
    return app


def run(args: argparse.Namespace) -> int:
    """Load the model, serve the page until interrupted; bad arguments print the error and return 2."""
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print(
            "mmdit-flow serve: error: the web page needs Gradio; install it with "
            "pip install 'mmdit-flow[serve]'",
            file=sys.stderr,
        )
        return 2
    if not 0 < args.port < 65536:
        print(f"mmdit-flow serve: error: --port {args.port} is not a port; use 1 ... 65535", file=sys.stderr)
        return 2
    try:
        if args.device is not None:
            from mmdit_flow.pipelines.generate_cli import check_device

            check_device(args.device)
        studio = Studio(args.model, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmdit-flow serve: error: {err}", file=sys.stderr)
        return 2
    app = build_app(studio, show_preview=not args.no_preview)
    print(f"mmdit-flow serve: open http://{args.host}:{args.port} (Ctrl-C stops)")
    launch(app, args.host, args.port)
    return 0


def launch(app: Any, host: str, port: int, **kwargs: Any) -> Any:
    """Serve the page (``prevent_thread_lock=True`` in ``kwargs``: from a thread, returning at once)."""
    return app.launch(server_name=host, server_port=port, show_error=True, css=CSS, **kwargs)
