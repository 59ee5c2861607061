"""Data-parallel training across processes (torchrun), one model replica per rank.

Launch (one machine):   torchrun --standalone --nproc_per_node=N -m fastgpt pretrain ...
Launch (several nodes): on every node,
    torchrun --nnodes=M --nproc_per_node=N --node_rank=<0..M-1> \\
             --master_addr=<node 0's address> --master_port=29500 -m fastgpt pretrain ...

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; `setup()` reads them and joins the
process group (NCCL between GPUs, gloo on CPUs). Without them it is a single
process and every collective here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_request: str) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_request == "auto":
        device_request = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_request)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The model as trained: itself (1 process), DDP, or FSDP sharded at transformer-block granularity."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        import functools
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from ..model import Block
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block})
        # The tied embedding / LM head stays in the root unit, so tying survives sharding.
        return FSDP(model, auto_wrap_policy=policy, use_orig_params=True,
                    device_id=device if device.type == "cuda" else None)
    raise ValueError(f"unknown distributed strategy {strategy!r}")


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over all ranks (identity for one process)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if `flag` is true on any rank (e.g. one rank got Ctrl-C: all stop together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
