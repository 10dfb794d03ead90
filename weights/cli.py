"""``mmdit-flow convert IN OUT --to diffusers|original``: rewrite a transformer checkpoint in another format.

IN is anything ``load_transformer`` reads (a diffusers transformer or pipeline folder, an original SD3 /
SD3.5 / Flux single file, a file we wrote). OUT is a folder for ``--to diffusers`` or a ``.safetensors``
file for ``--to original``.
"""

from __future__ import annotations

import argparse

HELP = "convert a transformer checkpoint between the diffusers and the original single-file formats"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="diffusers folder or .safetensors file to read")
    parser.add_argument(
        "output", metavar="OUT", help="folder (--to diffusers) or .safetensors file (--to original)"
    )
    parser.add_argument("--to", required=True, choices=("diffusers", "original"), help="format to write")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="cast the weights (default: keep the input's dtype)",
    )
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="split --to diffusers output into shards of at most this size, e.g. 5GB",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a pickle input (.bin/.pt/.ckpt) with torch.load(weights_only=True); only trusted files",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from mmdit_flow.weights import load_transformer, save_transformer

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = load_transformer(args.input, dtype=dtype, allow_pickle=args.allow_pickle)
    out = save_transformer(model, args.output, format=args.to, max_shard_size=args.max_shard_size)
    print(out)
    return 0
