"""Fine-tune a GPT into a text classifier (e.g. spam / not spam).

The LM head is swapped for an n-class linear head read off the hidden state of each
sequence's last real token (`fastgpt.finetune.classifier`). Here: the labelled data,
balancing and splits, training (`fastgpt.train.step`), and the metrics.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FastGPTError
from ..runtime import autocast_factory, canonical_dtype_name, dtype_name, resolve_device, resolve_dtype
from ..train.metrics import plot_losses
from ..train.optim import make_optimizer
from ..train.options import require
from ..train.step import PendingSteps, train_step
from .checkpoint import load_model, model_tokenizer, save_classifier
from .classifier import GPTClassifier
from .config import DEFAULT_LORA_TARGETS, ClassifyConfig
from .files import read_jsonl, read_text, write_json, write_jsonl
from .lora import merge_lora, save_adapters, trainable_summary
from .trainable import set_trainable


# ---------------------------------------------------------------------- data
@dataclass
class Example:
    text: str
    label: str
    where: str  # "file:line", for error messages


def read_labeled_texts(path, text_column: str = "text", label_column: str = "label",
                       labels: list[str] | None = None) -> list[Example]:
    """Labelled texts from a TSV (`label<TAB>text`, no header: the SMS Spam Collection
    format), a CSV with a header, or JSON lines; `labels`, if given, is the allowed set."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        examples = _read_csv(path, text_column, label_column)
    elif suffix in (".jsonl", ".ndjson"):
        examples = _read_jsonl(path, text_column, label_column)
    else:
        examples = _read_tsv(path)
    if not examples:
        raise FastGPTError(f"{path}: no examples")
    for ex in examples:
        if not ex.text.strip():
            raise FastGPTError(f"{ex.where}: empty text")
        if not ex.label:
            raise FastGPTError(f"{ex.where}: empty label")
        if labels is not None and ex.label not in labels:
            raise FastGPTError(f"{ex.where}: unknown label {ex.label!r} (expected one of: {', '.join(labels)})")
    return examples


def _read_tsv(path: Path) -> list[Example]:
    examples = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise FastGPTError(f"{path}:{lineno}: expected 'label<TAB>text', found no tab")
        label, text = line.split("\t", 1)
        examples.append(Example(text, label.strip(), f"{path}:{lineno}"))
    return examples


def _read_csv(path: Path, text_column: str, label_column: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    for column in (text_column, label_column):
        if column not in (reader.fieldnames or []):
            raise FastGPTError(f"{path}:1: no column {column!r} in the header "
                               f"(columns: {', '.join(reader.fieldnames or [])}); see --text-column/--label-column")
    examples = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if row.get(text_column) is None or row.get(label_column) is None:
            raise FastGPTError(f"{where}: row has fewer fields than the header")
        examples.append(Example(row[text_column], row[label_column].strip(), where))
    return examples


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[Example]:
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise FastGPTError(f"{where}: expected a JSON object")
        for column in (text_column, label_column):
            if column not in record:
                raise FastGPTError(f"{where}: record has no {column!r} field; see --text-column/--label-column")
        examples.append(Example(str(record[text_column]), str(record[label_column]).strip(), where))
    return examples


def class_names(examples: list[Example]) -> list[str]:
    """Label strings in sorted order: the position in this list is the class id."""
    names = sorted({ex.label for ex in examples})
    if len(names) < 2:
        raise FastGPTError(f"{examples[0].where.rsplit(':', 1)[0]}: a classifier needs at least 2 labels, "
                           f"found only {names[0]!r}")
    return names


def balance(examples: list[Example], seed: int = 123) -> list[Example]:
    """Downsample every class to the size of the smallest one (seeded), in file order."""
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    smallest = min(len(ids) for ids in by_label.values())
    rng = random.Random(seed)
    keep = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], smallest))
    return [examples[i] for i in keep]


