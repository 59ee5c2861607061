"""`fastgpt finetune classify|instruct`: turn a pretrained GPT into a classifier or an assistant."""
from __future__ import annotations

import argparse

from ..finetune.trainable import DEFAULT_LORA_TARGETS, TRAINABLE  # torch-free: --help stays fast


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the uninformative None and False."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

class _Default:
    """A value argparse filled in (not typed by the user): a resumed run keeps its own instead."""

    def __init__(self, value, shown=None):
        self.value, self.shown = value, value if shown is None else shown

    def __str__(self) -> str:
        return str(self.shown)


MODEL_HELP = ("model to start from: a fastgpt / Hugging Face / OpenAI GPT-2 directory, a name fetched by "
              "`fastgpt download` (gpt2, ...), or tiny / mini for a random initialisation")


def _mark_defaults(parser) -> None:
    """Wrap the parser's informative defaults in _Default (help still shows them)."""
    for action in parser._actions:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue  # a value other than None / False is the user's own
        value = parser._get_value(action, default) if isinstance(default, str) and action.type else default
        action.default = _Default(value, default)


def _given(args) -> tuple[dict, set[str]]:
    """(every option's value, the names of those the user gave)."""
    values, explicit = {}, set()
    for name, value in vars(args).items():
        if isinstance(value, _Default):
            values[name] = value.value
        else:
            values[name] = value
            if value is not None and value is not False:
                explicit.add(name)
    return values, explicit


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a model: text classifier or instruction follower",
        description="Fine-tune a pretrained GPT: `classify` trains a text classifier (e.g. spam), "
                    "`instruct` trains it to follow Alpaca-style instructions.")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    cls = sub.add_parser(
        "classify", help="train a text classifier",
        description="Replace the LM head with an n-class head read from the last real token, train, "
                    "report accuracy / precision / recall / F1 and save the best model by validation accuracy.",
        formatter_class=_HelpFormatter)
    cls.add_argument("--model", required=True, help=MODEL_HELP)
    cls.add_argument("--data", required=True,
                     help="labelled texts: .tsv 'label<TAB>text' without header (SMS Spam Collection), "
                          ".csv with a header, or .jsonl objects")
    cls.add_argument("--text-column", default="text", help="text column/field of a .csv/.jsonl file")
    cls.add_argument("--label-column", default="label", help="label column/field of a .csv/.jsonl file")
    cls.add_argument("--labels", type=_comma_list, default=None,
                     help="comma-separated allowed labels; any other label in the data is an error")
    cls.add_argument("--balance", action="store_true",
                     help="downsample every class to the smallest class's count (seeded)")
    cls.add_argument("--split", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"),
                     help="train/validation/test fractions after a seeded shuffle")
    cls.add_argument("--seed", type=int, default=123, help="seed for balancing, splitting, shuffling and init")
    cls.add_argument("--max-length", type=int, default=None,
                     help="truncate texts to this many tokens (default: the longest training text)")
    _add_trainable_args(cls, default="last-n", extra=" + the new head")
    cls.add_argument("--epochs", type=int, default=5)
    cls.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    cls.add_argument("--weight-decay", type=float, default=0.1)
    cls.add_argument("--batch-size", type=int, default=8)
    cls.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="autocast dtype, as in pretraining (auto: bf16/fp16 on GPUs, bf16 on CPUs that have it)")
    cls.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    cls.add_argument("--out", required=True, help="directory for the model, metrics.jsonl, loss.png, report.json")
    cls.set_defaults(func=_classify)

    ins = sub.add_parser(
        "instruct", help="train an instruction-following model (Alpaca-style data)",
        description="Fine-tune on {instruction, input, output} records written in a prompt template, with "
                    "the pretraining loop's pieces (AdamW, warmup + cosine, AMP, checkpoints, metrics); then "
                    "answer the test split (test_responses.json), score it (ROUGE-L F1, exact match, optional "
                    "judge) and save the model with metadata['template'] for `fastgpt chat`. An interrupted run "
                    "continues exactly where its last checkpoint left it with --resume RUN_DIR (its saved options; "
                    "flags given beside it override them, except the template and what trains).",
        formatter_class=_HelpFormatter)
    ins.add_argument("--model", help=MODEL_HELP + " (required unless --resume)")
    ins.add_argument("--data",
                     help="a JSON list (or .jsonl) of records with 'instruction', 'output' and optional 'input' "
                          "(required unless --resume)")
    ins.add_argument("--template", default="alpaca", help="prompt template: alpaca or phi3")
    ins.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt tokens, only on the response")
    ins.add_argument("--max-length", type=int, default=None,
                     help="truncate examples to this many tokens (default: the model's context length)")
    ins.add_argument("--split", type=float, nargs=3, default=[0.85, 0.10, 0.05], metavar=("TRAIN", "VAL", "TEST"),
                     help="train/validation/test fractions, in file order")
    _add_trainable_args(ins, default="all",
                        extra="; with lora the adapters are merged into the saved model (and also saved alone "
                              "in lora_adapters.safetensors)")
    ins.add_argument("--epochs", type=float, default=2.0)
    ins.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    ins.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    ins.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr / 10)")
    ins.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default 5%% of the steps)")
    ins.add_argument("--weight-decay", type=float, default=0.1)
    ins.add_argument("--batch-size", type=int, default=8)
    ins.add_argument("--eval-interval", type=int, default=None,
                     help="validation loss every N steps (default: twice per epoch)")
    ins.add_argument("--eval-batches", type=int, default=None,
                     help="validation batches per evaluation (default: the whole validation split)")
    ins.add_argument("--ckpt-interval", type=int, default=0,
                     help="checkpoint every K steps (0: at the end only); a checkpoint holds the weights (with "
                          "lora: the frozen base plus lora_adapters.safetensors), optimizer, data position, RNG "
                          "states and the run's options")
    ins.add_argument("--keep-last", type=int, default=1, help="how many checkpoints to keep (0: all)")
    ins.add_argument("--resume", metavar="RUN_DIR|CKPT",
                     help="continue an interrupted run from a checkpoint, or a run dir's latest, bit for bit; "
                          "changing --template, --trainable or its LoRA / last-n settings is refused")
    ins.add_argument("--overwrite", action="store_true",
                     help="start over in an --out that already holds checkpoints (they are deleted)")
    ins.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="autocast dtype (auto: bf16/fp16 on GPUs, bf16 on CPUs that have it, else fp32)")
    ins.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ins.add_argument("--seed", type=int, default=123)
    ins.add_argument("--max-new-tokens", type=int, default=256, help="length limit of each test response")
    ins.add_argument("--test-limit", type=int, default=None, help="answer only the first N test records")
    ins.add_argument("--no-responses", action="store_true", help="skip generating and scoring test responses")
    ins.add_argument("--judge", default=None, metavar="CMD",
                     help="a command that reads one record (with 'model_response') as JSON on stdin and prints a "
                          "score; its mean is reported beside ROUGE-L")
    ins.add_argument("--out",
                     help="directory for the model, checkpoints, metrics.jsonl, loss.png, test_responses.json, "
                          "report.json (required unless --resume, which continues in the run's own directory)")
    ins.set_defaults(func=_instruct)
    _mark_defaults(ins)


