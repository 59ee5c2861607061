"""`fastgpt finetune classify|instruct|dpo`: turn a pretrained GPT into a classifier or an assistant.

The flags are made from `fastgpt.finetune.config`'s dataclasses by `fastgpt.train.options`,
as `fastgpt pretrain`'s are from TrainConfig: a --config TOML/YAML file sets any option, flags
typed on the command line win, and a resumed instruct run keeps its saved options except the
flags typed beside --resume. Imports of torch-heavy modules sit inside the functions, so that
`fastgpt --help` starts fast.
"""
from __future__ import annotations

from ..finetune.config import ClassifyConfig, DPOConfig, InstructConfig
from ..train.options import add_flags, given_flags, load_config_file, resolve

MODEL_HELP = ("model to start from: a fastgpt / Hugging Face / OpenAI GPT-2 directory, a name fetched by "
              "`fastgpt download` (gpt2, ...), or tiny / mini for a random initialisation")
DTYPE_HELP = ("autocast dtype, as in pretraining: auto (bf16/fp16 on GPUs, bf16 on CPUs that have it, else fp32), "
              "fp32, bf16, fp16 (or float32, bfloat16, float16)")
SHARED_HELP = {
    "model": MODEL_HELP,
    "trainable": "what trains: last-n (the last N blocks + final LayerNorm), all (every weight) or lora (low-rank "
                 "adapters, the rest frozen)",
    "last_n": "blocks trained with --trainable last-n",
    "lora_rank": "LoRA rank r (--trainable lora)",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha/r)",
    "lora_targets": "comma-separated names of the linear layers that get adapters",
    "lr": "AdamW learning rate (the peak, for instruct)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "batch_size": "examples per step",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "dtype": DTYPE_HELP,
    "device": "auto, cpu, cuda, cuda:1, ...",
}
CLASSIFY_HELP = {
    **SHARED_HELP,
    "trainable": SHARED_HELP["trainable"] + " + the new head",
    "data": "labelled texts: .tsv 'label<TAB>text' without header (SMS Spam Collection), .csv with a header, "
            "or .jsonl objects",
    "out": "directory for the model, metrics.jsonl, loss.png, report.json",
    "split_fractions": "train/validation/test fractions after a seeded shuffle",
    "seed": "seed for balancing, splitting, shuffling and init",
    "max_length": "truncate texts to this many tokens (default: the longest training text)",
    "epochs": "passes over the training split",
    "text_column": "text column/field of a .csv/.jsonl file",
    "label_column": "label column/field of a .csv/.jsonl file",
    "labels": "comma-separated allowed labels; any other label in the data is an error",
    "balance": "downsample every class to the smallest class's count (seeded)",
    "pooling": "what the head reads: the last real token's hidden state (the book's choice) or the mean over "
               "all real tokens (every token's features reach the head directly)",
}
INSTRUCT_HELP = {
    **SHARED_HELP,
    "model": MODEL_HELP + " (required unless --resume)",
    "trainable": SHARED_HELP["trainable"] + "; with lora the adapters are merged into the saved model (and also "
                                            "saved alone in lora_adapters.safetensors)",
    "data": "a JSON list (or .jsonl) of records with 'instruction', 'output' and optional 'input' "
            "(required unless --resume)",
    "out": "directory for the model, checkpoints, metrics.jsonl, loss.png, test_responses.json, report.json "
           "(required unless --resume, which continues in the run's own directory)",
    "split_fractions": "train/validation/test fractions, in file order",
    "seed": "seed for the data order, dropout and LoRA init",
    "max_length": "truncate examples to this many tokens (default: the model's context length)",
    "epochs": "passes over the training split",
    "template": "prompt template: alpaca or phi3",
    "mask_prompt": "no loss on the prompt tokens, only on the response",
    "max_steps": "stop after this many steps (overrides --epochs)",
    "min_lr": "cosine floor (default lr / 10)",
    "warmup_steps": "linear warmup (default 5% of the steps)",
    "eval_interval": "validation loss every N steps (default: twice per epoch)",
    "eval_batches": "validation batches per evaluation (default: the whole validation split)",
    "ckpt_interval": "checkpoint every K steps (0: at the end only); a checkpoint holds the weights (with lora: the "
                     "frozen base plus lora_adapters.safetensors), optimizer, data position, RNG states and the "
                     "run's options",
    "keep_last": "how many checkpoints to keep (0: all)",
    "overwrite": "start over in an --out that already holds checkpoints (they are deleted)",
    "max_new_tokens": "length limit of each test response",
    "test_limit": "answer only the first N test records",
    "generate_responses": "generate and score test responses (--no-responses skips them)",
}