def split(examples: list, fractions=(0.7, 0.1, 0.2), seed: int = 123) -> tuple[list, list, list]:
    """Seeded shuffle, then train / validation / test of the given fractions (test takes the rest)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise FastGPTError(f"--split: expected three non-negative fractions summing to 1, got {list(fractions)}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_train, n_val = int(len(shuffled) * fractions[0]), int(len(shuffled) * fractions[1])
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


@dataclass
class EncodedSplit:
    """Token ids (truncated) and class ids of one split."""
    tokens: list[list[int]]
    targets: list[int]
    texts: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.targets)


def encode(examples: list[Example], tokenizer, names: list[str], max_length: int) -> EncodedSplit:
    ids = {name: i for i, name in enumerate(names)}
    tokens = [tokenizer.encode(ex.text)[:max_length] for ex in examples]
    return EncodedSplit(tokens, [ids[ex.label] for ex in examples], [ex.text for ex in examples])


def pad_batch(sequences: list[list[int]], pad_id: int = 0, side: str = "right",
              length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T) with True on real tokens), padded on the `side` to the longest.

    The mask, not the pad id, keeps padding out of the prediction, so any id of the
    vocabulary works as padding (0 exists in every vocabulary, GPT-2's or a small BPE's)."""
    T = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(T - len(seq), T)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = True
    return ids, mask


def batches(split_: EncodedSplit, batch_size: int, shuffle: bool = False, generator=None):
    """Padded (ids, mask, targets) batches; each batch is padded to its own longest sequence."""
    order = torch.randperm(len(split_), generator=generator).tolist() if shuffle else list(range(len(split_)))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_batch([split_.tokens[i] for i in rows])
        yield ids, mask, torch.tensor([split_.targets[i] for i in rows], dtype=torch.long)


def configure_trainable(clf: GPTClassifier, mode: str = "last-n", last_n: int = 1, lora_rank: int = 8,
                        lora_alpha: float = 16.0, lora_targets=DEFAULT_LORA_TARGETS, lora_dropout: float = 0.0) -> None:
    """What learns: the body as `fastgpt.finetune.trainable.set_trainable` says (last N blocks +
    final LayerNorm, everything, or LoRA adapters), and always the new head."""
    set_trainable(clf.gpt, mode, last_n, lora_rank, lora_alpha, lora_targets, lora_dropout)
    for p in clf.head.parameters():
        p.requires_grad_(True)


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(clf: GPTClassifier, split_: EncodedSplit, batch_size: int = 32,
            autocast=contextlib.nullcontext) -> tuple[torch.Tensor, float]:
    """(class probabilities (N, K), mean loss) over a split, in its order."""
    was_training = clf.training
    clf.eval()
    device = next(clf.parameters()).device
    probs, loss_sum = [], 0.0
    for ids, mask, targets in batches(split_, batch_size):
        with autocast():
            logits = clf(ids.to(device), mask.to(device))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets.to(device), reduction="sum").item()
        probs.append(logits.softmax(-1).cpu())
    clf.train(was_training)
    return torch.cat(probs), loss_sum / max(len(split_), 1)


def accuracy(clf: GPTClassifier, split_: EncodedSplit, batch_size: int = 32, autocast=contextlib.nullcontext) -> float:
    if len(split_) == 0:
        return float("nan")
    return _accuracy(predict(clf, split_, batch_size, autocast)[0], split_.targets)


