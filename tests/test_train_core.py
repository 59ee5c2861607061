"""Trainer basics on tiny configs: schedule, init loss, learning, accumulation, config files, errors."""
from __future__ import annotations

import math

import pytest
import torch
from train_helpers import tiny_options, train_losses, word_text

from fastgpt.errors import FastGPTError
from fastgpt.train import TrainConfig, train
from fastgpt.train.config import load_config_file, resolve
from fastgpt.train.mfu import flops_per_token, mfu_text
from fastgpt.train.optim import parameter_groups
from fastgpt.train.schedule import learning_rate


def test_schedule_exact_values():
    def lr(step):
        return learning_rate(step, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr(0) == pytest.approx(1e-4, rel=1e-12)         # (0 + 1) / 10 of the peak
    assert lr(4) == pytest.approx(5e-4, rel=1e-12)
    assert lr(9) == pytest.approx(1e-3, rel=1e-12)         # warmup ends at the peak
    assert lr(10) == pytest.approx(1e-3, rel=1e-12)        # cosine starts at the peak
    assert lr(60) == pytest.approx(5.5e-4, rel=1e-12)      # halfway: (peak + floor) / 2
    assert lr(35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert lr(110) == pytest.approx(1e-4, rel=1e-12)
    assert lr(500) == pytest.approx(1e-4, rel=1e-12)       # stays at the floor


def test_weight_decay_only_on_matrices():
    from fastgpt.model import GPT
    model = GPT("tiny")
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    # the tied embedding / LM head is one parameter, counted once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    untied = GPT(TrainConfig(preset="tiny", tie_embeddings=False).model_config())
    decay, no_decay = parameter_groups(untied, 0.1)
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(untied.parameters())) == len(list(model.parameters())) + 1
    assert any(p is untied.lm_head.weight for p in decay["params"])


def test_untrained_loss_is_log_vocab():
    from fastgpt.model import GPT
    model = GPT(TrainConfig(preset="tiny").model_config())
    x = torch.randint(0, 50257, (4, 64))
    with torch.no_grad():
        loss = model(x, torch.randint(0, 50257, (4, 64))).item()
    assert abs(loss - math.log(50257)) < 0.1, loss  # 10.82


def test_flops_formula_and_cpu_mfu():
    # GPT-2 124M at T=1024: 6N + 12*L*H*Q*T, N without position embeddings
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(n, 12, 12, 64, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert mfu_text(1e4, 10**9, torch.device("cpu"), torch.float32) == "MFU n/a (CPU)"
    # an untied head is the same matmul as a tied one; its token embedding is only looked up
    from fastgpt.model import GPT
    from fastgpt.train.mfu import model_flops_per_token
    with torch.device("meta"):
        tied, untied = (GPT(TrainConfig(preset="gpt2", tie_embeddings=t).model_config()) for t in (True, False))
    assert model_flops_per_token(untied, 1024) == model_flops_per_token(tied, 1024) == flops_per_token(
        n, 12, 12, 64, 1024)


def test_init_and_tying_options():
    cfg = resolve({"init": "pytorch", "tie_embeddings": False}).model_config()
    assert cfg.init == "pytorch" and cfg.tie_embeddings is False
    default = resolve({}).model_config()
    assert default.init == "gpt2" and default.tie_embeddings is True  # the preset's
    with pytest.raises(FastGPTError, match=r"^--init must be gpt2 or pytorch, got 'xavier'$"):
        resolve({"init": "xavier"})
    with pytest.raises(FastGPTError, match="--init pytorch: the weights come from --init-from"):
        resolve({"init": "pytorch", "init_from": "runs/x"})


def test_loss_goes_down_and_run_dir(tmp_path):
    text = word_text(tmp_path / "words.txt")
    result = train(TrainConfig(**tiny_options(text, tmp_path / "run", max_steps=30, eval_interval=15,
                                              warmup_steps=5, lr=1e-2, min_lr=1e-3)))
    assert result.step == 30 and len(result.losses) == 30
    assert result.losses[0] > 10.0
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 3.0  # 25-word vocabulary: ~3.3 nats is reachable
    assert result.val_loss < 7.0
    run = tmp_path / "run"
    assert (run / "ckpt_000030" / "model" / "model.safetensors").is_file()
    assert (run / "best" / "state.json").is_file()
    assert sorted(train_losses(run)) == list(range(1, 31))


def test_accumulation_equals_larger_batch(tmp_path):
    text = word_text(tmp_path / "words.txt")
    big = train(TrainConfig(**tiny_options(text, tmp_path / "a", micro_batch=4, max_steps=3)))
    accumulated = train(TrainConfig(**tiny_options(text, tmp_path / "b", micro_batch=2, tokens_per_step=2 * 2 * 16,
                                                   max_steps=3)))
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5, abs=1e-5)
    assert big.losses[0] != big.losses[2]  # the steps did update the model


def test_config_file_and_flag_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[optim]\nlr = 0.002\nmax_steps = 50\n[data]\ncorpus = "shakespeare"\n')
    values = load_config_file(toml)
    assert values == {"preset": "tiny", "lr": 0.002, "max_steps": 50, "corpus": "shakespeare"}
    cfg = resolve(values, {"max_steps": 7})
    assert (cfg.lr, cfg.max_steps, cfg.preset, cfg.micro_batch) == (0.002, 7, "tiny", TrainConfig().micro_batch)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 1.0e-3\nwarmup_steps: 3\n")
    assert load_config_file(yaml_file) == {"lr": 1e-3, "warmup_steps": 3}


@pytest.mark.parametrize("content, message", [
    ('lr = 1e-3\nlearning_rat = 3\n', "unknown key 'learning_rat'"),
    ('[optim]\nwarmup = 3\n', "unknown key 'warmup'"),
    ('max_steps = "ten"\n', "key 'max_steps' must be int"),
])
def test_config_file_errors_name_key_and_file(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(FastGPTError, match=message) as err:
        load_config_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "run", lr=1e20, min_lr=1e20, warmup_steps=0, grad_clip=0.0,
                           ckpt_interval=1, max_steps=6)
    with pytest.raises(FastGPTError, match=r"loss became nan at step \d") as err:
        train(TrainConfig(**options))
    good = sorted((tmp_path / "run").glob("ckpt_*"))
    assert good and str(good[-1]) in str(err.value)
    from fastgpt.train.checkpoint import load_model_state
    _, weights, _ = load_model_state(good[-1] / "model")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_example_configs_load_and_demo_file_matches_builtin():
    from pathlib import Path

    from fastgpt.train.config import DEMO
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.*"))
    assert {p.name for p in configs} >= {"demo.toml", "verdict-gpt2.yaml", "gpt2-124m.toml"}
    for path in configs:
        resolve(load_config_file(path))
    assert load_config_file(configs[0].with_name("demo.toml")) == DEMO


def test_activation_checkpointing_gives_the_same_gradients():
    from fastgpt.model import GPT
    from fastgpt.train.recompute import enable_activation_checkpointing
    cfg = TrainConfig(preset="tiny", n_embd=32, context_length=16, dropout=0.0).model_config()
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg)
        if recompute:
            assert enable_activation_checkpointing(model) == cfg.n_layer
        model(x, y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_init_from_a_saved_model_continues_from_its_weights(tmp_path):
    text = word_text(tmp_path / "words.txt")
    first = train(TrainConfig(**tiny_options(text, tmp_path / "a", max_steps=20, lr=1e-2, warmup_steps=2)))
    model_dir = first.checkpoint / "model"
    again = train(TrainConfig(**tiny_options(text, tmp_path / "b", max_steps=1, init_from=str(model_dir),
                                             preset="gpt2", n_layer=None, n_head=None, n_embd=None)))
    assert again.losses[0] < first.losses[0] - 2.0  # starts where the first run ended, not at ln(V)
    with pytest.raises(FastGPTError, match="--init-from .*n_embd=32, but --n-embd 64 was given"):
        train(TrainConfig(**tiny_options(text, tmp_path / "c", init_from=str(model_dir), n_embd=64)))
    with pytest.raises(FastGPTError, match="--init-from .*tie_embeddings=True, but --no-tie-embeddings was given"):
        train(TrainConfig(**tiny_options(text, tmp_path / "d", init_from=str(model_dir), tie_embeddings=False)))


def test_eval_batches_follow_the_sampling_mode():
    """Epoch sampling evaluates on the split's own non-overlapping windows (what it trains on);
    random sampling on windows starting anywhere."""
    import numpy as np

    from fastgpt.train.batches import BatchPlan, TokenSplit
    train_split = TokenSplit(np.arange(100, dtype=np.uint16), "train")  # token i at position i
    val_split = TokenSplit(np.arange(1000, 1030, dtype=np.uint16), "val")
    epoch = BatchPlan(train_split, val_split, 8, 2, 1, 1, 0, seed=0, sampling="epoch")
    batches = epoch.eval_batches("train", count=7, batch_size=2)
    starts = [int(x[row, 0]) for x, _ in batches for row in range(2)]
    assert starts == [(i % 12) * 8 for i in range(14)]  # 12 windows of 8 (+1 target) in 100 tokens
    x, y = batches[0]
    assert torch.equal(y, x + 1)
    assert [int(x[0, 0]) for x, _ in epoch.eval_batches("val", 2, 1)] == [1000, 1008]
    random = BatchPlan(train_split, val_split, 8, 2, 1, 1, 0, seed=0, sampling="random")
    starts = [int(x[row, 0]) for x, _ in random.eval_batches("train", 7, 2) for row in range(2)]
    assert any(s % 8 for s in starts) and starts == [int(x[row, 0]) for x, _ in
                                                     random.eval_batches("train", 7, 2) for row in range(2)]
