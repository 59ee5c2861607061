"""AdamW with decoupled weight decay on matrices only.

Decaying biases and LayerNorm gains pulls them toward zero for no benefit, so
parameters with fewer than two dimensions (and nothing else) are exempt. The
fused or multi-tensor ("foreach") kernels do the update in a few launches
instead of one per parameter.

A CUDA graph replays the kernels it recorded, Python and all its floats left out, so
an optimizer inside one keeps its learning rate in a device tensor that is refilled
before each replay (`capturable`, `set_learning_rate`); checkpoints store it as a float.
"""
from __future__ import annotations

import inspect
import struct

import torch

from ..weights.state import pad_vocab_rows


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused when this torch supports it on `device`, else foreach."""
    groups = parameter_groups(model, weight_decay)
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Ready `optimizer` for recording in a CUDA graph: `capturable` on, the learning rate a
    one-element fp32 tensor on `device`. Call it after any `load_state_dict`, which brings
    back the saved groups' flags and float learning rates."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:  # a loaded foreach optimizer keeps its step counts on the CPU
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device != device:
                state["step"] = state["step"].to(device, torch.float32)
        if not (isinstance(group["lr"], torch.Tensor) and group["lr"].device == device):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a tensor one is refilled in place (a graph holds its address).

    Rounded to fp32 either way, the precision of the tensor: the eager step and the recorded
    one then update the weights bit for bit alike (a relative change below 6e-8)."""
    lr = struct.unpack("f", struct.pack("f", lr))[0]
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def portable_state(state: dict) -> dict:
    """An optimizer state dict as an eager optimizer on any device loads it: float learning
    rates, `capturable` off (the moments and step counts are unchanged)."""
    groups = [{**group, "lr": float(group["lr"]), "capturable": False} if isinstance(group.get("lr"), torch.Tensor)
              else group for group in state["param_groups"]]
    return {**state, "param_groups": groups}


def pad_vocab_moments(state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """`state` (an optimizer state dict to load into `optimizer`) with the moments of the vocabulary
    matrices zero-padded to the model's padded_vocab_size rows: checkpoints written before the
    vocabulary was stored padded hold vocab_size rows. The pad rows' gradient is always 0, so
    zero moments are exactly what training would have kept there."""
    cfg = model.config
    vocab = {id(model.tok_emb.weight), id(getattr(model.lm_head, "weight", None))}
    saved_ids = [i for group in state["param_groups"] for i in group["params"]]
    live = [p for group in optimizer.param_groups for p in group["params"]]
    # torch's format numbers the parameters in group order, FSDP's full state names them: either way in order
    is_vocab = {key: id(p) in vocab for key, p in zip(saved_ids, live, strict=False)}  # (load_state_dict checks)
    moments = {}
    for key, entry in state["state"].items():
        if is_vocab.get(key, False):
            entry = {name: pad_vocab_rows(t, cfg) if isinstance(t, torch.Tensor) and t.dim() == 2
                     and t.shape[0] == cfg.vocab_size else t for name, t in entry.items()}
        moments[key] = entry
    return {**state, "state": moments}
