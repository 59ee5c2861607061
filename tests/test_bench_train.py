"""The training benchmark: the nanoGPT-style contender is the same model, each step trains,
timings are per step over samples of several steps, and GPU-only cases skip on a CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt.bench import common, train
from fastgpt.bench.nanogpt import NanoGPT, padded_vocab
from fastgpt.config import preset
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.train.mfu import model_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
TINY = preset("tiny", context_length=16)


def _copy_into_nanogpt(model: GPT) -> NanoGPT:
    """A NanoGPT holding `model`'s weights (padding rows of the vocabulary left at zero)."""
    nano = NanoGPT(model.config)
    with torch.no_grad():
        nano.wte.weight.zero_()
        nano.wte.weight[: model.config.vocab_size] = model.tok_emb.weight[: model.config.vocab_size]
        nano.wpe.weight.copy_(model.pos_emb.weight)
        nano.ln_f.load_state_dict(model.ln_f.state_dict())
        for ours, theirs in zip(model.blocks, nano.blocks, strict=True):
            theirs.ln_1.load_state_dict(ours.ln_1.state_dict())
            theirs.ln_2.load_state_dict(ours.ln_2.state_dict())
            theirs.attn.c_attn.load_state_dict(ours.attn.qkv.state_dict())
            theirs.attn.c_proj.load_state_dict(ours.attn.proj.state_dict())
            theirs.c_fc.load_state_dict(ours.mlp.fc.state_dict())
            theirs.mlp_proj.load_state_dict(ours.mlp.proj.state_dict())
    return nano


def test_nanogpt_contender_is_the_same_model_with_a_padded_vocabulary():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    nano = _copy_into_nanogpt(model).eval()
    assert padded_vocab(50257) == 50304 and nano.wte.weight.shape[0] == 50304
    pad_rows = (50304 - TINY.vocab_size) * TINY.n_embd
    assert sum(p.numel() for p in nano.parameters()) == model.num_parameters() + pad_rows
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(nano.logits(idx)[..., : TINY.vocab_size], model(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["fastgpt", "nanogpt"])
def test_each_contender_step_trains(variant):
    step = train.TrainStep(variant, TINY, 2, "cpu", torch.float32)
    losses = [float(step()) for _ in range(6)]
    assert losses[0] == pytest.approx(10.8, abs=0.3)  # ~ln(50257) at GPT-2 initialisation
    assert losses[-1] < losses[0] - 0.5  # the same batch every step: it is memorised


def test_compiled_variants_wrap_the_same_contender():
    """fastgpt+compile is fastgpt's own path (backend auto) under torch.compile (built lazily: not run here)."""
    for variant, backend in (("fastgpt+compile", "auto"), ("nanogpt+compile", None), ("fastgpt", "auto")):
        step = train.TrainStep(variant, TINY, 2, "cpu", torch.float32)
        assert step.backend == backend
        assert (step.forward is not step.model) == variant.endswith("+compile")


def test_flops_per_token_is_fastgpts_unpadded_count():
    assert train.flops_per_token(TINY) == model_flops_per_token(GPT(TINY), TINY.context_length)


def test_measure_steps_times_several_steps_per_sample():
    calls = []
    med, p20, p80 = common.measure_steps_ms(lambda: calls.append(1), steps_per_sample=4, samples=5, warmup=2)
    assert len(calls) == 2 + 4 * 5
    assert 0 <= p20 <= med <= p80


def test_run_rows_unknown_variant_and_device_specific_sizes(capsys):
    rows = train.run("cpu", "tiny", None, variants=("fastgpt", "nanogpt"), samples=2, steps=1)
    assert [r.backend for r in rows] == ["fastgpt", "nanogpt"]
    assert all(r.shape == "L2-C64 B=2 T=32" and r.unit == "tokens/s" and r.p20 <= r.median <= r.p80 for r in rows)
    with pytest.raises(FastGPTError, match="unknown variant 'nanogpt2'"):
        train.run("cpu", "tiny", None, variants=("nanogpt2",))
    if not torch.cuda.is_available():
        assert train.run("cpu", "gpt2", None) == []
        assert "needs a CUDA GPU" in capsys.readouterr().out
    else:
        assert train.run("cuda", "cpu", None) == []
        assert "the CPU case" in capsys.readouterr().out


def test_gpu_sizes_are_the_issue_cases():
    (gpu_case,) = train.SIZE_SETS["gpt2"]["cases"]
    assert gpu_case.batches == (8, 32) and gpu_case.config().context_length == 1024
    assert train.SIZE_SETS["gpt2"]["dtype"] == torch.bfloat16 and train.SIZE_SETS["gpt2"]["memory"]
    big, small = train.SIZE_SETS["cpu"]["cases"]
    assert (big.config().n_layer, big.config().n_embd, big.batches, big.config().context_length) == (12, 768, (4,), 256)
    assert (small.config().n_layer, small.config().n_embd) == (6, 384)
    assert train.SIZE_SETS["cpu"]["variants"] == ("fastgpt", "fastgpt+compile", "nanogpt", "nanogpt+compile")


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_train_results(tmp_path):
    """scripts/gpu_check.sh --cpu runs its training stage at tiny sizes and records the commit."""
    env = dict(os.environ, STAGES="train", FASTGPT_COMMIT="abc1234",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    readme = (tmp_path / "README.md").read_text()
    assert "commit: abc1234" in readme and "bench train exit code: 0" in readme
    assert "abc1234" in (tmp_path / "train.csv").read_text()
    assert "vs nanogpt" in (tmp_path / "train.md").read_text()


@pytest.mark.parametrize("capacity", [0, 1, 5, 234, 1023, 1024, 5000])
def test_largest_batch_search_finds_the_capacity_with_few_probes(capacity):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= capacity

    assert train.largest_fitting(fits, limit=1024) == min(capacity, 1024)
    assert len(probes) <= 2 * 11
