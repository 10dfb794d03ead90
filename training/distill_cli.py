"""``mmdit-flow distill CONFIG --rounds 16,8,4,2,1 [key=value ...]``: progressive distillation in rounds.

Each round trains a student (``objective.kind: progressive``) whose one step matches two steps of its teacher,
halving the step count: round ``S`` runs the config with ``objective.student_steps=S`` in
``<output.dir>/round-S``. The first round's teacher is the config's ``objective.teacher`` (guided with
``objective.teacher_guidance``, so that the first round also distils guidance); every later round's teacher,
and its student's starting weights, is the previous round's student (``<output.dir>/round-S/final``, which
samples without CFG, so later rounds use guidance 1). A round whose final folder is complete is skipped; a
round that was stopped resumes from its last checkpoint (the trainer's exact resume), so rerunning the same
command continues where it stopped. The last round's final folder is the student.

Several processes: ``accelerate launch -m mmdit_flow.training.distill_cli CONFIG --rounds ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

HELP = "progressive distillation: rounds that halve the steps, each round's student the next one's teacher"
COMPLETE = "model_index.json"  # written last by save_pretrained: a final folder with it is complete


def rounds(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rounds takes step counts like 16,8,4, got {text!r}") from None
    if not steps or min(steps) < 1 or any(b >= a for a, b in zip(steps, steps[1:], strict=False)):
        raise argparse.ArgumentTypeError(
            f"--rounds must be decreasing positive step counts (each round halves, e.g. 16,8,4), got {text!r}"
        )
    return steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config with objective.kind progressive")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (every round)")
    parser.add_argument("--rounds", type=rounds, required=True, help="the students' step counts, e.g. 16,8,4")


def round_overrides(output: str, steps: int, teacher: str | None, guidance: float) -> list[str]:
    """What round ``steps`` changes in the config; ``teacher`` None keeps the config's own (round one)."""
    out = [f"objective.student_steps={steps}", f"output.dir={Path(output) / f'round-{steps}'}"]
    if teacher is not None:
        out += [f"objective.teacher={teacher}", f"model.pretrained={teacher}"]
        out.append("objective.teacher_guidance=1.0")  # the previous student samples without CFG
    else:
        out.append(f"objective.teacher_guidance={guidance}")
    return out


def run(args: argparse.Namespace) -> int:
    from mmdit_flow.training.config import ConfigError, load_config

    prog = "mmdit-flow distill"
    try:
        base = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if base.objective.kind != "progressive":
        print(f"{prog}: {args.config} sets objective.kind {base.objective.kind}; rounds need progressive",
              file=sys.stderr)  # fmt: skip
        return 2
    if not base.output.save_final:
        print(f"{prog}: output.save_final is off; each round's final folder is the next round's teacher",
              file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mmdit_flow.training.trainer import train

    log = logging.getLogger(__name__)
    teacher = None
    for steps in args.rounds:
        overrides = round_overrides(base.output.dir, steps, teacher, base.objective.teacher_guidance)
        try:
            config = load_config(args.config, [*args.overrides, *overrides])
        except ValueError as err:
            print(f"{prog}: round {steps}: {err}", file=sys.stderr)
            return 2
        final = Path(config.output.dir) / "final"
        if (final / COMPLETE).is_file():
            log.info("round %d: %s is complete, skipped", steps, final)
        else:
            log.info("round %d: %d-step student of %s in %s", steps, steps, config.objective.teacher, final)
            try:
                code = train(config)
            except ConfigError as err:
                print(f"{prog}: round {steps}: {err}", file=sys.stderr)
                return 2
            if code:
                return code  # stopped: rerun the same command to resume this round
        teacher = str(final)
    log.info("the %d-step student: %s", args.rounds[-1], teacher)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdit_flow.training.distill_cli", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
