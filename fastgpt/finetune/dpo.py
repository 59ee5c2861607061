"""Direct Preference Optimization (DPO): teach an instruction model which of two answers to prefer.

Each record {instruction, input, chosen, rejected} gives one prompt and two responses.
The policy (the model being trained) and a frozen reference (the same starting model)
score each response by its log-probability given the prompt; DPO raises the policy's
preference for the chosen response relative to the reference's:

    loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))

beta * (pi - ref) is the implicit reward of a response; the margin is the chosen reward
minus the rejected one, and accuracy is the share of pairs with a positive margin.
The reference never changes, so its log-probabilities are computed once, before
training, over every pair; the reference model is not run (or even kept) during training.
Prompt tokens and padding are masked out of the log-probabilities; each response ends
with <|endoftext|>, as in instruction tuning, so where to stop is part of what is preferred.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import FastGPTError
from .files import read_jsonl, read_text
from .instruct import IGNORE_INDEX, EncodedExample, collate, encode_records

FIELDS = ("instruction", "input", "chosen", "rejected")  # `output`, if present, is ignored
LOGPROB_MODES = ("sum", "mean")
DEFAULT_BETA = 0.1


# ---------------------------------------------------------------------- data
def load_preference_records(path) -> list[dict]:
    """Preference records from a JSON list or JSON lines; `input` may be absent (= empty).
    A record without `instruction`, `chosen` or `rejected` is an error naming the file and record."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        located = [(f"{path}:{lineno}", value) for lineno, value in read_jsonl(path)]
    else:
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise FastGPTError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise FastGPTError(f"{path}: expected a JSON list of preference records (or use a .jsonl file)")
        located = [(f"{path}: record {i}", value) for i, value in enumerate(data)]
    if not located:
        raise FastGPTError(f"{path}: no records")
    records = []
    for where, record in located:
        if not isinstance(record, dict):
            raise FastGPTError(f"{where}: expected a JSON object with {', '.join(FIELDS)}")
        for name in FIELDS:
            if name != "input" and name not in record:
                raise FastGPTError(f"{where}: missing field {name!r}")
            if not isinstance(record.get(name, ""), str):
                raise FastGPTError(f"{where}: field {name!r} must be a string")
        records.append({name: record.get(name, "") for name in FIELDS})
    return records


@dataclass
class PreferencePair:
    chosen: EncodedExample     # prompt + chosen response
    rejected: EncodedExample   # the same prompt + rejected response


def encode_pairs(records: list[dict], tokenizer, template: str) -> list[PreferencePair]:
    """Each record's prompt (in `template`) with its chosen and with its rejected response, as token ids."""
    def responses(field: str) -> list[EncodedExample]:
        return encode_records([{**r, "output": r[field]} for r in records], tokenizer, template)
    return [PreferencePair(c, r) for c, r in zip(responses("chosen"), responses("rejected"), strict=True)]


def fits(pair: PreferencePair, max_length: int) -> bool:
    """Whether at least one response token survives cutting to `max_length` (both share the prompt)."""
    return pair.chosen.prompt_length <= max_length


@dataclass
class PreferenceBatch:
    inputs: torch.Tensor    # (2B, T): the B chosen sequences, then the B rejected ones
    targets: torch.Tensor   # (2B, T): next tokens; prompt and padding are IGNORE_INDEX
    index: torch.Tensor     # (B,): the pairs' positions in their split (for the reference cache)

    @property
    def pairs(self) -> int:
        return len(self.index)


def collate_pairs(pairs: list[PreferencePair], index: list[int], pad_id: int,
                  max_length: int | None = None) -> PreferenceBatch:
    """One batch for one forward pass: instruction tuning's collate over the chosen then the rejected
    sequences, with the prompt masked (the first <|endoftext|> of each response stays a target)."""
    x, y = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id=pad_id,
                   max_length=max_length, mask_prompt=True)
    return PreferenceBatch(x, y, torch.tensor(index, dtype=torch.long))


