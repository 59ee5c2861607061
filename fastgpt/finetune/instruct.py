"""Instruction fine-tuning: teach a GPT to answer requests written in a prompt template.

Each record {instruction, input, output} becomes  prompt + output + <|endoftext|>,
and the model is trained on next-token prediction over it, like pretraining,
with two twists in the targets: padding is ignored (-100) except for the first
<|endoftext|>, which the model must learn to produce in order to stop; and,
optionally, the prompt itself is ignored so the loss is only on the answer.
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FastGPTError
from ..generate import generate
from ..runtime import dtype_name
from ..tokenizer import EOT_ID, Tokenizer
from ..train.evaluate import mean_loss
from ..train.metrics import eval_line, perplexity, plot_losses
from ..train.options import explicit_fields, require
from ..train.run_dir import open_run_dir
from .checkpoint import load_model, model_tokenizer
from .config import InstructConfig
from .files import read_records, write_json
from .lora import trainable_summary
from .run import Schedule, Task, checked_max_length, make_trainee, resume_config, save_final, start_run, train
from .templates import extract_response, format_prompt, get_template

IGNORE_INDEX = -100
FIELDS = ("instruction", "input", "output")


# ---------------------------------------------------------------------- data
def load_records(path) -> list[dict]:
    """Alpaca-style records from a JSON list or JSON lines; `input` may be absent (= empty)."""
    return read_records(path, FIELDS)


def split_in_order(records: list, fractions=(0.85, 0.10, 0.05)) -> tuple[list, list, list]:
    """Train / validation / test in file order (test takes the rest)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise FastGPTError(f"--split: expected three non-negative fractions summing to 1, got {list(fractions)}")
    n_train, n_val = int(len(records) * fractions[0]), int(len(records) * fractions[1])
    return records[:n_train], records[n_train:n_train + n_val], records[n_train + n_val:]


@dataclass
class EncodedExample:
    tokens: list[int]       # prompt + response (no <|endoftext|> yet: collate appends it)
    prompt_length: int      # how many of `tokens` belong to the prompt


def encode_records(records: list[dict], tokenizer, template: str) -> list[EncodedExample]:
    get_template(template)
    encoded = []
    for record in records:
        prompt = tokenizer.encode(format_prompt(template, record["instruction"], record["input"]))
        response = tokenizer.encode(record["output"])
        encoded.append(EncodedExample(prompt + response, len(prompt)))
    return encoded


