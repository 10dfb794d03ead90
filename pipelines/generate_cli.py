"""``mmdit-flow generate``: text to image files with a diffusers SD3 / Flux folder (or the demo model).

The file format follows the output's suffix (``FORMATS``). Beside the images, ``metadata.jsonl`` records each
file's prompt (the Hugging Face imagefolder convention, one ``{"file_name", "text"}`` object per line) so that
``mmdit-flow eval FOLDER`` can score them; a later run into the same folder adds its lines and replaces those
of the files it overwrote. Files are written atomically and get the mode a plain ``open()`` gives (the umask).

``--image IN [--strength S]`` edits an image file (image-to-image); with ``--mask FILE`` it inpaints the
mask's white region (``pipelines/edit.py``). ``--lora PATH[:SCALE]`` (repeatable) applies LoRAs, each at its
weight, through ``pipe.load_lora`` and ``pipe.set_adapters``.

A PNG carries its generation parameters in a text chunk (``parameters.py``; a call without ``--seed`` draws
one at random and records it); ``--from-png FILE`` makes that image again, with any option given beside it
taking the place of the recorded value. ``--prompts FILE --out DIR`` generates one image per line
(``pipelines/generate.py``, also run as ``accelerate launch -m mmdit_flow.pipelines.generate``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from mmdit_flow.pipelines.parameters import GenerationParameters

HELP = (
    "generate images from a text prompt (or edit one: --image, --mask; or one per line of a file: --prompts) "
    "and write them as PNG, JPEG or WebP files"
)
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
# output suffix -> (PIL format, save options); a name without a suffix gets ".png"
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".webp": ("WEBP", {"quality": 95}),
}
METADATA = "metadata.jsonl"  # what `mmdit-flow eval` reads (training/eval_cli.py), through read_metadata


DEMO_FOLDER = "tiny-shapes"  # pipelines.loading.DEMO_FOLDER, which imports torch (tested equal)


def demo_defaults() -> dict[str, Any]:
    """The demo model's recorded defaults (its mmdit_flow.json), read without torch for --help; {} if
    the file is missing or unreadable."""
    import mmdit_flow.weights
    from mmdit_flow.pipelines.defaults import FILE

    path = Path(mmdit_flow.weights.__file__).parent / DEMO_FOLDER / FILE
    try:
        defaults = json.loads(path.read_text(encoding="utf-8")).get("defaults", {})
    except (OSError, ValueError, AttributeError):  # --help must work whatever the file holds
        return {}
    return defaults if isinstance(defaults, dict) else {}


def _default(demo: dict[str, Any], key: str) -> str:
    """ "default: the model's; the demo model: 28", or only the first part where the demo has no value."""
    if key not in demo:
        return "default: the model's"
    return f"default: the model's; the demo model: {demo[key]}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    demo = demo_defaults()
    parser.add_argument("prompt", nargs="?", default=None, help="the text prompt")
    parser.add_argument("--model", default=None, help="diffusers SD3 / Flux folder (default: the demo model)")
    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps ({_default(demo, 'steps')})")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"guidance scale, SD3: CFG, Flux dev: distilled ({_default(demo, 'guidance')})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed (same seed, same image; default: drawn at random and recorded in the PNG; "
        "with --prompts the seed of line 0, line i gets seed + i, default 0)",
    )
    parser.add_argument(
        "--height", type=int, default=None, help=f"image height in pixels ({_default(demo, 'height')})"
    )
    parser.add_argument(
        "--width", type=int, default=None, help=f"image width in pixels ({_default(demo, 'width')})"
    )
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    parser.add_argument("--sampler", default=None, help="euler | midpoint | heun | rk4 (default euler)")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help=f"T5 tokens ({_default(demo, 'max_sequence_length')})",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output file, .png, .jpg/.jpeg or .webp (default out.png); several: out-0.png, out-1.png ...; "
        f"each file's prompt goes to {METADATA} beside it (for `mmdit-flow eval`)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--offload", action="store_true", help="keep models on the CPU, move each while it runs"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--step-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="lossy step caching: reuse the blocks' work of earlier steps while the first block's output "
        "changes by less than THRESHOLD (e.g. 0.1; docs/generating.md); default off",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="apply a LoRA: a file or a folder holding one, in diffusers / peft, kohya or ComfyUI format, "
        "for the transformer and, in whole-pipeline files, the text encoders; SCALE is its weight (default "
        "1, may be negative); repeat for several at once, e.g. --lora style.safetensors:0.8 --lora subject/",
    )
    parser.add_argument(
        "--image",
        default=None,
        help="start from this image file (image-to-image); the size defaults to the image's",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --image: how far towards noise to start, 0 < S <= 1 (default 0.6; 1 keeps only the size)",
    )
    parser.add_argument(
        "--mask", default=None, help="with --image: inpaint, regenerating the white region of this mask file"
    )
    parser.add_argument(
        "--from-png",
        default=None,
        metavar="FILE",
        help="make again the image this PNG (written by mmdit-flow) records; options given beside it replace "
        "the recorded values",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="a text file, one prompt a line: one PNG per line into --out (line i: DIR/0000i.png, seed "
        "--seed + i); a stopped run continues; several processes with accelerate launch -m "
        "mmdit_flow.pipelines.generate",
    )
    parser.add_argument("--out", default=None, metavar="DIR", help="with --prompts: the output folder")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="with --prompts: images per pipeline call (default 1)"
    )


def output_paths(output: str, n: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png ... for several; ``out`` becomes out.png.

    ValueError for a suffix that is not an image format we write (``FORMATS``).
    """
    path = Path(output)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix.lower() not in FORMATS:
        raise ValueError(
            f"-o {output}: unknown image format {path.suffix!r}; end the name in one of {', '.join(FORMATS)}"
        )
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_image(image: Image.Image, path: Path, params: GenerationParameters | None = None) -> None:
    """Write ``image`` in the format its suffix names, atomically (no half-written file on a stop); a PNG
    gets ``params`` in its text chunk."""
    from mmdit_flow.weights.io import atomic_path

    fmt, options = FORMATS[path.suffix.lower()]
    if params is not None and fmt == "PNG":
        options = {**options, "pnginfo": params.png_info()}
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **options)


