"""Speculative decoding (fastgpt.speculative through fastgpt.generate.generate): greedy output is
token-identical to plain greedy decoding, the sampling rule keeps the target's distribution
(checked statistically on a tiny vocabulary), and the bookkeeping (acceptance, cache slots,
context sliding, bad arguments) holds."""
import copy

import pytest
import torch
from conftest import varied_tiny_model

from fastgpt.cached_forward import head_logits, hidden_states_at
from fastgpt.config import preset
from fastgpt.errors import FastGPTError
from fastgpt.generate import generate
from fastgpt.kv_cache import KVCache
from fastgpt.model import GPT
from fastgpt.speculative import accept_greedy, accept_sampling, prompt_lookup_proposal

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [40, 1101, 257, 1310, 2099, 286, 262, 2104, 13, 632, 373, 845]


@pytest.fixture(scope="module")
def target():
    return varied_tiny_model()


@pytest.fixture(scope="module")
def other_draft():
    """A different model of the same vocabulary: it agrees with the target only sometimes."""
    return varied_tiny_model(seed=99)


def test_cached_forward_at_an_offset_matches_the_full_pass_after_a_rejected_speculation(target):
    ids = torch.randint(0, target.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = target.hidden_states(ids)
        cache = KVCache.for_model(target, 2, 32)
        parts = [hidden_states_at(target, ids[:, :7], cache)]
        cache.lengths += 7
        parts.append(hidden_states_at(target, ids[:, 7:8], cache))
        cache.lengths += 1
        hidden_states_at(target, torch.randint(0, 100, (2, 5)), cache)  # a speculation, all rejected
        parts.append(hidden_states_at(target, ids[:, 8:], cache))      # overwrites its slots
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_head_logits_follow_the_weight_through_in_place_changes(target):
    model = copy.deepcopy(target)
    hidden = torch.randn(3, model.config.n_embd)
    real = model.config.vocab_size  # the head stores padded rows; head_logits gives the real ones
    with torch.inference_mode():
        torch.testing.assert_close(head_logits(model, hidden), model.lm_head(hidden)[:, :real])
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place (tied: the embedding too): the transposed copy must follow
    with torch.inference_mode():
        torch.testing.assert_close(head_logits(model, hidden), model.lm_head(hidden)[:, :real])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_a_draft_is_token_identical_to_plain_greedy(target, other_draft, k):
    plain = generate(target, [PROMPT], 30, temperature=0, eos_id=None)
    spec = generate(target, [PROMPT], 30, temperature=0, eos_id=None, draft=other_draft, speculate_k=k)
    assert spec.tokens == plain.tokens and len(spec.tokens[0]) == 30
    s = spec.speculation
    assert s.proposed > 0 and 0 <= s.accepted < s.proposed  # a different model: some rejections
    assert s.steps < 30 or s.accepted == 0


def test_a_draft_equal_to_the_target_accepts_everything(target):
    spec = generate(target, [PROMPT], 25, temperature=0, eos_id=None, draft=copy.deepcopy(target), speculate_k=4)
    assert spec.tokens == generate(target, [PROMPT], 25, temperature=0, eos_id=None).tokens
    assert spec.speculation.acceptance_rate == 1.0
    # 24 tokens after the first: each pass keeps its 4 drafts and adds one (the last pass fewer)
    assert spec.speculation.mean_accepted > 3.5 and spec.speculation.steps == 5


def test_sampling_with_the_target_as_its_own_draft_accepts_nearly_all(target):
    spec = generate(target, [PROMPT], 30, temperature=1.0, top_k=20, seed=3, eos_id=None,
                    draft=copy.deepcopy(target), speculate_k=4)
    assert len(spec.tokens[0]) == 30
    assert spec.speculation.acceptance_rate > 0.95  # p == q up to rounding between the two passes


def test_prompt_lookup_is_greedy_identical_and_accepts_on_repetitive_text(target):
    prompt = PROMPT + PROMPT
    plain = generate(target, [prompt], 20, temperature=0, eos_id=None)
    spec = generate(target, [prompt], 20, temperature=0, eos_id=None, prompt_lookup=True, speculate_k=3)
    assert spec.tokens == plain.tokens
    # A model at GPT-2's small init repeats itself: the lookup proposes the repetition, the model keeps it.
    torch.manual_seed(0)
    repetitive = GPT("tiny").eval()
    plain = generate(repetitive, [prompt], 20, temperature=0, eos_id=None)
    spec = generate(repetitive, [prompt], 20, temperature=0, eos_id=None, prompt_lookup=True, speculate_k=3)
    assert spec.tokens == plain.tokens
    assert spec.speculation.accepted >= 8 and spec.speculation.steps <= 10  # 19 passes without lookup


@pytest.mark.parametrize("which_draft", ["the target itself", "another model"])
def test_speculation_slides_the_context_like_plain_decoding(target, other_draft, which_draft):
    """Context 64: 100 new tokens force slides (and passes with no room left for drafts);
    the tokens still equal plain greedy's, with all drafts accepted or many rejected."""
    draft = copy.deepcopy(target) if which_draft == "the target itself" else other_draft
    prompt = PROMPT * 4  # 48 tokens
    plain = generate(target, [prompt], 100, temperature=0, eos_id=None)
    spec = generate(target, [prompt], 100, temperature=0, eos_id=None, draft=draft, speculate_k=4)
    assert spec.tokens == plain.tokens and len(spec.tokens[0]) == 100


def test_prompt_lookup_proposal():
    assert prompt_lookup_proposal([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]       # trigram "1 2 3" seen before
    assert prompt_lookup_proposal([5, 6, 7, 5, 6, 8, 6], 2) == [8, 6]       # unigram "6": its latest place...
    assert prompt_lookup_proposal([5, 6, 7, 5, 6, 8, 6], 3) == [7, 5, 6]    # ... unless an older one has k after it
    assert prompt_lookup_proposal([9, 9, 9, 9, 9], 3) == [9, 9]             # a run: the match with most after it
    assert prompt_lookup_proposal([1, 2, 3, 4], 3) == []                    # nothing recurs


def test_accept_greedy_keeps_the_matching_prefix():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 2]):
        logits[row, best] = 1.0
    assert accept_greedy([3, 5, 7], logits) == (3, 2)   # all kept, then the bonus token
    assert accept_greedy([3, 6, 7], logits) == (1, 5)   # the first mismatch is replaced


