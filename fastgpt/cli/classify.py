"""`fastgpt classify`: label texts with a classifier made by `fastgpt finetune classify`.
(Imports inside `_run`: `fastgpt --help` does not load torch.)"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify", help="label texts with a fine-tuned classifier",
        description="Print 'label<TAB>probability<TAB>text' for each text, one per line.")
    parser.add_argument("--model", required=True, help="classifier directory from `fastgpt finetune classify`")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--file", help="a UTF-8 file with one text per line (blank lines skipped)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ..errors import FastGPTError
    from ..finetune.checkpoint import load_classifier, model_tokenizer
    from ..finetune.classify import classify_texts
    from ..finetune.files import read_text
    from ..runtime import resolve_device

    texts = list(args.texts)
    if args.file:
        texts += [line for line in read_text(args.file).splitlines() if line.strip()]
    if not texts:
        raise FastGPTError("nothing to classify: give texts as arguments or --file FILE")
    clf, metadata = load_classifier(args.model, resolve_device(args.device))
    max_length = int(metadata.get("max_length") or clf.gpt.config.context_length)
    labelled = classify_texts(clf, metadata["labels"], texts, max_length, model_tokenizer(args.model))
    for text, (label, prob) in zip(texts, labelled, strict=True):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0