def pair_batches(pairs: list[PreferencePair], batch_size: int, pad_id: int, max_length: int | None = None,
                 order: list[int] | None = None) -> list[PreferenceBatch]:
    """`pairs` in `order` (default: file order), `batch_size` pairs per batch."""
    order = list(range(len(pairs))) if order is None else order
    return [collate_pairs([pairs[i] for i in chunk], chunk, pad_id, max_length)
            for chunk in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]


# ---------------------------------------------------------------------- log-probabilities and loss
def sequence_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """(N,) log-probability of each sequence's unmasked targets: their sum, or their mean per token.

    The LM head and the log-softmax run as one op (`ops.linear_cross_entropy`, per row), so a
    fused kernel never materialises the (N, T, V) logits; masked rows contribute exactly 0."""
    if mode not in LOGPROB_MODES:
        raise FastGPTError(f"--logprob: unknown mode {mode!r} (choose from: {', '.join(LOGPROB_MODES)})")
    hidden = model.hidden_states(inputs)
    nll = ops.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                   targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    mask = targets != IGNORE_INDEX
    total = -(nll.float().reshape(targets.shape) * mask).sum(dim=1)
    return total if mode == "sum" else total / mask.sum(dim=1).clamp(min=1)


def pair_logprobs(model, batch: PreferenceBatch, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities, each (B,), from one forward pass over the batch."""
    device = model.lm_head.weight.device
    logprobs = sequence_logprobs(model, batch.inputs.to(device), batch.targets.to(device), mode)
    return logprobs[:batch.pairs], logprobs[batch.pairs:]


@torch.no_grad()
def reference_logprobs(model, batches: list[PreferenceBatch], mode: str, autocast) -> torch.Tensor:
    """(pairs, 2) fp32 log-probabilities [chosen, rejected] of the frozen starting model, in eval mode,
    row i for the pair of index i: computed once so that training never runs the reference."""
    was_training = model.training
    model.eval()
    n = sum(b.pairs for b in batches)
    cache = torch.full((n, 2), float("nan"), dtype=torch.float32)
    for batch in batches:
        with autocast():
            chosen, rejected = pair_logprobs(model, batch, mode)
        cache[batch.index] = torch.stack([chosen, rejected], dim=1).float().cpu()
    model.train(was_training)
    if torch.isnan(cache).any():
        raise FastGPTError("reference log-probabilities: some pairs were in no batch")
    return cache


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = DEFAULT_BETA) -> tuple[torch.Tensor, dict]:
    """(mean DPO loss, batch statistics): -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

    The statistics are detached means: the chosen and rejected rewards beta * (pi - ref), their
    margin, and accuracy, the share of pairs whose margin is positive."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    stats = {"chosen_reward": chosen_rewards.detach().mean(), "rejected_reward": rejected_rewards.detach().mean(),
             "margin": margins.detach().mean(), "accuracy": (margins.detach() > 0).float().mean()}
    return loss, stats


def batch_loss(model, batch: PreferenceBatch, reference: torch.Tensor, beta: float,
               mode: str) -> tuple[torch.Tensor, dict]:
    """The DPO loss of the policy `model` on one batch against the cached `reference` rows."""
    chosen, rejected = pair_logprobs(model, batch, mode)
    ref = reference[batch.index].to(chosen.device)
    return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)


STATS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")


@torch.no_grad()
def evaluate(model, batches: list[PreferenceBatch], reference: torch.Tensor, beta: float, mode: str,
             autocast) -> dict:
    """Loss, rewards, margin and accuracy averaged over every pair of `batches`, in eval mode."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(STATS, 0.0)
    pairs = 0
    for batch in batches:
        with autocast():
            loss, stats = batch_loss(model, batch, reference, beta, mode)
        for name, value in {"loss": loss, **stats}.items():
            sums[name] += float(value) * batch.pairs
        pairs += batch.pairs
    model.train(was_training)
    return {name: total / pairs if pairs else float("nan") for name, total in sums.items()}


def disable_dropout(model) -> None:
    """Dropout off in the policy, as TRL does by default: the implicit reward compares the policy with a
    reference scored without dropout, and a random mask would add noise to every margin."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attn_dropout", None), float):
            module.attn_dropout = 0.0
