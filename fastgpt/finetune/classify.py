"""Fine-tune a GPT into a text classifier (e.g. spam / not spam).

The LM head is swapped for an n-class linear head, and the class is read off the
hidden state of each sequence's *last real token*: with causal attention it is the
only position that has seen the whole text. Padding must not change the answer,
so batches carry a mask of real tokens (left, right or any padding) and are packed
to the left before the model runs, where causality keeps pads out of every real
token's view.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FastGPTError
from .files import read_jsonl, read_text
from .trainable import DEFAULT_LORA_TARGETS, set_trainable


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


# ---------------------------------------------------------------------- model
def pack_left(idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front, in order; returns (ids, lengths).

    Positions then count from 0 for every sequence and, attention being causal, no
    real token sees a pad: each row computes exactly what it would alone.
    """
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise FastGPTError("a sequence in the batch has no real tokens (empty text)")
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
    return idx.gather(1, order)[:, :int(lengths.max())], lengths


class GPTClassifier(nn.Module):
    """A GPT body, and a linear head on the last real token's final hidden state."""

    def __init__(self, gpt: nn.Module, num_classes: int):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes, device=gpt.device)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes); `mask` (B, T) marks real tokens (None: no padding)."""
        if mask is None:
            return self.head(self.gpt.hidden_states(idx)[:, -1])
        packed, lengths = pack_left(idx, mask)
        hidden = self.gpt.hidden_states(packed)  # (B, T, C)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.head(last)


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
    for p, a in zip(predicted, actual):
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
    for name, row in zip(names, matrix):
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------- training
def train_classifier(clf: GPTClassifier, train: EncodedSplit, val: EncodedSplit, *, epochs: int = 3,
                     lr: float = 5e-5, weight_decay: float = 0.1, batch_size: int = 8, seed: int = 123,
                     grad_clip: float = 1.0, autocast=contextlib.nullcontext, scaler=None,
                     log=print) -> tuple[dict, list[dict]]:
    """Train the trainable parameters; returns (best state by validation accuracy, history).

    History rows use the pretraining metrics format (so `fastgpt.train.metrics.plot_losses`
    draws them): {"kind": "train", "step", "tokens", "loss"} per step and, after each epoch,
    {"kind": "eval", "step", "tokens", "train_loss", "val_loss", "train_accuracy", "val_accuracy"},
    where the train numbers are running means over the epoch (no extra pass over the data).
    """
    from ..train.optim import make_optimizer

    device = next(clf.parameters()).device
    optimizer = make_optimizer(clf, lr, weight_decay, (0.9, 0.999), 1e-8, device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)  # enabled for fp16 autocast
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    history, step, tokens = [], 0, 0
    best_acc, best_state = -1.0, None
    clf.train()
    for epoch in range(1, epochs + 1):
        loss_sum, correct = 0.0, 0
        for ids, mask, targets in batches(train, batch_size, shuffle=True, generator=generator):
            targets = targets.to(device)
            with autocast():
                logits = clf(ids.to(device), mask.to(device)).float()
            loss = F.cross_entropy(logits, targets)
            loss_sum += loss.item() * len(targets)
            correct += int((logits.argmax(-1) == targets).sum())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            tokens += int(mask.sum())
            history.append({"kind": "train", "step": step, "tokens": tokens, "epoch": epoch, "loss": loss.item()})
        train_loss, train_acc = loss_sum / len(train), correct / len(train)
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
def finetune_classifier(model: str, data: str, out: str, *, text_column: str = "text", label_column: str = "label",
                        labels: list[str] | None = None, balance_classes: bool = False,
                        split_fractions=(0.7, 0.1, 0.2), seed: int = 123, max_length: int | None = None,
                        trainable: str = "last-n", last_n: int = 1, lora_rank: int = 8, lora_alpha: float = 16.0,
                        lora_targets=DEFAULT_LORA_TARGETS, epochs: int = 5, lr: float = 5e-5, weight_decay: float = 0.1,
                        batch_size: int = 8, device: str = "auto", dtype: str = "auto", log=print) -> dict:
    """Read, balance, split, tokenize, train, evaluate and save; returns the report (also in report.json)."""
    from ..train.loop import autocast_factory, resolve_dtype
    from .checkpoint import load_model, model_tokenizer, save_classifier
    from .files import write_json
    from .lora import merge_lora, save_adapters, trainable_summary
    from ..train.metrics import plot_losses
    from .files import write_jsonl

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    dtype = resolve_dtype(dtype, device)
    autocast = autocast_factory(device, dtype)  # mixed precision as in pretraining; weights stay fp32
    torch.manual_seed(seed)
    examples = read_labeled_texts(data, text_column, label_column, labels)
    names = class_names(examples)
    if balance_classes:
        examples = balance(examples, seed)
    train, val, test = split(examples, split_fractions, seed)
    if len(train) < len(names):
        raise FastGPTError(f"{data}: {len(train)} training examples for {len(names)} classes; "
                           "need at least one example per class")
    log(f"{len(examples)} examples ({', '.join(f'{n}: {sum(e.label == n for e in examples)}' for n in names)}); "
        f"split {len(train)} / {len(val)} / {len(test)}")

    gpt, base_meta = load_model(model, device)
    context = gpt.config.context_length
    tokenizer = model_tokenizer(model)
    if max_length is None:
        max_length = min(context, max(len(tokenizer.encode(e.text)) for e in train))
    elif not 1 <= max_length <= context:
        raise FastGPTError(f"--max-length: must be between 1 and the model's context length {context}, got {max_length}")
    splits = {name: encode(part, tokenizer, names, max_length)
              for name, part in (("train", train), ("val", val), ("test", test))}
    log(f"max length {max_length} tokens (longer texts are truncated) | device {device} | "
        f"dtype {str(dtype).removeprefix('torch.')}")

    clf = GPTClassifier(gpt, len(names)).to(device)
    configure_trainable(clf, trainable, last_n, lora_rank, lora_alpha, lora_targets)
    log(trainable_summary(clf))
    before = {name: accuracy(clf, part, batch_size, autocast) for name, part in splits.items() if len(part)}
    log("accuracy before: " + "  ".join(f"{k} {v:.2%}" for k, v in before.items()))

    best_state, history = train_classifier(clf, splits["train"], splits["val"], epochs=epochs, lr=lr,
                                           weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                                           autocast=autocast, log=log,
                                           scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
    clf.load_state_dict(best_state)
    probs = {name: predict(clf, part, batch_size, autocast)[0] for name, part in splits.items() if len(part)}
    after = {name: _accuracy(p, splits[name].targets) for name, p in probs.items()}
    log("accuracy after (best epoch by validation accuracy): " + "  ".join(f"{k} {v:.2%}" for k, v in after.items()))

    report_split = "test" if len(splits["test"]) else "val"
    probs = probs[report_split]
    matrix = confusion_matrix(probs.argmax(-1).tolist(), splits[report_split].targets, len(names))
    metrics = per_class_metrics(matrix, names)
    log(f"\n{report_split} split:\n" + format_report(metrics, matrix, names))

    out = Path(out)
    if trainable == "lora":
        save_adapters(clf.gpt, out / "lora_adapters.safetensors")  # the adapters alone, for reuse
        merge_lora(clf.gpt)  # the saved model is a plain GPT: nothing LoRA-specific is needed to load it
    save_classifier(clf, out, names, {"max_length": max_length, "base_model": str(model),
                                      **({"base": base_meta} if base_meta else {})}, tokenizer)
    write_jsonl(out / "metrics.jsonl", history)
    plot_losses(out)
    report = {"data": str(data), "model": str(model), "labels": names, "max_length": max_length,
              "split_sizes": {k: len(v) for k, v in splits.items()}, "trainable": trainable,
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
    return [(labels[i], p) for p, i in zip(best.values.tolist(), best.indices.tolist())]
