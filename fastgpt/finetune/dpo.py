"""Direct Preference Optimization (DPO): teach an instruction model which of two answers to prefer.

Each record {instruction, input, chosen, rejected} gives one prompt and two responses.
The policy (the model being trained) and a frozen reference (the same starting model)
score each response by its log-probability given the prompt; DPO raises the policy's
preference for the chosen response relative to the reference's:

    loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))

beta * (pi - ref) is the implicit reward of a response; the margin is the chosen reward
minus the rejected one, and accuracy is the share of pairs with a positive margin.
The reference never changes, so its log-probabilities are computed once, before
training, over every pair; the reference model is not run (or even kept) during training,
and a resumed run reads them back from the run directory (reference_logprobs.safetensors).
Prompt tokens and padding are masked out of the log-probabilities; each response ends
with <|endoftext|>, as in instruction tuning, so where to stop is part of what is preferred.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .. import ops
from ..errors import FastGPTError
from ..runtime import dtype_name
from ..tokenizer import Tokenizer
from ..train.metrics import plot_losses, read_metrics
from ..train.options import explicit_fields, require
from ..train.run_dir import open_run_dir
from ..weights.atomic import replace_file
from .checkpoint import load_model, model_tokenizer
from .config import LOGPROB_MODES, DPOConfig
from .files import read_records, write_atomic, write_json
from .instruct import IGNORE_INDEX, EncodedExample, answer, collate, encode_records, split_in_order
from .lora import trainable_summary
from .run import Schedule, Task, checked_max_length, make_trainee, resume_config, save_final, start_run, train
from .templates import METADATA_KEY, TEMPLATES, get_template

FIELDS = ("instruction", "input", "chosen", "rejected")  # `output`, if present, is ignored
DEFAULT_BETA = DPOConfig.beta


# ---------------------------------------------------------------------- data
def load_preference_records(path) -> list[dict]:
    """Preference records from a JSON list or JSON lines; `input` may be absent (= empty).
    A record without `instruction`, `chosen` or `rejected` is an error naming the file and record."""
    return [{name: record[name] for name in FIELDS} for record in read_records(path, FIELDS, "preference records")]


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
                                   targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none",
                                   vocab_size=model.config.vocab_size)
    mask = targets != IGNORE_INDEX
    total = -(nll.float().reshape(targets.shape) * mask).sum(dim=1)
    return total if mode == "sum" else total / mask.sum(dim=1).clamp(min=1)


def pair_logprobs(model, batch: PreferenceBatch, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities, each (B,), from one forward pass over the batch."""
    device = model.lm_head.weight.device
    logprobs = sequence_logprobs(model, batch.inputs.to(device), batch.targets.to(device), mode)
    return logprobs[:batch.pairs], logprobs[batch.pairs:]


REFERENCE_FILE = "reference_logprobs.safetensors"


