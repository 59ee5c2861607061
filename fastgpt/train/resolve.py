"""What a pretraining run trains on and with, resolved before the loop starts: the config (a
resumed run's own, with the flags typed beside --resume on top), the data and its tokenizer, the
model (random, or --init-from a saved one) and the batch plan. Everything here is checked
before the run directory is touched, so bad input writes nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import FastGPTError
from ..gpt2_vocab import GPT2_VOCAB_SIZE
from ..model import GPT
from ..runtime import canonical_dtype_name
from ..tokenizer import TOKENIZER_DIR
from . import checkpoint as ckpt_io
from . import options
from .batches import BatchPlan, load_corpus, load_shards, load_text_file
from .config import ARCHITECTURE_KEYS, TrainConfig


def load_data(cfg: TrainConfig, saved_tokenizer: Path | None = None):
    """(train split, val split, the run's own tokenizer or None for GPT-2's)."""
    if cfg.data:
        return load_shards(cfg.data)
    if cfg.text:
        return load_text_file(cfg.text, cfg.val_fraction, cfg.tokenizer, saved_tokenizer)
    if cfg.corpus:
        return load_corpus(cfg.corpus, cfg.val_fraction, cfg.tokenizer, saved_tokenizer)
    raise FastGPTError("no training data: give --data DIR, --text FILE or --corpus shakespeare")


def resolve_run(cfg: TrainConfig, resume, explicit: set[str] | None):
    """(config, checkpoint or None, its state.json, the options the caller set).

    A resumed run continues with its checkpoint's config, and what this invocation explicitly
    asked for on top. This happens before the device, dtype or threads are chosen: a run made
    with --device cpu resumes on the CPU on a host with a GPU (resolving the invocation's
    default `auto` first sent the resumed steps to the GPU there, and they differed from step 1
    after the checkpoint). A different network shape is refused (the weights would not fit),
    and so is another `init` (the checkpoint's weights were not made with it).
    """
    asked = explicit if explicit is not None else options.explicit_fields(cfg)
    resume_from, state = None, None
    if resume is not None:
        resume_from = ckpt_io.find_checkpoint(resume)
        state = ckpt_io.read_state(resume_from)
        original, cfg = options.merge_for_resume(state["config"], cfg, asked)
        old, new = original.model_config(), cfg.model_config()
        for key in (*ARCHITECTURE_KEYS, "init"):
            if getattr(old, key) != getattr(new, key):
                why = "another initialisation" if key == "init" else "a different architecture"
                raise FastGPTError(f"--resume {resume_from}: the checkpoint has {key}={getattr(old, key)} but this "
                                   f"run asks for {key}={getattr(new, key)} ({why})")
        cfg.out_dir = str(resume_from.parent)
    cfg.dtype = canonical_dtype_name(cfg.dtype)
    return cfg, resume_from, state, asked


def use_own_vocabulary(cfg: TrainConfig, tokenizer) -> None:
    """Size the model's vocabulary to the run's own tokenizer (unless given), and check it fits."""
    if cfg.vocab_size is None and not cfg.init_from:
        cfg.vocab_size = tokenizer.vocab_size
    vocab = cfg.vocab_size or cfg.model_config().vocab_size
    if cfg.init_from:
        vocab = ckpt_io.load_model_state(Path(cfg.init_from))[0].vocab_size
    if vocab < tokenizer.vocab_size:
        raise FastGPTError(f"--tokenizer {cfg.tokenizer}: its {tokenizer.vocab_size} token ids do not fit the "
                           f"model's vocab_size {vocab}")


def build_model(cfg: TrainConfig):
    if cfg.init_from:
        path = cfg.init_from  # a fastgpt, Hugging Face or OpenAI directory, or a downloaded model's name
        config, weights, _ = ckpt_io.load_model_state(Path(path))
        asked = {k: getattr(cfg, k) for k in ARCHITECTURE_KEYS if getattr(cfg, k) is not None}
        for key, value in asked.items():
            if getattr(config, key) != value:
                flag = f"--{'' if value else 'no-'}{key.replace('_', '-')}" if isinstance(value, bool) \
                    else f"--{key.replace('_', '-')} {value}"
                raise FastGPTError(f"--init-from {path}: the model has {key}={getattr(config, key)}, "
                                   f"but {flag} was given")
        model = GPT(config.replace(dropout=cfg.dropout))
        model.load_state_dict(weights)
        return model
    return GPT(cfg.model_config())


def prepare_inputs(cfg: TrainConfig, resume_from: Path | None, asked: set[str], info, say):
    """(train split, val split, the run's own tokenizer or None for GPT-2's, the model on the CPU, the
    batch plan); `cfg` gains the vocabulary size its tokenizer implies."""
    if cfg.init_from and resume_from is None and not cfg.data and "tokenizer" not in asked:
        starting_vocabulary = Path(cfg.init_from) / TOKENIZER_DIR
        if starting_vocabulary.is_dir():  # keep training in the starting model's own BPE
            cfg.tokenizer = str(starting_vocabulary)
    saved_tokenizer = None
    if resume_from is not None and (resume_from / "model" / TOKENIZER_DIR).is_dir():
        saved_tokenizer = resume_from / "model" / TOKENIZER_DIR  # resume reads it, never relearns it
    t_data = time.perf_counter()
    train_split, val_split, tokenizer = load_data(cfg, saved_tokenizer)
    if tokenizer is not None:
        use_own_vocabulary(cfg, tokenizer)
        if info.is_main and saved_tokenizer is None and cfg.tokenizer.startswith("bpe:"):
            say(f"tokenizer: learned a {tokenizer.vocab_size}-token byte-level BPE on the train split "
                f"({time.perf_counter() - t_data:.1f} s with tokenizing)")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if tokenizer is None and model.config.vocab_size < GPT2_VOCAB_SIZE:
        where = f"--init-from {cfg.init_from}: the model" if cfg.init_from else "--vocab-size: the model"
        raise FastGPTError(f"{where} has {model.config.vocab_size} token ids, fewer than the {GPT2_VOCAB_SIZE} "
                           "of GPT-2's tokenizer the data uses; give the model's own tokenizer (--tokenizer DIR)")
    T = model.config.context_length
    train_split.check_context(T, "context length")
    val_split.check_context(T, "context length")
    per_micro_step = cfg.micro_batch * T * info.world_size
    if cfg.tokens_per_step is None:
        accum = 1
    elif cfg.tokens_per_step % per_micro_step:
        raise FastGPTError(
            f"--tokens-per-step {cfg.tokens_per_step} is not a multiple of micro_batch x context x processes "
            f"= {cfg.micro_batch} x {T} x {info.world_size} = {per_micro_step}")
    else:
        accum = cfg.tokens_per_step // per_micro_step
    plan = BatchPlan(train_split, val_split, T, cfg.micro_batch, accum, info.world_size, info.rank,
                     cfg.seed, cfg.sampling)
    return train_split, val_split, tokenizer, model, plan
