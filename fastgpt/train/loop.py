"""The training loop: `train(TrainConfig) -> TrainResult`.

The run's config, data and model are resolved first (`resolve.py`). Each optimizer step is
`fastgpt.train.step.train_step` over `accum_steps` micro-batches (loss = model(x, y); DDP
all-reduces gradients on the last one only), at the scheduled
learning rate; on CUDA that step is recorded once as a CUDA graph and replayed
(`cuda_graph.py`; --no-cuda-graph for eager). Targets are checked on the host batch,
and losses and norms are read from the device only when the loop logs. Every
so often it evaluates on fixed batches, prints a text sample, and writes an atomic
checkpoint from which the run resumes bit-for-bit.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from .. import ops
from ..errors import FastGPTError
from ..model import GPT
from ..runtime import autocast_factory, dtype_name, resolve_dtype, set_threads
from ..tokenizer import TOKENIZER_DIR
from . import checkpoint as ckpt_io
from . import distributed as dist
from .config import TrainConfig
from .cuda_graph import GraphedTrainStep, off_reason
from .evaluate import mean_loss, sample_text
from .interrupt import StopFlag
from .metrics import eval_line, plot_losses, step_line
from .mfu import mfu_text, model_flops_per_token
from .optim import make_optimizer, pad_vocab_moments, portable_state
from .recompute import enable_activation_checkpointing
from .resolve import prepare_inputs, resolve_run
from .run_dir import checkpoint_dir, open_run_dir, refuse_existing, write_json
from .schedule import learning_rate
from .step import PendingSteps, StepRecord, train_step


@dataclass
class TrainResult:
    run_dir: Path
    step: int                       # optimizer steps completed in total
    losses: list[float]             # per-step train loss of this invocation
    train_loss: float | None        # last evaluation
    val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path | None         # the last checkpoint written
    tokens_seen: int
    elapsed_s: float
    interrupted: bool = False
    sample: str | None = None
    config: dict = field(default_factory=dict)
    rank: int = 0                   # under torchrun: this process's rank (only rank 0 reports)


def _steps_within_budget(cfg: TrainConfig, step: int, step_times: list[float], elapsed: float, eval_bs: int,
                         say, first: bool, cap: int) -> int:
    """The max_steps that fits cfg.time_budget, judged from the steps timed so far.

    Re-judged every 10 steps (a shared machine speeds up and slows down), never
    beyond the configured max_steps. An evaluation costs about 2 splits x
    eval_batches forwards, a forward about a third of a training step. The step
    count then depends on timing: runs with a time budget are not bit-reproducible.
    """
    recent = step_times[1:][-10:]  # the first step pays one-time warm-up costs; the machine's load changes
    per_step = sum(recent) / len(recent)
    per_eval = 2 * cfg.eval_batches * (eval_bs / cfg.micro_batch) * per_step / 3
    per_step_total = per_step + (per_eval / cfg.eval_interval if cfg.eval_interval else 0.0)
    fit = step + int(max(0.0, cfg.time_budget - elapsed - per_eval) / per_step_total)
    steps = max(step, min(cap, fit))
    if first and cfg.warmup_steps > steps // 5:  # keep most of a shortened run for the cosine decay
        cfg.warmup_steps = max(step, steps // 10)
    if first or abs(steps - cfg.max_steps) > cfg.max_steps // 10:  # step times vary ~10% on a shared CPU: quiet
        say(f"time budget {cfg.time_budget:.0f} s: {per_step * 1e3:.0f} ms per step -> {steps} steps")
    return steps


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, resume: str | Path | None = None, explicit: set[str] | None = None,
          log=None) -> TrainResult:
    """Train per `config`; with `resume`, continue a run (dir or checkpoint) where it stopped.

    `explicit`: the config keys the user set (for resume, these override the
    checkpoint's config); defaults to the fields that differ from TrainConfig().
    """
    cfg, resume_from, state, asked = resolve_run(dataclasses.replace(config).validate(), resume, explicit)
    info, device = dist.setup(cfg.device)
    threads, backend = torch.get_num_threads(), ops.get_backend()
    try:
        return _train(cfg, resume_from, state, asked, log, info, device)
    finally:
        torch.set_num_threads(threads)
        ops.set_backend(backend)
        dist.teardown()


def _read_steps(pending: PendingSteps, last_ckpt, losses: list[float], step_times: list[float]) -> list[StepRecord]:
    records = pending.read(last_ckpt)
    losses += [r.loss for r in records]
    step_times += [r.seconds for r in records]
    return records


def _train(cfg, resume_from, state, asked, log, info: dist.DistInfo, device) -> TrainResult:
    started = time.perf_counter()
    say = (log or tqdm.write) if info.is_main else (lambda *a, **k: None)
    set_threads(cfg.threads)
    run_dir = Path(cfg.out_dir)
    ops.set_backend(cfg.backend)
    dtype = resolve_dtype(cfg.dtype, device, "train")
    autocast = autocast_factory(device, dtype)

    train_split, val_split, tokenizer, model, plan = prepare_inputs(cfg, resume_from, asked, info, say)
    T, accum = model.config.context_length, plan.accum_steps
    if cfg.epochs is not None:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * plan.steps_per_epoch()))
    eval_bs = cfg.eval_batch_size or cfg.micro_batch
    budget_cap = cfg.max_steps  # the most a time budget may allow

    metrics = None
    if info.is_main:
        replaced = [] if resume_from else refuse_existing(run_dir, cfg.overwrite, "--out-dir", also=("best",))
        metrics = open_run_dir(run_dir, state["step"] if resume_from else None, say, replaced,
                               outputs=("loss.png", "config.json", TOKENIZER_DIR))
        if tokenizer is not None and resume_from is None:
            tokenizer.save(run_dir / TOKENIZER_DIR)
    dist.barrier(info)

    model.to(device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    sharded = cfg.distributed == "fsdp" and info.enabled
    optimizer_format = "fsdp-full" if sharded else "torch"
    step, tokens_seen, best_val = 0, 0, None
    if resume_from is not None:
        if state.get("optimizer_format", "torch") != optimizer_format:
            raise FastGPTError(f"--resume {resume_from}: its optimizer state was saved as "
                               f"{state.get('optimizer_format', 'torch')!r}; resume it with the same --distributed")
        state = ckpt_io.load_weights_and_rng(resume_from, model)  # weights go in before sharding
        step, tokens_seen, best_val = state["step"], state["tokens_seen"], state.get("best_val_loss")
    if info.rank > 0:  # distinct dropout masks per rank (resume is bit-exact for one process only)
        torch.manual_seed(cfg.seed + info.rank + 7919 * step)
    trained = dist.wrap_model(model, cfg.distributed, info, device)  # FSDP shards `model` in place
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if resume_from is not None:
        saved = ckpt_io.load_optimizer_file(resume_from, device)
        dist.load_optimizer_state(model, optimizer, pad_vocab_moments(saved["optimizer"], optimizer, model),
                                  cfg.distributed, info)
        if saved.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(saved["scaler"])
    if cfg.compile:
        trained = torch.compile(trained)
    flops_token = model_flops_per_token(model, T)

    if info.is_main:
        say(f"resolved config{' (resumed from ' + str(resume_from) + ')' if resume_from else ''}:\n{cfg.summary()}")
        say(f"model: {model.num_parameters() / 1e6:.2f}M parameters | {model.config} | device {device} | "
            f"dtype {dtype_name(dtype)} | backend {cfg.backend} | processes {info.world_size} | "
            f"threads {torch.get_num_threads()}")
        say(f"data: {len(train_split):,} train / {len(val_split):,} val tokens | global batch "
            f"{plan.global_rows} x {T} = {plan.tokens_per_step:,} tokens ({cfg.micro_batch} per micro-step, "
            f"{accum} accumulation steps) | {cfg.max_steps} steps = "
            f"{cfg.max_steps / plan.steps_per_epoch():.2f} epochs")
        unigram = train_split.unigram_entropy()
        if unigram is not None:
            say(f"baseline: predicting the train split's token frequencies (unigram) costs {unigram:.2f} nats/token; "
                f"an untrained model {math.log(model.config.vocab_size):.2f}")
        write_json(run_dir / "config.json", cfg.to_dict())

    eval_cache: dict[str, list] = {}

    def evaluate() -> tuple[float, float]:
        results = []
        for split in ("train", "val"):
            if split not in eval_cache:
                eval_cache[split] = plan.eval_batches(split, cfg.eval_batches, eval_bs)
            results.append(mean_loss(model, eval_cache[split], device, autocast))
        return results[0], results[1]

    def unsharded_copy():
        """FSDP: a plain model with the gathered weights (every rank must call; rank 0 gets the copy)."""
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not info.is_main:
            return None
        copy = GPT(model.config)
        copy.load_state_dict(weights)
        return copy.to(device)

    def save(directory: Path) -> Path | None:
        """Called on every rank (FSDP gathers the shards); rank 0 writes."""
        if not (sharded or info.is_main):
            return None
        model_state, optimizer_state = dist.full_state(model, optimizer, cfg.distributed, info)
        if not info.is_main:
            return None
        payload = {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val,
                   "config": cfg.to_dict(), "world_size": info.world_size, "optimizer_format": optimizer_format}
        to_save = model
        if sharded:  # a plain CPU copy of the gathered weights for the model files
            to_save = GPT(model.config)
            to_save.load_state_dict(model_state)
        return ckpt_io.save_checkpoint(directory, to_save, portable_state(optimizer_state), scaler, payload,
                                       tokenizer)

    def loss_fn(batch) -> torch.Tensor:
        x, y = batch
        return trained(x.to(device, non_blocking=True), y.to(device, non_blocking=True))

    def sync(last: bool):
        return dist.gradient_sync(trained, info, cfg.distributed, enabled=last)

    parameters = list(model.parameters())
    graphed = None
    if cfg.cuda_graph:
        reason = off_reason(device, world_size=info.world_size, fp16_scaler=scaler.is_enabled(),
                            activation_checkpointing=cfg.activation_checkpointing)
        if reason is None:
            graphed = GraphedTrainStep(loss_fn, optimizer, parameters, grad_clip=cfg.grad_clip, autocast=autocast)
        elif device.type == "cuda" or "cuda_graph" in asked:
            say(f"--cuda-graph: the eager step runs instead ({reason})")
    vocab_size = model.config.vocab_size
    pending = PendingSteps(device)  # losses and norms stay on the device until a log, eval or save reads them
    losses: list[float] = []
    step_times: list[float] = []
    last_ckpt, train_loss, val_loss, sample = None, None, None, None
    interrupted = False
    trained.train()
    with StopFlag() as stop, tqdm(total=cfg.max_steps, initial=step, disable=not (info.is_main and cfg.progress),
                                   unit="step", dynamic_ncols=True, leave=False) as bar:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            micro_batches = plan.micro_batches(step)
            for _, targets in micro_batches:
                ops.check_targets(targets, vocab_size)  # on the host batch: the ops do not check
            if graphed is not None:
                result = graphed(micro_batches, lr)
            else:
                result = train_step(loss_fn, micro_batches, optimizer, parameters, lr=lr, grad_clip=cfg.grad_clip,
                                    autocast=autocast, scaler=scaler, sync=sync)
            result.loss = dist.mean_across_ranks(result.loss, info)
            step += 1
            tokens_seen += plan.tokens_per_step
            pending.add(step, result, plan.tokens_per_step, tokens_seen, t0)
            bar.update(1)
            records = []
            run_steps = len(step_times) + len(pending)  # steps of this invocation
            if cfg.time_budget is not None and run_steps >= 3 and run_steps % 10 == 3:
                records = _read_steps(pending, last_ckpt, losses, step_times)
                cfg.max_steps = _steps_within_budget(cfg, step, step_times, time.perf_counter() - started,
                                                     eval_bs, say, first=run_steps == 3, cap=budget_cap)
                bar.total = cfg.max_steps
            final = step == cfg.max_steps
            evaluating = (cfg.eval_interval and step % cfg.eval_interval == 0) or final
            sampling = (cfg.sample_interval and step % cfg.sample_interval == 0) or final
            interrupted = dist.any_rank(stop.requested, info, device)
            saving = (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or final or interrupted
            if step % cfg.log_interval == 0 or evaluating or sampling or saving:  # before saving: no NaN is saved
                records += _read_steps(pending, last_ckpt, losses, step_times)
            for record in records if info.is_main else ():
                metrics.write(record.row())
                if record.step % cfg.log_interval == 0 or record.step == cfg.max_steps:
                    say(step_line(record.step, cfg.max_steps, record.loss, record.lr, record.grad_norm,
                                  record.seconds * 1e3, record.tokens_per_second,
                                  mfu_text(record.tokens_per_second, flops_token, device, dtype, info.world_size)))
            if records:
                bar.set_postfix(loss=f"{records[-1].loss:.4f}")
            if evaluating:
                train_loss, val_loss = evaluate()
                improved = best_val is None or val_loss < best_val
                best_val = val_loss if improved else best_val
                if info.is_main:
                    metrics.write({"kind": "eval", "step": step, "tokens": tokens_seen,
                                   "train_loss": train_loss, "val_loss": val_loss})
                    say(eval_line(step, train_loss, val_loss))
                if improved and cfg.keep_best:
                    save(run_dir / "best")
            if sampling:
                sampler = unsharded_copy() if sharded else model
                if info.is_main:
                    sample = sample_text(sampler, cfg.sample_prompt, cfg.sample_tokens, cfg.sample_temperature,
                                         cfg.sample_top_k, seed=cfg.seed, tokenizer=tokenizer)
                    say(f"sample at step {step}:\n{sample}\n")
            if saving:
                path = save(checkpoint_dir(run_dir, step))
                if info.is_main:
                    last_ckpt = path
                    ckpt_io.prune(run_dir, cfg.keep_last)
                dist.barrier(info)
            if interrupted:
                say(f"interrupted: saved {last_ckpt} at step {step}; continue with --resume {run_dir}")
                break
    if info.is_main and cfg.loss_plot and step > 0:
        say(f"loss curve: {plot_losses(run_dir)}")
    if last_ckpt is None and ckpt_io.list_checkpoints(run_dir):
        last_ckpt = ckpt_io.list_checkpoints(run_dir)[-1]
    return TrainResult(run_dir=run_dir, step=step, losses=losses, train_loss=train_loss, val_loss=val_loss,
                       best_val_loss=best_val, checkpoint=last_ckpt, tokens_seen=tokens_seen,
                       elapsed_s=time.perf_counter() - started, interrupted=interrupted, sample=sample,
                       config=cfg.to_dict(), rank=info.rank)