def read_metadata(path: Path) -> list[tuple[str, str]]:
    """(file_name, caption) pairs from a metadata.jsonl; ValueError naming the file (and the line) if it is
    not UTF-8 or a line is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from err
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["file_name"]), str(row["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{n}: expected a JSON object with 'file_name' and 'text' ({err})"
            ) from err
    return pairs


def read_captions(path: Path) -> dict[str, str]:
    """file_name -> text of an existing ``metadata.jsonl`` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        return dict(read_metadata(path))
    except ValueError as err:
        raise ValueError(f"{err}; fix or delete {path}, where generate records each image's prompt") from err


def write_captions(path: Path, captions: dict[str, str]) -> None:
    from mmdit_flow.weights.io import atomic_path

    lines = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def check_device(name: str) -> None:
    """ValueError, saying what to pass instead, for a device this machine cannot run on."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA GPU is visible" if torch.version.cuda else "this torch is built without CUDA"
            raise ValueError(f"--device {name}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")


def open_image(path: str, flag: str) -> Image.Image:
    """An image file, EXIF rotation applied; ValueError naming the file when it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except FileNotFoundError as err:
        raise ValueError(f"{flag} {path}: no such file") from err
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise ValueError(f"{flag} {path}: cannot read the image ({err})") from err


def check_step_cache(threshold: float | None) -> None:
    """ValueError naming --step-cache for a threshold the first-block cache refuses."""
    if threshold is not None:
        from mmdit_flow.step_cache import FirstBlockCacheConfig

        try:
            FirstBlockCacheConfig(threshold)
        except ValueError as err:
            raise ValueError(f"--step-cache: {err}") from err