def _add_trainable_args(parser, default: str, extra: str = "") -> None:
    """--trainable and its options, the same for every fine-tuning task (fastgpt.finetune.trainable)."""
    parser.add_argument("--trainable", choices=TRAINABLE, default=default,
                        help="what trains: last-n (the last N blocks + final LayerNorm), all (every weight) or "
                             f"lora (low-rank adapters, the rest frozen){extra}")
    parser.add_argument("--last-n", type=int, default=1, help="blocks trained with --trainable last-n")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (--trainable lora)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/r)")
    parser.add_argument("--lora-targets", type=_comma_list, default=",".join(DEFAULT_LORA_TARGETS),
                        help="comma-separated names of the linear layers that get adapters")


def _check_positive(**values) -> None:
    from ..errors import FastGPTError
    for name, value in values.items():
        if value is not None and value <= 0:
            raise FastGPTError(f"--{name.replace('_', '-')}: must be positive, got {value}")


def _classify(args) -> int:
    from ..finetune.classify import finetune_classifier

    _check_positive(epochs=args.epochs, batch_size=args.batch_size, lora_rank=args.lora_rank,
                    max_length=args.max_length)
    finetune_classifier(
        args.model, args.data, args.out, text_column=args.text_column, label_column=args.label_column,
        labels=args.labels, balance_classes=args.balance, split_fractions=tuple(args.split), seed=args.seed,
        max_length=args.max_length, trainable=args.trainable, last_n=args.last_n, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets), epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    return 0


def _instruct(args) -> int:
    from ..finetune.instruct import command_judge, finetune_instruct

    values, explicit = _given(args)
    renamed = {"split": "split_fractions", "no_responses": "generate_responses"}  # flag -> function argument
    explicit = {renamed.get(name, name) for name in explicit}
    _check_positive(epochs=values["epochs"], max_steps=values["max_steps"], batch_size=values["batch_size"],
                    max_length=values["max_length"], max_new_tokens=values["max_new_tokens"],
                    eval_batches=values["eval_batches"], test_limit=values["test_limit"],
                    lora_rank=values["lora_rank"])
    if values["keep_last"] < 0:
        from ..errors import FastGPTError
        raise FastGPTError(f"--keep-last: must be 0 (keep all) or more, got {values['keep_last']}")
    finetune_instruct(
        values["model"], values["data"], values["out"], template=values["template"],
        mask_prompt=values["mask_prompt"], trainable=values["trainable"], last_n=values["last_n"],
        lora_rank=values["lora_rank"], lora_alpha=values["lora_alpha"], lora_targets=tuple(values["lora_targets"]),
        max_length=values["max_length"], split_fractions=tuple(values["split"]), epochs=values["epochs"],
        max_steps=values["max_steps"], lr=values["lr"], min_lr=values["min_lr"], warmup_steps=values["warmup_steps"],
        weight_decay=values["weight_decay"], batch_size=values["batch_size"], eval_interval=values["eval_interval"],
        ckpt_interval=values["ckpt_interval"], keep_last=values["keep_last"], eval_batches=values["eval_batches"],
        dtype=values["dtype"], device=values["device"], seed=values["seed"], max_new_tokens=values["max_new_tokens"],
        generate_responses=not values["no_responses"], test_limit=values["test_limit"], resume=values["resume"],
        explicit=explicit, overwrite=values["overwrite"],
        judge=command_judge(values["judge"]) if values["judge"] else None)
    return 0
