"""`fastgpt download`: fetch released GPT-2 weights into the local cache."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Download OpenAI's released GPT-2 weights from their canonical source:
  --format hf      Hugging Face Hub, openai-community/<model>: config.json + model.safetensors
                   -> DIR/<model>/
  --format openai  OpenAI's TensorFlow release (124M/355M/774M/1558M), hparams.json + model.ckpt.*
                   -> DIR/<model>-openai/
Downloads resume where they stopped (HTTP Range on <file>.part), complete files are
skipped without a request, and each file's sha256 is checked: against the Hub's
X-Linked-ETag when it sends one, otherwise against the hash recorded in
DIR/<...>/fastgpt-download.json at the first download. Prints the directory, which
`fastgpt generate --model` and fastgpt.weights.load_pretrained accept (as do the bare model names)."""


def register(subparsers) -> None:
    from ..weights.download import FORMATS, MODELS
    p = subparsers.add_parser("download", help="download released GPT-2 weights (resumable, sha256-checked)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=list(MODELS), help="which GPT-2 size")
    p.add_argument("--dir", default=None, metavar="DIR",
                   help="cache directory (default: $FASTGPT_CACHE or ~/.cache/fastgpt)")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf (default) or openai, see above")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="a mirror serving the same paths as the canonical host (default: the canonical host)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="network timeout in seconds (default 60)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..weights.download import download_model
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    directory = download_model(args.model, args.dir, fmt=args.format, base_url=args.base_url,
                               progress=progress, timeout=args.timeout)
    print(directory)
    return 0
