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

from ..runtime import resolve_device


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
    device = resolve_device(device_request)
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
        # FSDP2: each block's parameters are sharded across ranks and gathered just in time;
        # the root unit holds the embeddings (tied LM head included). Works on CUDA and on CPU/gloo.
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        # An explicit mesh on the training device: FSDP's default mesh is a CUDA one
        # whenever a GPU is visible, which breaks gloo ranks training on the CPU.
        mesh = init_device_mesh(device.type, (info.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}")


def gradient_sync(trained: torch.nn.Module, info: DistInfo, strategy: str, enabled: bool):
    """Context for one micro-step: skip the gradient all-reduce unless `enabled` (the last micro-step)."""
    import contextlib
    if not info.enabled or enabled:
        if info.enabled and strategy == "fsdp":
            trained.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if strategy == "fsdp":
        trained.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return trained.no_sync()


def full_state(model: torch.nn.Module, optimizer, strategy: str, info: DistInfo) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts. Under FSDP every rank must call this (it gathers)."""
    if strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict, strategy: str, info: DistInfo) -> None:
    if strategy == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


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