DPO_HELP = {
    **INSTRUCT_HELP,
    "model": "the policy's and the frozen reference's starting point: an instruction-tuned model (its stored "
             "template is used), or any model with --template (required unless --resume)",
    "data": "a JSON list (or .jsonl) of records with 'instruction', 'chosen', 'rejected' and optional 'input' "
            "('output' is ignored) (required unless --resume)",
    "out": "directory for the model, checkpoints, metrics.jsonl, loss.png, preferences.png, test_responses.json "
           "(reference and policy answers side by side), report.json (required unless --resume)",
    "template": "prompt template: alpaca or phi3 (default: the one stored in the model's metadata)",
    "seed": "seed for the data order and LoRA init (dropout is off in DPO, as in TRL)",
    "batch_size": "preference pairs per step (each is two sequences: chosen and rejected)",
    "beta": "DPO's beta: how far the policy may move from the reference (the loss is "
            "-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))))",
    "logprob": "a response's log-probability: sum over its tokens (the DPO paper's and TRL's, the default: the "
               "implicit reward beta * log(pi/ref) is then of the whole answer, and beta = 0.1 means what it means "
               "there) or mean per token (the book's: no preference for the shorter answer, but beta acts about "
               "1/length as strongly)",
    "lr": "AdamW peak learning rate (the book's DPO uses 5e-6 for GPT-2 355M; a small model can take more)",
    "eval_interval": "loss, rewards, margin and accuracy on train and val every N steps (default: twice per epoch)",
    "max_new_tokens": "length limit of each test answer (reference and policy)",
    "test_limit": "answer only the first N test prompts",
    "generate_responses": "write the reference's and the policy's answers to the test prompts (--no-responses "
                          "skips them)",
}


def _add_resume(parser, fixed: str) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR|CKPT",
                        help="continue an interrupted run from a checkpoint, or a run dir's latest, bit for bit; "
                             f"changing {fixed} is refused")


def _add_config_options(parser, config_cls, helps) -> None:
    """--config FILE, then every field of the task's config dataclass as a flag."""
    parser.add_argument("--config", metavar="FILE", help="options in a .toml/.yaml file; flags override it")
    add_flags(parser.add_argument_group("options (also settable in --config files)"), config_cls, helps)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a model: text classifier or instruction follower",
        description="Fine-tune a pretrained GPT: `classify` trains a text classifier (e.g. spam), "
                    "`instruct` trains it to follow Alpaca-style instructions, `dpo` to prefer chosen answers.")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    cls = sub.add_parser(
        "classify", help="train a text classifier",
        description="Replace the LM head with an n-class head read from the last real token, train, "
                    "report accuracy / precision / recall / F1 and save the best model by validation accuracy. "
                    "--model, --data and --out are required (on the command line or in --config).")
    _add_config_options(cls, ClassifyConfig, CLASSIFY_HELP)
    cls.set_defaults(func=_classify)

    ins = sub.add_parser(
        "instruct", help="train an instruction-following model (Alpaca-style data)",
        description="Fine-tune on {instruction, input, output} records written in a prompt template, with "
                    "the pretraining loop's pieces (AdamW, warmup + cosine, AMP, checkpoints, metrics); then "
                    "answer the test split (test_responses.json), score it (ROUGE-L F1, exact match, optional "
                    "judge) and save the model with metadata['template'] for `fastgpt chat`. An interrupted run "
                    "continues exactly where its last checkpoint left it with --resume RUN_DIR (its saved options; "
                    "flags given beside it override them, except the template and what trains).")
    _add_resume(ins, "--template, --trainable or its LoRA / last-n settings")
    ins.add_argument("--judge", default=None, metavar="CMD",
                     help="a command that reads one record (with 'model_response') as JSON on stdin and prints a "
                          "score; its mean is reported beside ROUGE-L")
    _add_config_options(ins, InstructConfig, INSTRUCT_HELP)
    ins.set_defaults(func=_instruct)

    dpo = sub.add_parser(
        "dpo", help="preference-tune an instruction model (DPO: chosen vs rejected answers)",
        description="Direct Preference Optimization on {instruction, input, chosen, rejected} records: the policy "
                    "learns to prefer the chosen answer more than the frozen reference (the starting model) does. "
                    "The reference's log-probabilities are computed once, before training, and kept in the run "
                    "directory for --resume. Logs loss, chosen and "
                    "rejected rewards, reward margin and accuracy for train and val; --trainable, checkpoints, "
                    "--resume and --dtype work as for `finetune instruct`.")
    _add_resume(dpo, "--template, --logprob, --trainable or its LoRA / last-n settings")
    _add_config_options(dpo, DPOConfig, DPO_HELP)
    dpo.set_defaults(func=_dpo)


def _options(args, cls) -> tuple[dict, set[str]]:
    """(the config file's options with the typed flags on top, the names of both: what the user set)."""
    flags = given_flags(args, cls)
    file_values = load_config_file(args.config, cls) if args.config else {}
    return {**file_values, **flags}, set(file_values) | set(flags)


def _classify(args) -> int:
    from ..finetune.classify import finetune_classifier

    values, _ = _options(args, ClassifyConfig)
    finetune_classifier(resolve(ClassifyConfig, values))
    return 0


def _instruct(args) -> int:
    from ..finetune.instruct import command_judge, finetune_instruct

    values, explicit = _options(args, InstructConfig)
    cfg = resolve(InstructConfig, values)
    finetune_instruct(**cfg.to_dict(), resume=args.resume, explicit=explicit,
                      judge=command_judge(args.judge) if args.judge else None)
    return 0


def _dpo(args) -> int:
    from ..finetune.dpo import finetune_dpo

    values, explicit = _options(args, DPOConfig)
    finetune_dpo(**resolve(DPOConfig, values).to_dict(), resume=args.resume, explicit=explicit)
    return 0