def _first_token_frequencies(drafts_from_q, p, q, trials, generator):
    counts = torch.zeros(p.shape[-1])
    for _ in range(trials):
        drafts = drafts_from_q(generator)
        q_rows = q[None].expand(len(drafts), -1) if q is not None else None
        target = p[None].expand(len(drafts) + 1, -1)
        n, token = accept_sampling(drafts, q_rows, target, generator)
        counts[drafts[0] if n >= 1 else token] += 1
    return counts / trials


@pytest.mark.parametrize("proposer", ["draft model", "point mass"])
def test_sampling_rule_keeps_the_target_distribution(proposer):
    """Vocabulary of 4: whatever q proposes, the first emitted token is distributed as p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    if proposer == "draft model":
        def drafts_from_q(gen):
            return torch.multinomial(q, 2, replacement=True, generator=gen).tolist()
        q_rows = q
    else:
        def drafts_from_q(gen):
            return [2, 3]  # a fixed proposal (prompt lookup): q is a point mass on it
        q_rows = None
    trials = 6000
    freq = _first_token_frequencies(drafts_from_q, p, q_rows, trials, g)
    # chi-square with 3 degrees of freedom: 16.3 is its 0.999 quantile
    chi2 = float(((freq - p) ** 2 / p).sum() * trials)
    assert chi2 < 16.3, (freq, chi2)
    # and the test can fail: the proposal's own distribution is far off
    assert float(((q - p) ** 2 / p).sum() * trials) > 100


def test_bad_speculation_arguments_are_one_line_errors(target):
    small_vocab = GPT(preset("tiny", vocab_size=1000)).eval()
    with pytest.raises(FastGPTError, match="vocabulary has 1000 tokens, the target's 50257"):
        generate(target, [PROMPT], 5, draft=small_vocab)
    with pytest.raises(FastGPTError, match="speculate_k"):
        generate(target, [PROMPT], 5, prompt_lookup=True, speculate_k=0)
    with pytest.raises(FastGPTError, match="one sequence"):
        generate(target, [PROMPT, PROMPT], 5, prompt_lookup=True)
    with pytest.raises(FastGPTError, match="not both"):
        generate(target, [PROMPT], 5, prompt_lookup=True, draft=target)
