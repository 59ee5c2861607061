"""`fastgpt convert`: a checkpoint of the book's code (model.pth) -> a fastgpt or Hugging Face directory, or GGUF."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Convert a state dict saved by the code of "Build a Large Language Model (From Scratch)"
(torch.save(model.state_dict(), "model.pth"), GPTModel or GPTModelFast; also after
torch.compile or DDP, or inside {"model_state_dict": ...}) into a model directory.
The sizes are read from the tensors' shapes; the head count is not in the file, so it
is --n-head, or GPT-2's for the widths 768, 1024, 1280 and 1600. The file is loaded with
weights_only=True: no pickled code runs.

A language model becomes a fastgpt directory (--format fastgpt) for generate, chat,
pretrain --init-from and the finetune commands, a Hugging Face GPT-2 directory
(--format hf) for transformers, or a llama.cpp GGUF file DIR/model-<type>.gguf
(--format gguf-f32, gguf-f16 or gguf-q8_0; needs pip install gguf). A chapter-6
classifier (out_head [num_classes, d] with a bias) becomes a directory for `fastgpt
classify`; name its classes with --labels.
fastgpt reads the class at each text's last real token. The book's chapter-6 code pads
every text with <|endoftext|> to the longest training text and reads the last position,
so fastgpt's answers equal the book's classify_review only for texts of that length.
Both use GPT-2's tokenizer, as the book does.

fastgpt.weights.load_pretrained("model.pth") and --model model.pth load a language model directly
when its width is one of GPT-2's."""


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert the book's model.pth into a fastgpt or Hugging Face directory",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a .pth / .pt file saved by the book's code, or a directory holding one")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--n-head", type=int, default=None, metavar="N",
                   help="attention heads (default: GPT-2's for widths 768/1024/1280/1600; required otherwise)")
    p.add_argument("--format", default="fastgpt", choices=["fastgpt", "hf", "gguf-f32", "gguf-f16", "gguf-q8_0"],
                   help="fastgpt (default), hf or gguf-<type> (a language model only)")
    p.add_argument("--labels", type=_comma_list, default=None,
                   help="a classifier's class names in class-id order, comma-separated (the book's chapter-6 "
                        "spam classifier: ham,spam); default: the ids 0,1,...")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import FastGPTError
    from ..weights import save_fastgpt, save_pretrained
    from ..weights.book import build_book, find_book_file, is_book_file

    source = Path(args.source).expanduser()
    if source.is_dir():
        book_file = find_book_file(source)
        if book_file is None:
            raise FastGPTError(f"{source}: no .pth or .pt file in this directory")
    elif is_book_file(source):
        book_file = source
    elif source.exists():
        raise FastGPTError(f"{source}: expected a .pth or .pt file saved by the book's code")
    else:
        raise FastGPTError(f"{source}: no such file or directory")
    model, head, metadata = build_book(book_file, args.n_head)
    cfg = model.config
    shape = f"{cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, context {cfg.context_length}"
    if head is None:
        if args.labels:
            raise FastGPTError(f"--labels: {book_file} is a language model, not a classifier")
        if args.format == "hf":
            save_pretrained(model, args.out)
        elif args.format.startswith("gguf-"):
            from ..gpt2_vocab import GPT2_VOCAB_SIZE
            from ..weights.gguf_export import write_gguf
            qtype, ids_only = args.format.removeprefix("gguf-"), cfg.vocab_size != GPT2_VOCAB_SIZE
            path = write_gguf(model, Path(args.out) / f"model-{qtype}.gguf", qtype, ids_only=ids_only)
            if ids_only:  # the book's models use GPT-2's tokenizer; another vocabulary's is not in the file
                print(f"{path}: no tokenizer (vocabulary {cfg.vocab_size} is not GPT-2's): llama.cpp can run "
                      "token ids, not text")
        else:
            save_fastgpt(model, args.out, metadata)
        print(f"{book_file}: the book's {metadata['book_variant']} ({shape}, vocabulary {cfg.vocab_size}, "
              f"qkv bias {metadata['qkv_bias']}) -> {args.format} directory {args.out}")
        return 0
    if args.format != "fastgpt":
        raise FastGPTError(f"--format {args.format}: {book_file} is a chapter-6 classifier, which has no Hugging Face "
                           "GPT-2 or GGUF language-model form; use --format fastgpt")
    _save_classifier(model, head, metadata, book_file, args.labels, args.out)
    print(f"{book_file}: the book's chapter-6 classifier ({shape}, {head['weight'].shape[0]} classes) -> "
          f"classifier directory {args.out} (fastgpt classify --model {args.out} TEXT)")
    return 0


def _save_classifier(model, head, metadata, book_file, labels, out) -> None:
    """The book's classifier as `fastgpt finetune classify` saves its own, read at the last real token."""
    import torch

    from ..errors import FastGPTError
    from ..finetune.checkpoint import save_classifier
    from ..finetune.classifier import GPTClassifier

    num_classes = head["weight"].shape[0]
    labels = labels or [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise FastGPTError(f"--labels: {book_file} has {num_classes} classes, got {len(labels)} names {labels}")
    if len(set(labels)) != num_classes:
        raise FastGPTError(f"--labels: the class names must differ, got {labels}")
    clf = GPTClassifier(model, num_classes)
    with torch.no_grad():
        clf.head.weight.copy_(head["weight"])
        clf.head.bias.copy_(head["bias"])
    save_classifier(clf, out, labels, {**metadata, "max_length": model.config.context_length,
                                       "base_model": str(book_file)})