def confusion_matrix(predicted: list[int], actual: list[int], num_classes: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, a in zip(predicted, actual, strict=True):
        matrix[a][p] += 1
    return matrix


def per_class_metrics(matrix: list[list[int]], names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every class (0 where undefined)."""
    report = {}
    for k, name in enumerate(names):
        tp = matrix[k][k]
        predicted = sum(row[k] for row in matrix)
        support = sum(matrix[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return report


def format_report(metrics: dict[str, dict[str, float]], matrix: list[list[int]], names: list[str]) -> str:
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, m in metrics.items():
        lines.append(f"{name:<{width}} {m['precision']:>9.3f} {m['recall']:>9.3f} {m['f1']:>9.3f} {m['support']:>8}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              f"{'':<{width}} " + " ".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix, strict=True):
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------- training
def train_classifier(clf: GPTClassifier, train: EncodedSplit, val: EncodedSplit, *, epochs: int = 3,
                     lr: float = 5e-5, weight_decay: float = 0.1, batch_size: int = 8, seed: int = 123,
                     grad_clip: float = 1.0, autocast=contextlib.nullcontext, scaler=None,
                     log=print) -> tuple[dict, list[dict]]:
    """Train the trainable parameters (`fastgpt.train.step`); returns (best state by validation accuracy, history).

    History rows use the pretraining metrics format (so `fastgpt.train.metrics.plot_losses`
    draws them): a "train" row per step (step, tokens, loss, lr, norm, ...) and, after each epoch,
    {"kind": "eval", "step", "tokens", "train_loss", "val_loss", "train_accuracy", "val_accuracy"},
    where the train numbers are running means over the epoch (no extra pass over the data).
    Losses and accuracies stay on the device until the epoch ends.
    """
    device = next(clf.parameters()).device
    optimizer = make_optimizer(clf, lr, weight_decay, (0.9, 0.999), 1e-8, device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    history, step, tokens = [], 0, 0
    best_acc, best_state = -1.0, None
    correct: list[torch.Tensor] = []  # right answers per batch, on the device

    def loss_fn(batch) -> torch.Tensor:
        ids, mask, targets = (t.to(device) for t in batch)
        logits = clf(ids, mask).float()
        correct.append((logits.argmax(-1) == targets).sum())
        return F.cross_entropy(logits, targets)

    clf.train()
    pending = PendingSteps(device)
    for epoch in range(1, epochs + 1):
        sizes = []
        for ids, mask, targets in batches(train, batch_size, shuffle=True, generator=generator):
            t0 = time.perf_counter()
            result = train_step(loss_fn, [(ids, mask, targets)], optimizer, params, lr=lr, grad_clip=grad_clip,
                                autocast=autocast, scaler=scaler)
            step += 1
            tokens += int(mask.sum())
            pending.add(step, result, int(mask.sum()), tokens, t0)
            sizes.append(len(targets))
        records = pending.read()
        history += [{**record.row(), "epoch": epoch} for record in records]
        train_loss = sum(r.loss * n for r, n in zip(records, sizes, strict=True)) / len(train)
        train_acc = int(torch.stack(correct).sum()) / len(train)
        correct.clear()
        val_probs, val_loss = predict(clf, val, batch_size, autocast)
        val_acc = _accuracy(val_probs, val.targets)
        history.append({"kind": "eval", "step": step, "tokens": tokens, "epoch": epoch, "train_loss": train_loss,
                        "val_loss": val_loss, "train_accuracy": train_acc, "val_accuracy": val_acc})
        log(f"epoch {epoch}/{epochs}  step {step}  train loss {train_loss:.4f}  train acc {train_acc:.2%}  "
            f"val loss {val_loss:.4f}  val acc {val_acc:.2%}")
        if best_state is None or val_acc > best_acc:  # NaN (no validation split): keep the first
            best_acc = val_acc
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in clf.state_dict().items()}
    return best_state, history


def _accuracy(probs: torch.Tensor, targets: list[int]) -> float:
    if not targets:
        return float("nan")
    return (probs.argmax(-1) == torch.tensor(targets)).float().mean().item()


# ---------------------------------------------------------------------- the whole run
def finetune_classifier(cfg: ClassifyConfig, log=print) -> dict:
    """Read, balance, split, tokenize, train, evaluate and save; returns the report (also in report.json)."""
    cfg = cfg.validate()
    require(cfg, ClassifyConfig.REQUIRED)
    cfg.dtype = canonical_dtype_name(cfg.dtype)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, "train")
    autocast = autocast_factory(device, dtype)  # mixed precision as in pretraining; weights stay fp32
    torch.manual_seed(cfg.seed)
    examples = read_labeled_texts(cfg.data, cfg.text_column, cfg.label_column, cfg.labels)
    names = class_names(examples)
    if cfg.balance:
        examples = balance(examples, cfg.seed)
    train, val, test = split(examples, cfg.split_fractions, cfg.seed)
    if len(train) < len(names):
        raise FastGPTError(f"{cfg.data}: {len(train)} training examples for {len(names)} classes; "
                           "need at least one example per class")
    log(f"{len(examples)} examples ({', '.join(f'{n}: {sum(e.label == n for e in examples)}' for n in names)}); "
        f"split {len(train)} / {len(val)} / {len(test)}")

    gpt, base_meta = load_model(cfg.model, device)
    context = gpt.config.context_length
    tokenizer = model_tokenizer(cfg.model)
    max_length = cfg.max_length
    if max_length is None:
        max_length = min(context, max(len(tokenizer.encode(e.text)) for e in train))
    elif not 1 <= max_length <= context:
        raise FastGPTError(f"--max-length: must be between 1 and the model's context length {context}, "
                           f"got {max_length}")
    splits = {name: encode(part, tokenizer, names, max_length)
              for name, part in (("train", train), ("val", val), ("test", test))}
    log(f"max length {max_length} tokens (longer texts are truncated) | device {device} | "
        f"dtype {dtype_name(dtype)}")

    clf = GPTClassifier(gpt, len(names), cfg.pooling).to(device)
    configure_trainable(clf, cfg.trainable, cfg.last_n, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    log(trainable_summary(clf))
    before = {name: accuracy(clf, part, cfg.batch_size, autocast) for name, part in splits.items() if len(part)}
    log("accuracy before: " + "  ".join(f"{k} {v:.2%}" for k, v in before.items()))

    best_state, history = train_classifier(clf, splits["train"], splits["val"], epochs=cfg.epochs, lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=cfg.seed,
                                           grad_clip=cfg.grad_clip, autocast=autocast, log=log,
                                           scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
    clf.load_state_dict(best_state)
    probs = {name: predict(clf, part, cfg.batch_size, autocast)[0] for name, part in splits.items() if len(part)}
    after = {name: _accuracy(p, splits[name].targets) for name, p in probs.items()}
    log("accuracy after (best epoch by validation accuracy): " + "  ".join(f"{k} {v:.2%}" for k, v in after.items()))

    report_split = "test" if len(splits["test"]) else "val"
    probs = probs[report_split]
    matrix = confusion_matrix(probs.argmax(-1).tolist(), splits[report_split].targets, len(names))
    metrics = per_class_metrics(matrix, names)
    log(f"\n{report_split} split:\n" + format_report(metrics, matrix, names))

    out = Path(cfg.out)
    if cfg.trainable == "lora":
        save_adapters(clf.gpt, out / "lora_adapters.safetensors")  # the adapters alone, for reuse
        merge_lora(clf.gpt)  # the saved model is a plain GPT: nothing LoRA-specific is needed to load it
    save_classifier(clf, out, names, {"pooling": cfg.pooling, "max_length": max_length, "base_model": str(cfg.model),
                                      **({"base": base_meta} if base_meta else {})}, tokenizer)
    write_jsonl(out / "metrics.jsonl", history)
    plot_losses(out)
    report = {"data": str(cfg.data), "model": str(cfg.model), "labels": names, "max_length": max_length,
              "split_sizes": {k: len(v) for k, v in splits.items()}, "trainable": cfg.trainable,
              "accuracy_before": before, "accuracy_after": after, "report_split": report_split,
              "per_class": metrics, "confusion_matrix": matrix}
    write_json(out / "report.json", report)
    log(f"saved the classifier (best validation accuracy) to {out}")
    return report


def classify_texts(clf: GPTClassifier, labels: list[str], texts: list[str], max_length: int, tokenizer,
                   batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) of the most likely class for each text."""
    for i, text in enumerate(texts):
        if not text.strip():
            raise FastGPTError(f"text {i + 1} is empty")
    encoded = EncodedSplit([tokenizer.encode(t)[:max_length] for t in texts], [0] * len(texts), texts)
    probs, _ = predict(clf, encoded, batch_size)
    best = probs.max(-1)
    return [(labels[i], p) for p, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]
