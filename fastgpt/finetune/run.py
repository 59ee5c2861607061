"""A fine-tuning run that learns step by step: shared by `finetune instruct` and `finetune dpo`.

What the two tasks share, beyond the optimizer step itself (`fastgpt.train.step`) and the run
directory (`fastgpt.train.run_dir`): the starting model made trainable (`--trainable all |
last-n | lora`), AdamW and the fp16 scaler, resumable checkpoints (a LoRA run stores its frozen
base and the adapters, not a merged model: merging cannot be undone exactly), the loop over
seeded epoch orders with warmup + cosine, evaluations and checkpoints at their intervals, and
the saved model (LoRA merged in). A task brings its data, its loss and its evaluation.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import FastGPTError
from ..runtime import autocast_factory, canonical_dtype_name, resolve_device, resolve_dtype
from ..train import checkpoint as ckpt_io
from ..train.metrics import step_line
from ..train.optim import make_optimizer, pad_vocab_moments
from ..train.options import merge_for_resume, option_names
from ..train.run_dir import refuse_existing, save_and_prune
from ..train.schedule import learning_rate
from ..train.step import PendingSteps, train_step
from .checkpoint import save_model
from .config import StepwiseConfig
from .lora import count_parameters, load_adapters, merge_lora, save_adapters, unmerged_base
from .trainable import set_trainable

ADAPTER_FILE = "lora_adapters.safetensors"


# ---------------------------------------------------------------------- start
def start_run(cfg: StepwiseConfig, out: Path, resuming: bool) -> tuple[torch.device, torch.dtype, Callable, list]:
    """(device, dtype, autocast, what a fresh run may replace in `out`) from the run's options, with
    the seed set and `out` checked (one holding checkpoints needs --overwrite). Writes nothing."""
    cfg.dtype = canonical_dtype_name(cfg.dtype)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, "train")
    torch.manual_seed(cfg.seed)
    replaced = [] if resuming else refuse_existing(out, cfg.overwrite, "--out")
    return device, dtype, autocast_factory(device, dtype), replaced


def checked_max_length(cfg: StepwiseConfig, gpt) -> int:
    """--max-length, or the model's context; between 2 and that context."""
    context = gpt.config.context_length
    max_length = context if cfg.max_length is None else cfg.max_length
    if not 2 <= max_length <= context:
        raise FastGPTError(f"--max-length: must be between 2 and the model's context length {context}, "
                           f"got {max_length}")
    return max_length


# ---------------------------------------------------------------------- resume
def _must_match(cfg: StepwiseConfig) -> tuple[str, ...]:
    """Options a resumed run cannot change: they decide which weights exist and what the model learns."""
    mode = cfg.trainable
    return (*cfg.FIXED_ON_RESUME, "trainable", *(("last_n",) if mode == "last-n" else ()),
            *(("lora_rank", "lora_alpha", "lora_targets") if mode == "lora" else ()))


def resume_config(resume, cfg: StepwiseConfig, explicit: set[str]):
    """(checkpoint dir, its state.json, the config to continue with): the checkpoint's own options
    with the `explicit` ones of `cfg` on top; a change of what trains (or of the task's FIXED_ON_RESUME
    options) is refused, and so is a checkpoint of another task."""
    ckpt = ckpt_io.find_checkpoint(resume)
    state = ckpt_io.read_state(ckpt)
    progress = state.get("finetune") or {}
    saved = progress.get("options")
    if (not isinstance(saved, dict) or "trainable" not in saved or not set(saved) <= set(option_names(type(cfg)))
            or progress.get("task", "instruct") != cfg.TASK):
        raise FastGPTError(f"--resume {ckpt}: not a resumable `fastgpt finetune {cfg.TASK}` checkpoint "
                           "(no saved run options of that task)")
    if cfg.out is not None and Path(cfg.out).resolve() != ckpt.parent.resolve():
        raise FastGPTError(f"--out {cfg.out}: a resumed run continues in its own directory {ckpt.parent}")
    original, merged = merge_for_resume(saved, cfg, explicit - {"out"})
    for key in _must_match(original) + _must_match(merged):
        if getattr(original, key) != getattr(merged, key):
            flag = "--" + key.replace("_", "-")
            raise FastGPTError(f"--resume {ckpt}: the run was made with {flag} {getattr(original, key)} but this run "
                               f"asks for {flag} {getattr(merged, key)}; start a new --out to change it")
    merged.out = str(ckpt.parent)
    return ckpt, state, merged


