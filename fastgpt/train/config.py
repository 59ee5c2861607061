"""Everything that describes a training run, in one flat dataclass.

A run is resolved in three layers, later ones winning: the dataclass defaults,
an optional TOML/YAML file (`--config run.toml`), and command-line flags. The
resolved config is printed at start and saved inside every checkpoint, so a
checkpoint alone says how it was made and a resumed run continues identically.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import INIT_SCHEMES, PRESETS, GPTConfig, preset
from ..errors import FastGPTError
from . import options

# Keys that define the network's shape: a checkpoint can only resume with the same values.
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "context_length", "vocab_size", "tie_embeddings")


@dataclass
class TrainConfig:
    # --- data: exactly one source
    data: str | None = None          # directory of token shards from `fastgpt prepare`
    text: str | None = None          # a plain-text file, tokenized on the fly and split train/val
    corpus: str | None = None        # a built-in corpus: "shakespeare"
    val_fraction: float = 0.1        # tail of --text/--corpus tokens held out for validation
    sampling: str = "random"         # "random" windows anywhere, or "epoch": shuffled non-overlapping windows
    tokenizer: str = "gpt2"          # --text/--corpus: "gpt2", "bpe:VOCAB" (trained on the train split), or a BPE dir
    # --- model: a preset with optional overrides, or a saved model to continue from
    preset: str = "mini"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    context_length: int | None = None
    vocab_size: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool | None = None  # LM head = token embedding (None: the preset's, True as in GPT-2)
    init: str | None = None          # random init: "gpt2" or "pytorch" (the book's ch. 5 model); None: gpt2
    init_from: str | None = None     # a fastgpt model directory (e.g. a checkpoint's model); its BPE, if any, is kept
    # --- optimisation
    max_steps: int = 1000
    epochs: float | None = None      # if set, max_steps = ceil(epochs * train tokens / tokens per step)
    time_budget: float | None = None  # seconds: after 3 timed steps, max_steps shrinks to what fits (demo)
    micro_batch: int = 8             # sequences per forward/backward on each process
    tokens_per_step: int | None = None  # global batch in tokens; None = micro_batch * context * world
    lr: float = 6e-4
    min_lr: float = 6e-5             # cosine decays to this floor
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global gradient norm; 0 disables clipping
    # --- execution
    device: str = "auto"             # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"              # "auto", "fp32", "bf16", "fp16" or torch's names (autocast; fp16: a GradScaler)
    backend: str = "auto"            # fastgpt.ops backend: "auto", "torch", "triton"
    compile: bool = False            # torch.compile the model
    cuda_graph: bool = True          # CUDA: the whole step as one CUDA graph (train/cuda_graph.py); CPU: ignored
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    distributed: str = "ddp"         # under torchrun: "ddp" or "fsdp"
    threads: int | None = None       # CPU threads for torch (None = fastgpt.runtime.default_threads(): physical cores)
    seed: int = 1337
    # --- evaluation and sampling
    eval_interval: int = 100         # evaluate every N steps (and at the end); 0 = only at the end
    eval_batches: int = 20           # fixed, seeded batches per split
    eval_batch_size: int | None = None  # None = micro_batch
    sample_interval: int = 0         # print a text sample every M steps (0 = only at the end)
    sample_prompt: str = "\n"
    sample_tokens: int = 64
    sample_top_k: int = 40
    sample_temperature: float = 0.8
    # --- outputs
    out_dir: str = "runs/run"
    ckpt_interval: int = 0           # checkpoint every K steps (0 = only at the end)
    keep_last: int = 2               # how many periodic checkpoints to keep
    keep_best: bool = True           # keep best/ by validation loss
    overwrite: bool = False          # start fresh in an out_dir that already has checkpoints
    log_interval: int = 1
    progress: bool = True            # tqdm progress bar
    loss_plot: bool = True           # loss curve PNG at the end

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        sources = [name for name in ("data", "text", "corpus") if getattr(self, name)]
        if len(sources) > 1:
            raise FastGPTError(f"give one data source, got {' and '.join('--' + s for s in sources)}")
        if self.corpus is not None and self.corpus != "shakespeare":
            raise FastGPTError(f"--corpus: unknown corpus {self.corpus!r} (choose from: shakespeare)")
        if self.tokenizer.startswith("bpe:"):
            size = self.tokenizer[4:]
            if not size.isdigit() or not 258 <= int(size) <= 65536:
                raise FastGPTError(f"--tokenizer {self.tokenizer}: expected bpe:VOCAB with VOCAB in [258, 65536] "
                                   f"(256 bytes + <|endoftext|> + at least one merge; ids are stored as uint16)")
        if self.data and self.tokenizer != "gpt2":
            raise FastGPTError(f"--tokenizer {self.tokenizer}: --data shards are already tokenized; "
                               f"their meta.json names the tokenizer")
        if self.sampling not in ("random", "epoch"):
            raise FastGPTError(f"--sampling must be 'random' or 'epoch', got {self.sampling!r}")
        if self.preset not in PRESETS:
            raise FastGPTError(f"--preset: unknown preset {self.preset!r} (choose from: {', '.join(PRESETS)})")
        if self.backend not in ("auto", "torch", "triton"):
            raise FastGPTError(f"--backend must be auto, torch or triton, got {self.backend!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise FastGPTError(f"--distributed must be ddp or fsdp, got {self.distributed!r}")
        positive = ["max_steps", "micro_batch", "eval_batches", "sample_tokens", "log_interval"]
        for name in positive:
            if getattr(self, name) < 1:
                raise FastGPTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("tokens_per_step", "eval_batch_size", "threads", "epochs", "time_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FastGPTError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("warmup_steps", "eval_interval", "sample_interval", "ckpt_interval", "keep_last",
                     "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise FastGPTError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise FastGPTError(f"need 0 < min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FastGPTError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise FastGPTError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.init is not None and self.init not in INIT_SCHEMES:
            raise FastGPTError(f"--init must be {' or '.join(INIT_SCHEMES)}, got {self.init!r}")
        if self.init is not None and self.init_from:
            raise FastGPTError(f"--init {self.init}: the weights come from --init-from {self.init_from}; "
                               f"--init chooses random weights only")
        return self

    def model_config(self) -> GPTConfig:
        """The GPTConfig this run trains: the preset with any explicit dims/tying/init/dropout replaced."""
        overrides = {k: getattr(self, k) for k in (*ARCHITECTURE_KEYS, "init") if getattr(self, k) is not None}
        return preset(self.preset, dropout=self.dropout, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return "\n".join(f"  {k:<24} {json.dumps(v)}" for k, v in self.to_dict().items())


def option_names() -> list[str]:
    return options.option_names(TrainConfig)


def load_config_file(path: str | Path) -> dict:
    """A TOML/YAML run description as {option: value} (`fastgpt.train.options.load_config_file`)."""
    return options.load_config_file(path, TrainConfig)


def resolve(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- config file <- explicit overrides, validated."""
    return options.resolve(TrainConfig, file_values, overrides)