LORA_FORM = "--lora PATH or --lora PATH:SCALE, SCALE a number (e.g. --lora style.safetensors:0.8)"


def parse_lora(spec: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]`` -> (path, scale), the scale 1 when not given; ValueError saying the form.

    The scale is what follows the last colon, unless that holds a slash (a colon inside the path, as in
    ``C:\\loras\\x.safetensors``) or is not a number and the whole text names an existing path."""
    path, colon, tail = spec.rpartition(":")
    if not colon or "/" in tail or "\\" in tail:
        path, tail = spec, None
    if tail is not None:
        try:
            scale = float(tail)
        except ValueError:
            if Path(spec).exists():
                return spec, 1.0
            why = f"the scale {tail!r} is not a number"
            raise ValueError(f"--lora {spec}: {why}; write {LORA_FORM}") from None
        if not math.isfinite(scale):
            raise ValueError(f"--lora {spec}: the scale must be a finite number; write {LORA_FORM}")
    else:
        scale = 1.0
    if not path:
        raise ValueError(f"--lora {spec!r}: no path before the scale; write {LORA_FORM}")
    return path, scale


def lora_arguments(specs: list[str] | None) -> list[tuple[str, float]]:
    """(LoRA file, scale) of each ``--lora``, a folder's file found (as ``pipe.load_lora`` finds it), all
    checked before any model loads."""
    if not specs:
        return []
    from mmdit_flow.weights.lora import find_lora_file

    loras = []
    for spec in specs:
        path, scale = parse_lora(spec)
        if not Path(path).exists():
            raise ValueError(f"--lora {path}: no such file or folder; pass a LoRA file or its folder")
        try:
            loras.append((str(find_lora_file(path).resolve()), scale))
        except ValueError as err:
            raise ValueError(f"--lora {path}: {err}") from err
    return loras


def load_loras(pipe: Any, loras: list[tuple[str, float]]) -> None:
    """Load each LoRA as an adapter of ``pipe`` and make exactly these active, each at its scale; the
    engine's errors (a LoRA for another model, shapes that do not fit) name the file."""
    names = []
    for i, (path, _) in enumerate(loras):
        try:
            names.append(pipe.load_lora(path, adapter_name=f"{i}-{Path(path).stem}"))
        except ValueError as err:
            raise ValueError(f"--lora {path}: {err}") from err
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])


def _edit_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """image / mask_image / strength for the pipeline from --image, --mask and --strength."""
    if args.image is None:
        for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise ValueError(f"{flag} needs --image (the image to edit)")
        return {}
    from mmdit_flow.pipelines.edit import check_strength

    edit = {"image": open_image(args.image, "--image")}
    if args.mask is not None:
        edit["mask_image"] = open_image(args.mask, "--mask")
    if args.strength is not None:
        try:
            edit["strength"] = check_strength(args.strength)
        except ValueError as err:
            raise ValueError(f"--{err}") from err
    return edit


def run(args: argparse.Namespace) -> int:
    """Generate and save; bad arguments or folders print the error and return 2."""
    try:
        if args.prompts is not None:
            if args.prompt is not None or args.from_png is not None:
                raise ValueError("--prompts reads the prompts from its file; drop the prompt and --from-png")
            if args.out is None:
                raise ValueError("--prompts needs --out DIR, the folder for the images")
            from mmdit_flow.pipelines import generate

            return generate.run(args)
        if args.out is not None or args.batch_size != 1:
            raise ValueError("--out and --batch-size go with --prompts FILE (for one prompt use -o FILE)")
        if args.from_png is not None:
            _fill_from_png(args)
        if args.prompt is None:
            raise ValueError("give a prompt, --from-png FILE, or --prompts FILE --out DIR")
        return _generate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mmdit-flow generate: error: {err}", file=sys.stderr)
        return 2


