"""Pretraining: `train(TrainConfig(...))` or `fastgpt pretrain ...`.

config.py      what a run is (dataclass, TOML/YAML files, flag overrides)
options.py     dataclass -> flags, config files, resume merge (pretraining and fine-tuning alike)
step.py        one optimizer step for every training loop; losses read from the device only when logged
run_dir.py     run directories: checkpoint names, --overwrite, keep_last, resumed metrics
interrupt.py   Ctrl-C: finish the step, checkpoint, exit 130
batches.py     which tokens each step and each process reads
schedule.py    warmup + cosine learning rate
optim.py       AdamW with decay on matrices only
mfu.py         FLOPs per token and model FLOPs utilisation
metrics.py     log lines, metrics.jsonl, the loss curve
evaluate.py    loss on fixed batches, text samples
checkpoint.py  atomic checkpoints and exact resume
distributed.py torchrun / DDP / FSDP
recompute.py   activation checkpointing
resolve.py     what a run trains on: resumed config, data, tokenizer, model, batch plan
loop.py        the loop itself
"""
from .config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name):  # the loop imports torch: load it only when used (keeps `fastgpt --help` fast)
    if name in ("train", "TrainResult"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(name)
