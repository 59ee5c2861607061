"""The GPT-2 model, readable in one sitting.

tokens -> token embedding + learned position embedding -> dropout
       -> n_layer x [ x + Attention(LN(x));  x + MLP(LN(x)) ]      (pre-LayerNorm blocks)
       -> final LayerNorm -> LM head (tied to the token embedding, unless
          config.tie_embeddings is False) -> logits

Every hot op (LayerNorm, attention, bias+GELU, cross-entropy) is called through
`fastgpt.ops`, which routes it to the PyTorch reference or to a Triton kernel.
Reading and writing weights is `fastgpt.weights` (`load_pretrained`, `save_pretrained`),
which builds this class; the model itself knows no file format.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import GPTConfig, preset
from .errors import FastGPTError
from .generate import generate
from .kv_cache import KVCache


class LayerNorm(nn.Module):
    """LayerNorm whose computation goes through the dispatch point."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class BiasFusedLinear(nn.Linear):
    """An nn.Linear whose bias the caller adds inside its next op (the MLP adds fc's bias in
    its fused bias+GELU kernel). `matmul_no_bias(x)` is x W^T alone: a module that takes
    fc's place (an adapter, a quantized layer) provides its own."""

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        # The query, key and value projections, computed as one (C -> 3C) matmul.
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        dropout_p = self.attn_dropout if self.training else 0.0
        if cache is None:
            # Split into heads inside the op, whose backward returns d qkv in one piece.
            return self.resid_dropout(self.proj(ops.attention_qkv(qkv, self.n_head, dropout_p)))
        q, k, v = qkv.split(C, dim=2)
        # (B, T, C) -> (B, H, T, D): each head attends in its own D-dimensional subspace.
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if T == 1:
            # Decode: one new token per sequence attends to everything cached so far.
            cache.write_step(layer, k, v)
            y = ops.decode_attention(q[:, :, 0], cache.k[layer], cache.v[layer], cache.lengths + 1)
            y = y.unsqueeze(2)
        else:
            cache.write_prefill(layer, k, v)
            y = ops.attention(q, k, v, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> GELU -> C."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = BiasFusedLinear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # The bias add is fused into GELU, so fc runs without its bias.
        hidden = ops.bias_gelu(self.fc.matmul_no_bias(x), self.fc.bias)
        return self.dropout(self.proj(hidden))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attention(LN1(x)), then + MLP(LN2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        attn_out = self.attn(self.ln_1(x), cache, layer)
        # The residual add and the second LayerNorm, fused: one read and write less.
        x, h = ops.add_layer_norm(x, attn_out, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        return x + self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig | str):
        super().__init__()
        cfg = preset(config) if isinstance(config, str) else config
        self.config = cfg
        # Both vocabulary matrices hold padded_vocab_size rows (aligned GEMMs); rows past vocab_size stay zero.
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.reset_parameters()

    @property
    def tied(self) -> bool:
        """Whether the LM head is the token embedding matrix itself."""
        return getattr(self.lm_head, "weight", None) is self.tok_emb.weight  # (a quantized head has none)

    def reset_parameters(self) -> None:
        """Fresh random weights by the config's `init` scheme.

        "gpt2": N(0, 0.02) for every matrix and embedding, residual projections scaled
        by 1/sqrt(2 * n_layer) so the residual stream does not grow with depth; small
        initial logits. This is the scheme for real pretraining.
        "pytorch": each module's own default (nn.Embedding N(0, 1), nn.Linear
        kaiming-uniform weights and uniform biases), as the book's chapter-5 model
        keeps them. Its large initial activations make it memorise a tiny text within
        ten epochs (the-verdict: train loss 0.54), which the GPT-2 scheme does far
        more slowly (5.70).
        """
        with torch.no_grad():
            self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self.config.init == "gpt2":
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
                elif p.dim() >= 2:
                    nn.init.normal_(p, 0.0, 0.02)
                elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
        else:
            for module in self.modules():
                # A tied head is the embedding: re-initialising it as a Linear would overwrite N(0, 1).
                if module is not self and hasattr(module, "reset_parameters") and not (module is self.lm_head
                                                                                       and self.tied):
                    module.reset_parameters()
        # The pad rows are zero: zero logits and exactly zero gradients, so AdamW keeps them zero.
        self.tok_emb.weight[self.config.vocab_size:].zero_()
        self.lm_head.weight[self.config.vocab_size:].zero_()

    # ------------------------------------------------------------------ forward
    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final-LayerNorm'd hidden states (B, T, C).

        With a cache: a prompt (T > 1) on an empty cache is a prefill; T == 1 is one
        decode step at each sequence's own position `cache.lengths[b]`. The caller
        advances `cache.lengths` afterwards.
        """
        B, T = idx.shape
        if cache is not None and T == 1:
            positions = cache.lengths[:, None]  # (B, 1): ragged batches decode at their own positions
            # (skipped while a CUDA graph records the step: reading a value back would stall it)
            capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
            if not capturing and int(positions.max()) >= self.config.context_length:
                raise FastGPTError(f"sequence reached the context length ({self.config.context_length})")
        else:
            if T > self.config.context_length:
                raise FastGPTError(
                    f"input has {T} tokens but the model's context length is {self.config.context_length}")
            positions = torch.arange(T, device=idx.device)[None, :]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V), or, given targets (B, T), the mean cross-entropy loss.

        With targets the LM head and the loss run as one op, so a fused kernel never
        materialises the (B*T, V) logits.
        """
        h = self.hidden_states(idx, cache)
        V = self.config.vocab_size
        if targets is None:
            return self.lm_head(h)[..., :V]  # the pad columns are no token: never returned
        return ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                                        vocab_size=V)

    # ------------------------------------------------------------------ info
    def num_parameters(self, tied: bool = True) -> int:
        """Parameter count, the vocabulary's pad rows left out (GPT-2 124M: 124,439,808). `tied=False`
        counts a tied LM head as its own matrix too (what the model would have untied); an untied
        model's head is counted either way."""
        cfg = self.config
        pad = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
        n = 0
        for p in self.parameters():  # parameters() yields a tied matrix once
            n += p.numel() - (pad if p is self.tok_emb.weight or p is getattr(self.lm_head, "weight", None) else 0)
        return n if tied or not self.tied else n + cfg.vocab_size * cfg.n_embd

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_ids, max_new_tokens: int, **kwargs):
        """Continue token-id prompts; see `fastgpt.generate.generate` for the options."""
        return generate(self, prompt_ids, max_new_tokens, **kwargs)