# ---------------------------------------------------------------------- the model being trained
@dataclass
class Trainee:
    """The model being fine-tuned, with its optimizer, scaler and LoRA settings (None: no adapters)."""
    gpt: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lora_config: dict | None


def make_trainee(gpt, cfg: StepwiseConfig, device: torch.device, dtype: torch.dtype, ckpt=None) -> Trainee:
    """Set what trains on the loaded starting model; from a checkpoint, restore its weights (LoRA: the
    frozen base, then the adapters), the RNG states, the optimizer and the scaler."""
    if ckpt is not None:  # all weights, or LoRA's frozen base; and the RNG states
        ckpt_io.load_weights_and_rng(ckpt, gpt)
    # LoRA's random adapter init is overwritten on resume: it must not draw from the restored generators.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=ckpt is not None):
        set_trainable(gpt, cfg.trainable, cfg.last_n, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    lora_config = dict(getattr(gpt, "lora_config", None) or {}) or None
    if ckpt is not None and lora_config:
        load_adapters(gpt, ckpt / ADAPTER_FILE)
    gpt.train()
    optimizer = make_optimizer(gpt, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-8, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if ckpt is not None:
        saved = ckpt_io.load_optimizer_file(ckpt, device)
        try:
            optimizer.load_state_dict(pad_vocab_moments(saved["optimizer"], optimizer, gpt))
        except ValueError as err:
            raise FastGPTError(f"{ckpt / 'optimizer.pt'}: does not fit this run's trainable weights ({err})") from None
        if saved.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
    return Trainee(gpt, optimizer, scaler, lora_config)


def save_final(trainee: Trainee, out: Path, metadata: dict, tokenizer) -> dict:
    """The fine-tuned model as a plain fastgpt directory (LoRA adapters also saved alone, then merged in,
    so that `fastgpt chat` needs to know nothing about LoRA); returns the parameter counts for the report."""
    trainable_parameters, total_parameters = count_parameters(trainee.gpt)
    lora = trainee.lora_config
    if lora:
        save_adapters(trainee.gpt, out / ADAPTER_FILE)
        merge_lora(trainee.gpt)
    save_model(trainee.gpt, out, {**metadata, **({"lora": lora} if lora else {})}, tokenizer)
    return {"trainable_parameters": trainable_parameters, "total_parameters": total_parameters,
            **({"lora": lora} if lora else {})}


# ---------------------------------------------------------------------- the loop
@dataclass
class Schedule:
    steps_per_epoch: int
    max_steps: int
    warmup_steps: int
    min_lr: float
    eval_interval: int

    @classmethod
    def of(cls, cfg: StepwiseConfig, n_examples: int) -> "Schedule":
        """--max-steps (or --epochs), warmup (default 5% of the steps), cosine floor (default lr / 10)
        and evaluation interval (default twice per epoch)."""
        steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
        max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        warmup_steps = max(1, max_steps // 20) if cfg.warmup_steps is None else cfg.warmup_steps
        min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
        return cls(steps_per_epoch, max_steps, warmup_steps, min_lr, cfg.eval_interval or max(1, steps_per_epoch // 2))

    def describe(self) -> str:
        return f"{self.max_steps} steps ({self.max_steps / self.steps_per_epoch:.2f} epochs of {self.steps_per_epoch})"


def epoch_order(n: int, generator) -> list[int]:
    """One seeded permutation per epoch: the data order of every fine-tuning run."""
    return torch.randperm(n, generator=generator).tolist()


@dataclass
class Task:
    """What a fine-tuning task plugs into the loop."""
    n_examples: int
    epoch_batches: Callable[[list[int]], list]    # example order -> the epoch's batches
    loss: Callable[[object], torch.Tensor]        # batch -> loss (under autocast, in train mode)
    tokens: Callable[[object], int]               # batch -> tokens it trains
    evaluate: Callable[[int, int], dict]          # (step, tokens seen) -> eval row (written and logged by the task)
    usable: Callable[[object], bool] = lambda batch: True  # False: skip the batch (it teaches nothing)
    step_stats: Callable[[], dict] | None = None  # after each step: extra device scalars for its metrics row


def train(task: Task, trainee: Trainee, cfg: StepwiseConfig, schedule: Schedule, out: Path, metrics, autocast,
          device: torch.device, own_tokenizer=None, state: dict | None = None, ckpt=None,
          log=print) -> tuple[int, list]:
    """Train to `schedule.max_steps` from the start or from a checkpoint's `state`; returns (steps, eval rows).

    Data order: one seeded permutation per epoch; a resumed run replays the generator up to its
    epoch and skips the batches that epoch already gave, so it continues bit for bit."""
    generator = torch.Generator().manual_seed(cfg.seed)
    progress = state["finetune"] if state else {"step": 0, "tokens_seen": 0, "epoch": 1, "position": 0}
    step, tokens_seen, epoch, position = (progress[k] for k in ("step", "tokens_seen", "epoch", "position"))
    for _ in range(epoch - 1):
        epoch_order(task.n_examples, generator)
    batches = task.epoch_batches(epoch_order(task.n_examples, generator))
    gpt = trainee.gpt

    def save(directory: Path) -> Path:
        return ckpt_io.save_checkpoint(
            directory, unmerged_base(gpt) if trainee.lora_config else gpt, trainee.optimizer.state_dict(),
            trainee.scaler,
            {"step": step, "tokens_seen": tokens_seen,
             "finetune": {"task": cfg.TASK, "step": step, "tokens_seen": tokens_seen, "epoch": epoch,
                          "position": position, "first_eval": evals[0], "last_eval": evals[-1],
                          "options": cfg.to_dict()}},
            own_tokenizer, extra=(lambda tmp: save_adapters(gpt, tmp / ADAPTER_FILE)) if trainee.lora_config else None)

    if state is None:
        evals = [task.evaluate(0, 0)]
    else:
        evals = [progress["first_eval"], progress["last_eval"]]
        log(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {position})")
    parameters, pending, stats = list(gpt.parameters()), PendingSteps(device), {}
    while step < schedule.max_steps:
        if position == len(batches):
            batches, epoch, position = task.epoch_batches(epoch_order(task.n_examples, generator)), epoch + 1, 0
        batch = batches[position]
        position += 1
        if not task.usable(batch):
            continue
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg.lr, schedule.min_lr, schedule.warmup_steps, schedule.max_steps)
        result = train_step(task.loss, [batch], trainee.optimizer, parameters, lr=lr, grad_clip=cfg.grad_clip,
                            autocast=autocast, scaler=trainee.scaler)
        step += 1
        tokens_seen += task.tokens(batch)
        pending.add(step, result, task.tokens(batch), tokens_seen, t0)
        if task.step_stats is not None:
            stats[step] = task.step_stats()
        evaluating = step % schedule.eval_interval == 0 or step == schedule.max_steps
        saving = (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == schedule.max_steps
        if step % 10 == 0 or evaluating or saving:  # the losses are read here, not at every step
            for record in pending.read():
                extra = {k: float(v) for k, v in stats.pop(record.step, {}).items()}
                metrics.write({**record.row(), **extra})
                if record.step % 10 == 0 or record.step == schedule.max_steps:
                    log(step_line(record.step, schedule.max_steps, record.loss, record.lr, record.grad_norm,
                                  record.seconds * 1e3, record.tokens_per_second, ""))
        if evaluating:
            evals.append(task.evaluate(step, tokens_seen))
        if saving:
            save_and_prune(out, step, save, cfg.keep_last)
    return step, evals