def read_reference_cache(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train, val) reference log-probabilities saved by an earlier invocation of the same run, if they were
    computed for the same `key` (model, data, template, mode, lengths, dtype); else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if f.metadata() != key:
            return None
        return f.get_tensor("train"), f.get_tensor("val")


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
def evaluate_pairs(model, batches: list[PreferenceBatch], reference: torch.Tensor, beta: float, mode: str,
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


# ---------------------------------------------------------------------- reporting
def plot_preference_metrics(run_dir) -> Path:
    """Rewards (chosen and rejected), reward margin and accuracy at each evaluation, train and val,
    -> RUN_DIR/preferences.png (the loss itself: `fastgpt.train.metrics.plot_losses`, loss.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    steps = [r["step"] for r in evals]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("reward (beta * (log pi - log ref))", [("chosen_reward", "chosen"), ("rejected_reward", "rejected")]),
              ("reward margin (chosen - rejected)", [("margin", "")]),
              ("accuracy (margin > 0)", [("accuracy", "")])]
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            for split, style in (("train", "o-"), ("val", "s-")):
                name = f"{split} {label}".strip()
                ax.plot(steps, [r[f"{split}_{key}"] for r in evals], style, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run_dir.name}: DPO")
    fig.tight_layout()
    out = run_dir / "preferences.png"
    replace_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def side_by_side(records: list[dict], reference_responses: list[str], policy_responses: list[str]) -> list[dict]:
    """Test records with the reference's and the policy's answers next to the chosen and rejected ones."""
    return [{**record, "reference_response": ref, "policy_response": pol}
            for record, ref, pol in zip(records, reference_responses, policy_responses, strict=True)]


# ---------------------------------------------------------------------- the run
def finetune_dpo(model: str | None = None, data: str | None = None, out: str | None = None, *, resume=None,
                 explicit: set[str] | None = None, log=print, **options) -> dict:
    """Preference-tune `model` on `data` (`options`: the fields of `DPOConfig`), with instruction
    tuning's run (`fastgpt.finetune.run`: --trainable, checkpoints, --resume, dtype, schedule); log
    loss, rewards, margin and accuracy for train and val (metrics.jsonl, loss.png, preferences.png);
    save the model; write the reference's and the policy's answers to the test split side by side
    (test_responses.json). Returns the report (report.json)."""
    cfg = DPOConfig(model=model, data=data, out=None if out is None else str(out), **options).validate()
    checkpoint = None
    if resume is not None:
        *checkpoint, cfg = resume_config(resume, cfg, explicit if explicit is not None else explicit_fields(cfg))
    else:
        require(cfg, DPOConfig.REQUIRED, " (unless continuing a run with --resume)")
    return _train(cfg, checkpoint, log)


def _stats_text(stats: dict) -> str:
    return (f"loss {stats['loss']:.4f} margin {stats['margin']:+.3f} (chosen {stats['chosen_reward']:+.3f}, "
            f"rejected {stats['rejected_reward']:+.3f}) accuracy {stats['accuracy']:.1%}")


def _train(cfg: DPOConfig, checkpoint, log) -> dict:
    """The run itself; `checkpoint`: None, or (checkpoint dir, its state.json) to continue from."""
    ckpt, state = checkpoint or (None, None)
    out = Path(cfg.out)
    device, dtype, autocast, replaced = start_run(cfg, out, resuming=ckpt is not None)

    records = load_preference_records(cfg.data)
    splits = split_in_order(records, cfg.split_fractions)
    if not splits[0]:
        raise FastGPTError(f"{cfg.data}: {len(records)} records leave no training pairs with --split "
                           f"{cfg.split_fractions}")
    log(f"{len(records)} preference records: {' / '.join(str(len(s)) for s in splits)} train / val / test")

    gpt, base_meta = load_model(cfg.model, device)
    if cfg.template is None:
        cfg.template = base_meta.get(METADATA_KEY)
        if cfg.template is None:
            raise FastGPTError(f"--model {cfg.model}: no prompt template in its metadata (not made by `fastgpt "
                               f"finetune instruct`); give --template ({', '.join(TEMPLATES)})")
    get_template(cfg.template)
    disable_dropout(gpt)
    max_length = checked_max_length(cfg, gpt)
    tokenizer = model_tokenizer(cfg.model)
    own_tokenizer = None if isinstance(tokenizer, Tokenizer) else tokenizer  # saved with each checkpoint's model
    train_pairs, val_pairs = ([p for p in encode_pairs(split, tokenizer, cfg.template) if fits(p, max_length)]
                              for split in splits[:2])
    if not train_pairs:
        raise FastGPTError(f"--max-length {max_length}: every training prompt fills it, no response token is left")
    skipped = len(splits[0]) + len(splits[1]) - len(train_pairs) - len(val_pairs)
    if skipped:
        log(f"{skipped} pairs left out: their prompt alone fills --max-length {max_length}")

    def batches(pairs, order=None):
        return pair_batches(pairs, cfg.batch_size, tokenizer.eot_id, max_length, order)

    val_batches = batches(val_pairs)[:cfg.eval_batches]
    train_eval = batches(train_pairs[:len(val_pairs) or cfg.batch_size * 4])[:cfg.eval_batches]
    # What the cached reference depends on: a resumed run reuses the run directory's cache only if it matches.
    key = {"model": str(cfg.model), "data": str(cfg.data), "template": cfg.template, "logprob": cfg.logprob,
           "max_length": str(max_length), "split": str(cfg.split_fractions), "pairs": str(len(train_pairs)),
           "val_pairs": str(sum(b.pairs for b in val_batches)), "dtype": dtype_name(dtype)}
    cached = read_reference_cache(out / REFERENCE_FILE, key) if ckpt is not None else None
    if cached is not None:
        train_reference, val_reference = cached
        log(f"reference log-probabilities read from {out / REFERENCE_FILE}")
    else:
        t0 = time.perf_counter()
        train_reference = reference_logprobs(gpt, batches(train_pairs), cfg.logprob, autocast)
        val_reference = reference_logprobs(gpt, val_batches, cfg.logprob, autocast)
        log(f"reference log-probabilities ({cfg.logprob}) of {len(train_pairs)} train and "
            f"{sum(b.pairs for b in val_batches)} val pairs computed in {time.perf_counter() - t0:.1f} s")

    trainee = make_trainee(gpt, cfg, device, dtype, ckpt)
    schedule = Schedule.of(cfg, len(train_pairs))
    # Everything is validated: only now is the run directory written.
    metrics = open_run_dir(out, state["step"] if ckpt else None, log, replaced)
    if cached is None:
        write_atomic(out / REFERENCE_FILE, lambda tmp: save_file({"train": train_reference, "val": val_reference},
                                                                 str(tmp), metadata=key))
    log(f"model {gpt.config} | {trainable_summary(gpt)} ({cfg.trainable}) | device {device} | "
        f"dtype {dtype_name(dtype)} | template {cfg.template} | beta {cfg.beta} | logprob {cfg.logprob} | "
        f"max length {max_length} | {schedule.describe()}")

    def evaluate(step: int, tokens: int) -> dict:
        train_stats = evaluate_pairs(gpt, train_eval, train_reference, cfg.beta, cfg.logprob, autocast)
        val_stats = evaluate_pairs(gpt, val_batches, val_reference, cfg.beta, cfg.logprob, autocast)
        row = {"kind": "eval", "step": step, "tokens": tokens, **{f"train_{k}": v for k, v in train_stats.items()},
               **{f"val_{k}": v for k, v in val_stats.items()}}
        metrics.write(row)
        log(f"eval step {step} | train {_stats_text(train_stats)} | val {_stats_text(val_stats)}")
        return row

    last_stats = {}

    def loss(batch: PreferenceBatch) -> torch.Tensor:
        value, stats = batch_loss(gpt, batch, train_reference, cfg.beta, cfg.logprob)
        last_stats.update(stats)
        return value

    task = Task(len(train_pairs), lambda order: batches(train_pairs, order), loss,
                tokens=lambda batch: batch.inputs.numel(), evaluate=evaluate, step_stats=lambda: dict(last_stats))
    step, evals = train(task, trainee, cfg, schedule, out, metrics, autocast, device, own_tokenizer, state, ckpt, log)
    plot_losses(out)
    plot_preference_metrics(out)

    counts = save_final(trainee, out, {"template": cfg.template, "base_model": str(cfg.model), "finetune": "dpo",
                                       "dpo": {"beta": cfg.beta, "logprob": cfg.logprob}, "trainable": cfg.trainable,
                                       **({"base": base_meta} if base_meta else {})}, tokenizer)
    log(f"saved the preference-tuned model to {out} (metadata template={cfg.template!r})")
    report = {"data": str(cfg.data), "model": str(cfg.model), "template": cfg.template, "beta": cfg.beta,
              "logprob": cfg.logprob, "max_length": max_length, "steps": step, "trainable": cfg.trainable, **counts,
              "split_sizes": dict(zip(("train", "val", "test"), map(len, splits), strict=True)),
              "pairs_left_out": skipped, "first_eval": evals[0], "last_eval": evals[-1]}
    test_records = splits[2][:cfg.test_limit]
    if cfg.generate_responses and test_records:
        reference, _ = load_model(cfg.model, device)
        responses = side_by_side(test_records, answer(reference.eval(), tokenizer, test_records, cfg.template,
                                                      cfg.max_new_tokens),
                                 answer(gpt.eval(), tokenizer, test_records, cfg.template, cfg.max_new_tokens))
        write_json(out / "test_responses.json", responses)
        report["test_responses"] = len(responses)
        log(f"reference and policy answers to {len(responses)} test prompts: {out / 'test_responses.json'}")
    write_json(out / "report.json", report)
    return report
