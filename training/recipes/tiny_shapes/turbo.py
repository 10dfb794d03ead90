"""``python -m mmdit_flow.training.recipes.tiny_shapes turbo OUT``: the few-step student of the shipped model.

One command, one config (``turbo.yaml``, installed beside this file), every stage resumable (rerun the same
command after a stop and it continues where it stopped):

1. captions: the teacher's 10 000 training scenes (``ship.prepare``'s image folder, written if missing);
2. couplings (``mmdit-flow couplings``): for each caption, noise and the latent the teacher's guided ODE
   draws from it (16 Euler steps, CFG 4: on validation captions as accurate as its 28 steps);
3. reflow (2-RF, ``turbo.yaml``): the teacher fine-tuned on the straight lines from each noise to its
   latent, at logit-normal times (shift 3), one forward a step and no CFG;
4. ``OUT``: the teacher's folder with the student's transformer and its ``mmdit_flow.json``: guidance 1
   and 4 steps by default (``STEPS``, chosen on validation captions: docs/quality.md, "Few-step students",
   which also measures the variants that lost: distillation on the 4-step grid after reflow, progressive
   and guidance distillation).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

CONFIG = Path(__file__).with_name("turbo.yaml")
TEACHER = "shipped:tiny-shapes"
ROOT = Path("runs/tiny-shapes-turbo")  # turbo.yaml's paths are under it
COUPLINGS = {"steps": 16, "guidance": 4.0, "seed": 0, "batch_size": 64}
STEPS = 4  # the student's default step count (validation: docs/quality.md)

logger = logging.getLogger(__name__)


def _train(config) -> None:
    from mmdit_flow.training.trainer import train

    if (Path(config.output.dir) / "final" / "model_index.json").is_file():
        logger.info("%s is complete, kept", Path(config.output.dir) / "final")
        return
    code = train(config)
    if code:
        raise SystemExit(code)  # stopped: rerun the command to resume


def build(out: str | Path) -> Path:
    """Run every stage (each skipped when done) and write the student's folder ``out``."""
    import torch

    from mmdit_flow.pipelines import TextToImagePipeline
    from mmdit_flow.shipped import model_folder
    from mmdit_flow.training.config import load_config
    from mmdit_flow.training.couplings import make_couplings, read_prompts
    from mmdit_flow.training.recipes.tiny_shapes import shapes, ship
    from mmdit_flow.weights.io import read_json, write_json

    teacher = Path(model_folder(TEACHER))
    data = ROOT / "data" / "train"
    if not (data / "metadata.jsonl").is_file():
        shapes.write_dataset(data, ship.TRAIN_IMAGES, seed=0, split="train", size=64,
                             two_object_share=ship.TWO_OBJECT_SHARE)  # fmt: skip
    stage_1 = load_config(CONFIG)
    couplings = Path(stage_1.data.cache_dir)
    if not (couplings / "index.json").is_file():
        pipe = TextToImagePipeline.from_pretrained(teacher, device="cpu", dtype=torch.float32)
        make_couplings(pipe, teacher, read_prompts(captions=str(data)), couplings, **COUPLINGS)
    _train(stage_1)
    run = Path(stage_1.output.dir)
    out = Path(out)
    index = out / "model_index.json"
    if index.exists():
        index.unlink()  # incomplete until assemble writes it again, last
    out.mkdir(parents=True, exist_ok=True)
    defaults = read_json(run / "final" / "mmdit_flow.json")
    defaults["defaults"]["steps"] = STEPS
    write_json(defaults, out / "mmdit_flow.json")
    ship.assemble(run, out, components=teacher)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmdit_flow.training.recipes.tiny_shapes turbo",
        description="Build the few-step student of the shipped tiny-shapes model (resumable).",
    )
    parser.add_argument("command", choices=["turbo"])
    parser.add_argument("out", type=Path, help="the folder to write, e.g. weights/tiny-shapes-turbo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(build(args.out))
