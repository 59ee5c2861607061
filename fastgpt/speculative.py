"""Speculative decoding: a cheap proposer drafts K tokens, the target model checks them in one pass.

    history ... x  --proposer-->  d1 .. dK
    target over [x, d1 .. dK] at their positions (K + 1 tokens, one forward pass)
        --> logits after x, d1, .., dK --> keep d1..dn, then one token of the target's own

Batch-1 decoding reads every weight once per token; verifying K + 1 tokens reads them
once for up to K + 1 tokens, so each accepted draft token is nearly free.

Acceptance keeps the target's output distribution exactly (Leviathan et al. 2023,
Chen et al. 2023):
  greedy:   accept d_i while it is the target's argmax; the first mismatch is replaced
            by the target's argmax, so the text is token-identical to plain greedy decoding;
  sampling: accept d_i with probability min(1, p(d_i) / q(d_i)), p the target's and q the
            proposer's distribution (after the same temperature / top-k / top-p); on the
            first rejection draw from max(0, p - q), normalised. When all K are accepted
            the target's distribution after dK gives one more token.

Proposers: a small draft model with its own KV cache (`DraftModel`), or prompt lookup
(`prompt_lookup_proposal`): the tokens that followed the latest earlier occurrence of
the text's last n-gram, no model at all; its q is a point mass on each proposed token.

Rejected tokens leave keys/values in both caches at positions past the kept length;
the caches are indexed by position, so the next pass simply overwrites them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .cached_forward import head_logits, hidden_states_at
from .errors import FastGPTError
from .kv_cache import KVCache
from .sampling import SamplingParams, draw, filter_logits


@dataclass
class SpeculationStats:
    """Counts over one generation: `proposed` draft tokens, `accepted` of them, in `steps`
    target verification passes."""
    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens kept per verification pass (0..K); each pass also adds one of its own."""
        return self.accepted / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (f"speculation: {self.accepted} of {self.proposed} draft tokens accepted "
                f"({self.acceptance_rate:.1%}), {self.mean_accepted:.2f} per verification pass "
                f"({self.steps} passes)")


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from, as probabilities (.., V) in fp32."""
    shape = logits.shape
    flat = filter_logits(logits.reshape(-1, shape[-1]).float() / params.temperature, params.top_k, params.top_p)
    return torch.softmax(flat, dim=-1).reshape(shape)


def accept_greedy(drafts: Sequence[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(how many drafts are kept, the token after them): drafts are kept while each is the
    target's argmax; target_logits (K + 1, V) follow the last kept token and d1..dK."""
    choices = torch.argmax(target_logits.float(), dim=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == choices[n]:
        n += 1
    return n, choices[n]


def accept_sampling(drafts: Sequence[int], draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
    """(how many drafts are kept, the token after them) by the rule min(1, p/q) with
    residual resampling. draft_probs (K, V): q of each draft token's position, or None for
    point masses on the drafts (prompt lookup); target_probs (K + 1, V): p, fp32."""
    K = len(drafts)
    if K:
        index = torch.tensor(drafts, device=target_probs.device)
        rows = torch.arange(K, device=target_probs.device)
        p = target_probs[rows, index]
        q = draft_probs[rows, index] if draft_probs is not None else torch.ones_like(p)
        u = torch.rand(K, generator=generator, device=target_probs.device)
        # accept d_i iff u_i * q_i < p_i  (u < p / q without dividing by a zero q)
        rejected = (u * q >= p).tolist()
    for n in range(K):
        if rejected[n]:
            q_row = draft_probs[n] if draft_probs is not None else _one_hot(drafts[n], target_probs[n])
            residual = (target_probs[n] - q_row).clamp(min=0)
            total = residual.sum()
            weights = residual if total > 0 else target_probs[n]  # (draw normalises)
            return n, int(draw(weights[None], generator)[0])
    return K, int(draw(target_probs[K][None], generator)[0])


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    row = torch.zeros_like(like)
    row[token] = 1.0
    return row


def prompt_lookup_proposal(history: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the history's last n-gram
    (longest n first, max_ngram down to min_ngram): the latest occurrence with k tokens
    after it, else the one with the most; [] when none recurs."""
    history = list(history)
    n_tokens = len(history)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        tail = history[n_tokens - n:]
        best: list[int] = []
        for start in range(n_tokens - n - 1, -1, -1):
            if history[start:start + n] == tail:
                follow = history[start + n:start + n + k]
                if len(follow) > len(best):
                    best = follow
                if len(best) == k:
                    break
        if best:
            return best
    return []


def check_draft(target, draft) -> None:
    """A draft model must share the target's vocabulary (token ids mean the same text)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise FastGPTError(f"--draft: its vocabulary has {dv} tokens, the target's {tv}: a draft model must "
                           "use the same tokenizer")


class DraftModel:
    """A small model proposing tokens, with its own KV cache kept in step with the text.

    `cached` counts the leading tokens of the current window whose keys/values are in the
    cache and still valid; a proposal first feeds the rest (at least the newest token).
    """

    def __init__(self, model, max_length: int):
        self.model = model
        self.cache = KVCache.for_model(model, 1, max_length)
        self.cached = 0
        self.fed = 0  # drafts of the last proposal that went through the cache

    def reset(self) -> None:
        self.cached = 0

    def propose(self, window: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens continuing `window`, and their distributions q (k, V) (None when greedy)."""
        device = self.model.device
        pending = list(window[self.cached:])
        drafts, probs = [], []
        for _ in range(k):
            self.cache.lengths.fill_(self.cached)
            idx = torch.tensor([pending], device=device)
            logits = head_logits(self.model, hidden_states_at(self.model, idx, self.cache)[:, -1])[0]
            self.cached += len(pending)
            if params.greedy:
                token = int(torch.argmax(logits.float()))
            else:
                q = probabilities(logits, params)
                token = int(draw(q[None], generator)[0])
                probs.append(q)
            drafts.append(token)
            pending = [token]
        # the last draft was never fed; the others are valid only if the target keeps them
        self.fed = self.cached - len(window)  # drafts d1..d_{k-1} now in the cache
        return drafts, (torch.stack(probs) if probs else None)

    def keep(self, window_length_before: int, accepted: int) -> None:
        """After verification: of the drafts fed to the cache, keep those the target accepted."""
        self.cached = window_length_before + min(accepted, self.fed)