def collate(batch: list[EncodedExample], pad_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX,
            max_length: int | None = None, mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, T), targets (B, T)) for a batch of examples.

    Every example gets <|endoftext|> (`pad_id`, the tokenizer's end-of-text id) appended and is padded with it to the
    batch's longest (+1, so that inputs and targets, shifted by one, both have T).
    In the targets, the first <|endoftext|> stays (the model learns to stop), every
    later pad becomes `ignore_index`, and so do the prompt tokens with `mask_prompt`.
    Sequences are cut to `max_length` tokens at the end.
    """
    longest = max(len(ex.tokens) + 1 for ex in batch)
    inputs, targets = [], []
    for ex in batch:
        padded = ex.tokens + [pad_id] * (longest - len(ex.tokens) + 1)
        x = torch.tensor(padded[:-1])
        y = torch.tensor(padded[1:])
        y[len(ex.tokens):] = ignore_index  # padding after the first end-of-text
        if mask_prompt:
            y[:ex.prompt_length - 1] = ignore_index  # targets that are still prompt tokens
        if max_length is not None:
            x, y = x[:max_length], y[:max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs), torch.stack(targets)


# ---------------------------------------------------------------------- scoring
def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _words(text: str) -> list[str]:
    return text.lower().split()


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words: LCS-based precision and recall."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return float(c == r)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal up to case and whitespace."""
    return _words(candidate) == _words(reference)


def command_judge(command: str):
    """A judge that runs `command` once per record: the record (with `model_response`)
    as JSON on stdin, a number on the first line of stdout."""
    argv = shlex.split(command)
    if not argv:
        raise FastGPTError("--judge: empty command")

    def judge(record: dict) -> float:
        try:
            done = subprocess.run(argv, input=json.dumps(record), capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise FastGPTError(f"--judge: command not found: {argv[0]}") from None
        if done.returncode != 0:
            raise FastGPTError(f"--judge: {argv[0]} exited with {done.returncode}: "
                               f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        first = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
        try:
            return float(first)
        except ValueError:
            raise FastGPTError(f"--judge: {argv[0]} printed {first!r}, expected a number") from None
    return judge


def score_responses(records: list[dict], judge=None) -> dict:
    """Mean ROUGE-L F1 and exact match of `model_response` against `output`, and the
    judge's mean score if a judge (record -> float) is given. Adds per-record scores."""
    for record in records:
        if "model_response" not in record:
            raise FastGPTError("score_responses: a record has no 'model_response'")
        record["rouge_l_f1"] = rouge_l_f1(record["model_response"], record["output"])
        record["exact_match"] = exact_match(record["model_response"], record["output"])
        if judge is not None:
            record["judge_score"] = float(judge({k: record[k] for k in ("instruction", "input", "output",
                                                                         "model_response")}))
    n = max(len(records), 1)
    scores = {"count": len(records),
              "rouge_l_f1": sum(r["rouge_l_f1"] for r in records) / n,
              "exact_match": sum(r["exact_match"] for r in records) / n}
    if judge is not None:
        scores["judge_score"] = sum(r["judge_score"] for r in records) / n
    return scores


def response_text(template: str, generated: str) -> str:
    """The model's answer from the text generated after the prompt."""
    return extract_response(template, generated, prompt="")


# ---------------------------------------------------------------------- training
def _batches(examples: list[EncodedExample], batch_size: int, order: list[int] | None = None, **collate_args):
    order = list(range(len(examples))) if order is None else order
    return [collate([examples[i] for i in order[s:s + batch_size]], **collate_args)
            for s in range(0, len(order), batch_size)]


def _has_targets(y: torch.Tensor) -> bool:
    return bool((y != IGNORE_INDEX).any())


def finetune_instruct(model: str | None = None, data: str | None = None, out: str | None = None, *, resume=None,
                      explicit: set[str] | None = None, judge=None, log=print, **options) -> dict:
    """Fine-tune on instruction records with the trainer's pieces (`fastgpt.train.step`, AdamW groups,
    warmup + cosine, autocast + GradScaler, metrics.jsonl, atomic checkpoints, loss plot); answer the
    test split; score; save the model with its template. Returns the report (report.json).

    `options`: the fields of `InstructConfig`. `trainable` (`fastgpt.finetune.trainable`): all
    weights, the last `last_n` blocks, or LoRA adapters; with LoRA the adapters are saved alone
    (lora_adapters.safetensors) and merged into the saved model, an ordinary fastgpt model directory.
    `eval_batches` caps the validation batches per evaluation (the first ones: always the
    same records); `test_limit` answers only the first records of the test split.
    Checkpoints (every `ckpt_interval` steps and at the end; the newest `keep_last` kept, 0: all)
    hold everything a run needs to go on: `resume` (a run dir or one of its checkpoints)
    continues it bit for bit with the saved options, overridden by those in `explicit`
    (default: the options that differ from their defaults). A fresh run refuses an `out`
    that holds checkpoints unless `overwrite`. `judge`: record -> score, beside ROUGE-L."""
    cfg = InstructConfig(model=model, data=data, out=None if out is None else str(out), **options).validate()
    checkpoint = None
    if resume is not None:
        *checkpoint, cfg = resume_config(resume, cfg, explicit if explicit is not None else explicit_fields(cfg))
    else:
        require(cfg, InstructConfig.REQUIRED, " (unless continuing a run with --resume)")
    return _train(cfg, checkpoint, judge, log)


def _train(cfg: InstructConfig, checkpoint, judge, log) -> dict:
    """The run itself; `checkpoint`: None, or (checkpoint dir, its state.json) to continue from."""
    ckpt, state = checkpoint or (None, None)
    out = Path(cfg.out)
    get_template(cfg.template)
    device, dtype, autocast, replaced = start_run(cfg, out, resuming=ckpt is not None)

    records = load_records(cfg.data)
    train_records, val_records, test_records = split_in_order(records, cfg.split_fractions)
    if not train_records:
        raise FastGPTError(f"{cfg.data}: {len(records)} records leave no training examples with --split "
                           f"{cfg.split_fractions}")
    log(f"{len(records)} records: {len(train_records)} train / {len(val_records)} val / {len(test_records)} test")

    gpt, base_meta = load_model(cfg.model, device)
    trainee = make_trainee(gpt, cfg, device, dtype, ckpt)
    max_length = checked_max_length(cfg, gpt)
    tokenizer = model_tokenizer(cfg.model)
    own_tokenizer = None if isinstance(tokenizer, Tokenizer) else tokenizer  # saved with each checkpoint's model
    collate_args = {"max_length": max_length, "mask_prompt": cfg.mask_prompt, "pad_id": tokenizer.eot_id}
    train_set = encode_records(train_records, tokenizer, cfg.template)
    batch_size = cfg.batch_size
    val_batches = [b for b in _batches(encode_records(val_records, tokenizer, cfg.template), batch_size,
                                       **collate_args) if _has_targets(b[1])][:cfg.eval_batches]
    train_eval = [b for b in _batches(train_set[:len(val_records) or batch_size * 4], batch_size, **collate_args)
                  if _has_targets(b[1])][:cfg.eval_batches]  # a fixed slice of the training data, beside validation

    schedule = Schedule.of(cfg, len(train_set))
    if not any(_has_targets(y) for _, y in _batches(train_set, batch_size, **collate_args)):
        raise FastGPTError(f"--max-length {max_length}{' with --mask-prompt' if cfg.mask_prompt else ''} leaves no "
                           "response token to learn in any training example")

    # Everything is validated: only now is the run directory written.
    metrics = open_run_dir(out, state["step"] if ckpt else None, log, replaced)
    log(f"model {gpt.config} | {trainable_summary(gpt)} ({cfg.trainable}) | device {device} | "
        f"dtype {dtype_name(dtype)} | template {cfg.template} | max length {max_length} | "
        f"{schedule.describe()}")

    def evaluate(step: int, tokens: int) -> dict:
        train_loss = mean_loss(gpt, train_eval, device, autocast) if train_eval else float("nan")
        val_loss = mean_loss(gpt, val_batches, device, autocast) if val_batches else float("nan")
        row = {"kind": "eval", "step": step, "tokens": tokens, "train_loss": train_loss, "val_loss": val_loss,
               "val_perplexity": perplexity(val_loss) if val_batches else float("nan")}
        metrics.write(row)
        log(eval_line(step, train_loss, val_loss))
        return row

    task = Task(len(train_set), lambda order: _batches(train_set, batch_size, order, **collate_args),
                loss=lambda batch: gpt(batch[0].to(device), batch[1].to(device)), tokens=lambda batch: batch[0].numel(),
                evaluate=evaluate, usable=lambda batch: _has_targets(batch[1]))
    step, evals = train(task, trainee, cfg, schedule, out, metrics, autocast, device, own_tokenizer, state, ckpt, log)
    plot_losses(out)

    counts = save_final(trainee, out, {"template": cfg.template, "base_model": str(cfg.model), "finetune": "instruct",
                                       "trainable": cfg.trainable, **({"base": base_meta} if base_meta else {})},
                        tokenizer)
    log(f"saved the fine-tuned model to {out} (metadata template={cfg.template!r})")

    report = {"data": str(cfg.data), "model": str(cfg.model), "template": cfg.template, "mask_prompt": cfg.mask_prompt,
              "max_length": max_length, "steps": step, "trainable": cfg.trainable,
              **counts,
              "split_sizes": {"train": len(train_records), "val": len(val_records), "test": len(test_records)},
              "val_loss_before": evals[0]["val_loss"], "val_loss_after": evals[-1]["val_loss"],
              "val_perplexity_after": evals[-1]["val_perplexity"]}
    test_records = test_records[:cfg.test_limit]
    if cfg.generate_responses and test_records:
        responses = answer(gpt, tokenizer, test_records, cfg.template, cfg.max_new_tokens)
        scored = [dict(r, model_response=resp) for r, resp in zip(test_records, responses, strict=True)]
        report["test_scores"] = score_responses(scored, judge)
        write_json(out / "test_responses.json", scored)
        log(f"test responses: {out / 'test_responses.json'} | ROUGE-L F1 {report['test_scores']['rouge_l_f1']:.3f} "
            f"| exact match {report['test_scores']['exact_match']:.1%}"
            + (f" | judge {report['test_scores']['judge_score']:.3f}" if judge else ""))
    write_json(out / "report.json", report)
    return report


def answer(model, tokenizer, records: list[dict], template: str, max_new_tokens: int = 256,
           batch_size: int = 16) -> list[str]:
    """Greedy responses of `model` to each record's instruction and input."""
    headers = get_template(template)
    stops = [h.strip() for h in (headers.instruction, headers.response) if h.strip()]
    responses = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [tokenizer.encode(format_prompt(template, r["instruction"], r["input"])) for r in chunk]
        result = generate(model, prompts, max_new_tokens, temperature=0.0, eos_id=tokenizer.eot_id,
                          stop_strings=stops, tokenizer=tokenizer)
        responses += [response_text(template, tokenizer.decode(tokens)) for tokens in result.tokens]
    return responses