# `fastgpt pretrain --demo`: a small GPT on Shakespeare in about 4 minutes on 2 CPU cores (faster on a GPU:
# the time budget then allows all max_steps). A 4096-token BPE learned on the plays themselves (fastgpt.bpe,
# ~2 s) instead of GPT-2's 50257 tokens makes the LM head a small part of the compute, so the budget goes
# into the blocks and into many more steps; whole words per token also make early samples readable.
# Threads: fastgpt.runtime.default_threads(), the physical cores (or OMP_NUM_THREADS). On a machine
# busy with other jobs, fewer threads can be faster (OpenMP threads wait for each other whenever another
# process holds a core): pass --threads 1 there.
DEMO: dict[str, Any] = dict(
    corpus="shakespeare", tokenizer="bpe:4096",
    preset="mini",
    n_layer=4, n_head=4, n_embd=256, context_length=128,
    micro_batch=8,
    max_steps=3000, time_budget=220.0,
    lr=2e-3, min_lr=2e-4, warmup_steps=50,
    weight_decay=0.1, grad_clip=1.0,
    eval_interval=0, eval_batches=8, log_interval=50,
    sample_prompt="ROMEO:\n", sample_tokens=160, sample_temperature=0.8, sample_top_k=40,
    ckpt_interval=100, keep_last=1,
    out_dir="runs/demo", overwrite=True,
)