def _fill_from_png(args: argparse.Namespace) -> None:
    """Take every option left unset from the parameters the PNG records."""
    from mmdit_flow.pipelines.parameters import GenerationParameters

    params = GenerationParameters.from_png(args.from_png)
    recorded = {
        "prompt": params.prompt,
        "negative": params.negative,
        "steps": params.steps,
        "guidance": params.guidance,
        "seed": params.seed,
        "sampler": params.sampler,
        "model": params.model_path,
        "height": params.height,
        "width": params.width,
        "max_sequence_length": params.max_sequence_length,
        "image": params.image,
        "mask": params.mask,
        "strength": params.strength,
        "step_cache": params.step_cache,
        "lora": [f"{path}:{scale!r}" for path, scale in params.lora] or None,
    }
    for name, value in recorded.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.num_images == 1 and params.num_images > 1:
        # image `index` of a --num-images call: all of them share one seed, so make them all, keep that one
        args.num_images, args.keep_index = params.num_images, params.index


def _generate(args: argparse.Namespace) -> int:
    # everything that can be checked before loading a model is checked first
    keep = getattr(args, "keep_index", None)
    paths = output_paths(args.output or "out.png", 1 if keep is not None else args.num_images)
    captions_path = paths[0].parent / METADATA
    captions = read_captions(captions_path)
    if args.device is not None:
        check_device(args.device)
    edit = _edit_arguments(args)
    check_step_cache(args.step_cache)
    loras = lora_arguments(args.lora)

    import torch

    from mmdit_flow.pipelines import TextToImagePipeline

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = TextToImagePipeline.from_pretrained(
        args.model, device=args.device, dtype=dtype, offload=args.offload
    )
    load_loras(pipe, loras)
    if args.step_cache is not None:
        pipe.enable_step_cache(args.step_cache)
    # only what the user gave: the rest are the model's defaults
    given = {
        "steps": args.steps,
        "guidance": args.guidance,
        "height": args.height,
        "width": args.width,
        "max_sequence_length": args.max_sequence_length,
    }
    if args.seed is None:  # drawn here rather than by torch, so that the PNG can record it
        import secrets

        args.seed = secrets.randbelow(2**32)
    images = pipe(
        [args.prompt],
        negative_prompt=args.negative,
        seed=args.seed,
        num_images=args.num_images,
        sampler=args.sampler or "euler",
        progress=not args.no_progress,
        **edit,
        **{name: value for name, value in given.items() if value is not None},
    )
    records = _parameters(pipe, args, given, images, loras)
    if keep is not None:
        images, records = [images[keep]], [records[keep]]
    for image, path, params in zip(images, paths, records, strict=True):
        save_image(image, path, params)
        captions[path.name] = args.prompt
        print(path)
    write_captions(captions_path, captions)
    return 0


def _parameters(
    pipe, args: argparse.Namespace, given: dict[str, Any], images: list, loras: list[tuple[str, float]]
) -> list[GenerationParameters]:
    """What each image of a call records in its PNG (the size is the image's: an edit takes its input's)."""
    from mmdit_flow.pipelines.parameters import GenerationParameters, resolved_settings

    settings = resolved_settings(pipe, **given)
    out = []
    for index, image in enumerate(images):
        fields = {**settings, "height": image.height, "width": image.width}
        out.append(
            GenerationParameters(
                prompt=args.prompt,
                negative=args.negative,
                seed=args.seed,
                sampler=args.sampler or "euler",
                model=GenerationParameters.model_name(args.model),
                num_images=args.num_images,
                index=index,
                image=None if args.image is None else str(Path(args.image).resolve()),
                mask=None if args.mask is None else str(Path(args.mask).resolve()),
                strength=args.strength,
                step_cache=args.step_cache,
                lora=tuple(loras),
                **fields,
            )
        )
    return out
