"""Assemble the tiny-shapes demo model (``weights/tiny-shapes/``) in the diffusers SD3 layout.

The recipe (docs/quality.md has the wall times), run from a scratch folder::

    python -m mmdit_flow.training.recipes.tiny_shapes components weights/tiny-shapes   # encoders, VAE
    python -m mmdit_flow.training.recipes.tiny_shapes prepare --components weights/tiny-shapes  # data
    mmdit-flow cache TINY_SHAPES_YAML                                             # latents + text embeddings
    accelerate launch --num_processes 1 --cpu -m mmdit_flow.training TINY_SHAPES_YAML
    python -m mmdit_flow.training.recipes.tiny_shapes assemble runs/tiny-shapes/train weights/tiny-shapes

where ``TINY_SHAPES_YAML`` is ``training/recipes/tiny_shapes/config.yaml``
(``python -m mmdit_flow.training.recipes.tiny_shapes config`` prints its installed path). ``prepare`` writes
the training split of :mod:`mmdit_flow.training.recipes.tiny_shapes.shapes` as an image folder and a
*staging* pipeline folder: the components (VAE, text encoders, tokenizers) plus a random
transformer of the config's shape, which is what ``mmdit-flow cache`` loads its encoders from.
``assemble`` copies the trained transformer (``<run>/final/transformer``, or the newest checkpoint with
``--checkpoint``) next to the components, writes the scheduler (``FlowMatchEulerDiscreteScheduler`` with
:data:`SHIFT`) and ``model_index.json`` last, so a folder with ``model_index.json`` is always complete.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Sampling shift of the shipped scheduler: t <- shift t / (1 + (shift - 1) t), the shift the model trains
# with (training/recipes/tiny_shapes/config.yaml; why 3: docs/quality.md). Sampling at another shift was not
# measurably # better on the validation captions (bench/select_sampling.py).
SHIFT = 3.0
CONFIG = Path(__file__).with_name("config.yaml")
TRAIN_IMAGES = 10_000
# Share of two-object scenes in the training images (None: the generator's own even odds, 44 % after the
# training split drops held-out pairs). 0.3 and 0.75 were measured worse at 5000 steps (docs/quality.md).
TWO_OBJECT_SHARE: float | None = None
COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_scheduler(folder: str | Path, shift: float = SHIFT) -> Path:
    """``<folder>/scheduler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` with a static ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift <= 0:
        raise ValueError(f"shift must be > 0 (1.0 means no shift), got {shift}")
    out = Path(folder) / "scheduler"
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(out)
    return out


def write_model_index(folder: str | Path) -> Path:
    """``<folder>/model_index.json`` for ``StableDiffusion3Pipeline``; refuses an incomplete folder."""
    import diffusers

    from mmdit_flow.weights.io import write_json

    folder = Path(folder)
    missing = [n for n in (*COMPONENTS, "transformer", "scheduler") if not (folder / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; build the components first "
            "(python -m mmdit_flow.training.recipes.tiny_shapes components ...) and the transformer"
        )
    index = {"_class_name": MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__}
    index.update({k: v for k, v in MODEL_INDEX.items() if k != "_class_name"})
    return write_json(index, folder / "model_index.json")


def _copy_components(components: Path, out: Path) -> None:
    if components.resolve() == out.resolve():
        return
    for name in COMPONENTS:
        src = components / name
        if not src.is_dir():
            raise FileNotFoundError(
                f"{src} is missing; point --components at the tiny-shapes components folder"
            )
        shutil.copytree(src, out / name, dirs_exist_ok=True)


def stage(components: str | Path, out: str | Path, config: Any, shift: float = SHIFT) -> Path:
    """A complete pipeline folder for caching: ``components``' VAE, encoders and tokenizers, a random
    transformer of ``config``'s shape (a ``TrainConfig``), the scheduler and ``model_index.json``."""
    from mmdit_flow.training.trainer import build_model
    from mmdit_flow.weights import save_transformer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _copy_components(Path(components), out)
    save_transformer(build_model(config).eval(), out / "transformer", format="diffusers")
    write_scheduler(out, shift)
    write_model_index(out)
    return out


def checkpoint_transformer(checkpoint: str | Path, config: Any, out: str | Path, *, ema: bool = True) -> Path:
    """Export the transformer of an accelerate checkpoint (``<run>/checkpoints/step-*``) as a diffusers
    folder ``out``: the EMA weights when the checkpoint holds them and ``ema``, else the raw weights."""
    from safetensors.torch import load_file

    from mmdit_flow.training.checkpoint import EMA_FILE, refuse_pickled_state
    from mmdit_flow.training.ema import EMA
    from mmdit_flow.training.trainer import build_model
    from mmdit_flow.weights import save_transformer

    checkpoint = Path(checkpoint)
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; pass a complete checkpoint folder (step-XXXXXXXX)")
    model = build_model(config)
    model.load_state_dict(load_file(str(weights)))
    refuse_pickled_state(checkpoint)
    if ema and (checkpoint / EMA_FILE).is_file():
        averaged = EMA(model, decay=0.0)
        averaged.load(checkpoint / EMA_FILE)
        averaged.copy_to(model)
        logger.info("using the EMA weights of %s", checkpoint / EMA_FILE)
    return save_transformer(model.eval(), out, format="diffusers")


def assemble(
    run_dir: str | Path,
    out: str | Path,
    *,
    components: str | Path | None = None,
    checkpoint: str | Path | None = None,
    config: Any = None,
    shift: float = SHIFT,
) -> Path:
    """Put the trained transformer of ``run_dir`` into ``out`` next to the components and finish the folder.

    ``checkpoint``: export this checkpoint folder (``"latest"``: the newest complete one) instead of
    ``<run_dir>/final``; it needs the run's ``config`` (read from ``<run_dir>/config.yaml`` when None).
    """
    from mmdit_flow.training.checkpoint import latest_checkpoint
    from mmdit_flow.training.config import load_config

    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _copy_components(Path(components) if components is not None else out, out)
    index = out / "model_index.json"
    if index.exists():
        index.unlink()  # the folder is incomplete until the new transformer is in place
    if (out / "transformer").exists():
        shutil.rmtree(out / "transformer")
    if checkpoint is None:
        src = run_dir / "final" / "transformer"
        if not (src / "config.json").is_file():
            raise FileNotFoundError(
                f"{src} has no config.json: the run has not finished; pass --checkpoint latest to ship "
                "its newest checkpoint"
            )
        shutil.copytree(src, out / "transformer")
    else:
        if checkpoint == "latest":
            checkpoint = latest_checkpoint(run_dir / "checkpoints")
            if checkpoint is None:
                raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
        config = config or load_config(run_dir / "config.yaml")
        checkpoint_transformer(checkpoint, config, out / "transformer")
    write_scheduler(out, shift)
    return write_model_index(out)


def prepare(
    root: str | Path,
    components: str | Path,
    *,
    n_images: int = TRAIN_IMAGES,
    seed: int = 0,
    two_object_share: float | None = TWO_OBJECT_SHARE,
) -> None:
    """``<root>/data/train`` (the training split as an image folder) and ``<root>/components`` (staging).

    ``two_object_share`` sets the share of two-object scenes (see :func:`shapes.sample_scenes`). An
    existing image folder is kept as it is.
    """
    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.recipes.tiny_shapes import shapes

    root = Path(root)
    data = root / "data" / "train"
    if not (data / "metadata.jsonl").is_file():
        shapes.write_dataset(
            data, n_images, seed=seed, split="train", size=64, two_object_share=two_object_share
        )
    stage(components, root / "components", load_config(CONFIG))


def _share(text: str) -> float | None:
    if text == "even":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'even', got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmdit_flow.training.recipes.tiny_shapes",
        description="Build and ship the tiny-shapes demo model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config", help="print the path of the recipe's training config")
    prep = sub.add_parser("prepare", help="training images + staging pipeline folder for `mmdit-flow cache`")
    prep.add_argument("--root", type=Path, default=Path("runs/tiny-shapes"))
    prep.add_argument("--components", type=Path, required=True, help="folder with vae/, text_encoder*/ ...")
    prep.add_argument("--images", type=int, default=TRAIN_IMAGES)
    prep.add_argument(
        "--two-object-share",
        type=_share,
        default=TWO_OBJECT_SHARE,
        help="share of two-object training scenes in [0, 1], or 'even' for the generator's even odds "
        f"(default: {TWO_OBJECT_SHARE if TWO_OBJECT_SHARE is not None else 'even'})",
    )
    asm = sub.add_parser("assemble", help="trained transformer + components -> a shippable SD3 folder")
    asm.add_argument("run_dir", type=Path)
    asm.add_argument("out", type=Path)
    asm.add_argument("--components", type=Path, default=None, help="default: out already holds them")
    asm.add_argument("--checkpoint", default=None, help="a checkpoint folder or 'latest' (default: final/)")
    asm.add_argument("--shift", type=float, default=SHIFT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "config":
        print(CONFIG)
    elif args.command == "prepare":
        prepare(args.root, args.components, n_images=args.images, two_object_share=args.two_object_share)
    else:
        path = assemble(
            args.run_dir, args.out, components=args.components, checkpoint=args.checkpoint, shift=args.shift
        )
        print(path.parent)


if __name__ == "__main__":
    main()
