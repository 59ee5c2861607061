"""The model over a few new tokens per sequence, at their absolute positions, against the KV cache.

    tokens (B, T) at positions cache.lengths[b] + t  --blocks-->  hidden states (B, T, C)

`GPT.hidden_states` knows two cached cases: a prefill that starts at position 0, and a
single-token decode step. Speculative decoding needs a third: verify K drafted tokens
(T = K + 1) that continue a cached sequence, each attending to the whole cache plus the
new tokens before it. One function covers all three cases at any offset, and it runs no
host synchronisation (no `.item()`, no shape that depends on a value), so a decode step
built on it can be compiled by `torch.compile` or recorded in a CUDA graph. (On a CPU, run
eagerly, it reads the positions to attend over the live part of the cache only: a CPU
tensor, so no synchronisation.)

The blocks' own submodules (LayerNorms, projections, MLP) are called, so quantized or
LoRA layers work unchanged; only the attention core is written here, because it must
read the cache: a masked attention over the cache's full (static) length, where key j
is visible to the query of new token t of sequence b iff j <= cache.lengths[b] + t.
Slots at or past a sequence's length that an earlier, rejected speculation wrote are
never visible before they are overwritten, since the cache is indexed by position.

The caller advances `cache.lengths` afterwards (by how many tokens it keeps).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native_decode, ops
from .kv_cache import KVCache


def hidden_states_at(model, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Token ids (B, T) placed at positions cache.lengths[b] + t -> final-LayerNorm'd hidden
    states (B, T, C); their keys and values are written into the cache at those positions.
    The caller guarantees cache.lengths + T <= cache.max_length (unchecked: no host sync)."""
    B, T = idx.shape
    offsets = torch.arange(T, device=idx.device)
    positions = cache.lengths[:, None] + offsets                       # (B, T)
    x = model.tok_emb(idx) + model.pos_emb(positions)
    live = _live_span(positions, cache)
    if live is not None:  # on a CPU: all blocks in one C call?
        plan = native_decode.plan_for(model)
        if plan is not None and plan.fits(x, cache, live):
            return model.ln_f(plan.run(x, cache))
    span = cache.max_length if live is None else live
    decode_kernel = T == 1 and ops.uses_triton(x)
    visible = None
    # (one token of one sequence over exactly its live keys sees them all: no mask)
    if not decode_kernel and not (T == 1 and B == 1 and live is not None):
        keys = torch.arange(span, device=idx.device)
        visible = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, span)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = block.ln_1(x)
        C = h.shape[-1]
        q, k, v = attn.qkv(h).split(C, dim=2)
        q, k, v = (t.view(B, T, attn.n_head, attn.head_dim) for t in (q, k, v))
        cache.write_at(layer, k, v, positions)
        if decode_kernel:  # the Triton decode kernel: one query per sequence
            y = ops.decode_attention(q[:, 0], cache.k[layer], cache.v[layer], cache.lengths + 1)[:, None]
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[layer][:, :, :span],
                                               cache.v[layer][:, :, :span], attn_mask=visible).transpose(1, 2)
        x, h = ops.add_layer_norm(x, attn.proj(y.reshape(B, T, C)), block.ln_2.weight, block.ln_2.bias,
                                  block.ln_2.eps)
        x = x + block.mlp(h)
    return model.ln_f(x)


def _live_span(positions: torch.Tensor, cache: KVCache) -> int | None:
    """How many cache slots the step can see, or None for "keep the shape static". On a
    CPU, reading the positions costs no device sync, and attending over the live prefix
    instead of the whole static cache saves most of the attention's work (a 1024-slot
    cache holding 80 tokens: 3.9 of 44 ms per GPT-2 token). On GPUs, and while
    torch.compile traces, the step attends over the whole cache, masked."""
    if positions.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return int(positions.max()) + 1


# model -> (weight key, transposed copy); weak keys: the copy lives as long as its model
_TRANSPOSED_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _transposed_head(model) -> torch.Tensor | None:
    head = model.lm_head
    weight = getattr(head, "weight", None)
    # exactly nn.Linear: a subclass (LoRA, say) may add to its forward
    if type(head) is not nn.Linear or weight is None or weight.device.type != "cpu":
        return None
    if weight.dtype != torch.float32:  # 16-bit `x @ Wt` is CPU BLAS's slow path (fp16: 0.7 GB/s, 30x F.linear)
        return None
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    cached = _TRANSPOSED_HEADS.get(model)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, weight.detach()[:model.config.vocab_size].t().contiguous())  # real rows only
        _TRANSPOSED_HEADS[model] = cached
    return cached[1]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head as decoding wants it: logits (.., V) of hidden states (.., C).

    On CPUs a GEMV through `F.linear(x, W)` with W (vocab, C) ran at half the speed of
    `x @ Wt` with Wt (C, vocab) stored contiguous (GPT-2's head: 12.8 vs 7.3 ms on an
    AVX2 EPYC, 19.9 vs 9.5 ms on one core of an AVX512 one). So a float32 head on a CPU is
    copied once, transposed, and kept beside its model; the copy is rebuilt when the
    weight changes (storage, version or dtype). Quantized, 16-bit, streaming
    (`fastgpt.streaming_linear`) and GPU heads run as they are.
    """
    wt = _transposed_head(model)
    if wt is None:
        return model.lm_head(hidden)[..., :model.config.vocab_size]  # never the padded vocabulary's ids
    logits = hidden @ wt
    bias = model.lm_head.bias
    return logits if bias is None else logits + bias
