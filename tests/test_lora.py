"""LoRA: a zero-initialised B changes nothing, merging equals the adapted model, adapter files round-trip."""
import pytest
import torch

from fastgpt.errors import FastGPTError
from fastgpt.finetune.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_layers,
    merge_lora,
    save_adapters,
    trainable_summary,
)
from fastgpt.model import GPT


def _tiny():
    torch.manual_seed(0)
    return GPT("tiny").eval()


def _train_a_few_steps(model, steps=5):
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(idx, idx.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return idx, losses


def test_zero_b_leaves_outputs_unchanged_and_freezes_base():
    model = _tiny()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        before = model(idx)
    apply_lora(model, rank=4, alpha=8, targets=("qkv", "proj", "fc"))
    layers = lora_layers(model)
    assert len(layers) == 4 * model.config.n_layer  # "proj" names both attn.proj and mlp.proj
    with torch.no_grad():
        assert torch.equal(model(idx), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # rank * (in + out) per adapted matrix
    C = model.config.n_embd
    per_layer = 4 * (C + 3 * C) + 4 * (C + C) + 4 * (C + 4 * C) + 4 * (4 * C + C)
    assert count_parameters(model)[0] == per_layer * model.config.n_layer
    assert trainable_summary(model).startswith(f"trainable: {per_layer * model.config.n_layer:,} / ")


def test_lora_linear_is_the_written_out_formula_with_rank_other_than_alpha():
    """y = x W^T + b + (alpha / r) x A^T B^T, with r = 4 and alpha = 2 (so alpha / r = 0.5 and r / alpha = 2
    differ), for the layer, its bias-free matmul and the merged weight W + (alpha / r) B A."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    rank, alpha = 4, 2.0
    layer = LoRALinear(base, rank, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero: give it values, or the update would vanish
    x = torch.randn(3, 6, dtype=torch.float64)
    W, b = base.weight.detach().double(), base.bias.detach().double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    expected = x @ W.T + b + (alpha / rank) * (x @ A.T @ B.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.matmul_no_bias(x.float()).double(), expected - b, rtol=1e-5, atol=1e-5)
        merged = layer.merged_linear()
        torch.testing.assert_close(merged.weight.double(), W + (alpha / rank) * (B @ A), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x @ W.T + b + (rank / alpha) * (x @ A.T @ B.T), expected)  # the scale matters


def test_training_moves_only_adapters_and_merge_matches():
    model = _tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx_before = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        base_output = model(idx_before)
    apply_lora(model, rank=4, alpha=8)
    idx, losses = _train_a_few_steps(model)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base[n]), n  # the base stays frozen
    model.eval()
    with torch.no_grad():
        adapted = model(idx)
        merge_lora(model)
        merged = model(idx)
    assert not lora_layers(model)
    with torch.no_grad():
        assert not torch.allclose(model(idx_before), base_output, atol=1e-3)  # trained away from the base model
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert set(model.state_dict()) == set(GPT("tiny").state_dict())  # plain GPT names again


def test_adapter_on_fc_reaches_the_fused_bias_gelu_path():
    model = _tiny()
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        before = model(idx)
        apply_lora(model, rank=2, alpha=2, targets=("fc",))
        for layer in lora_layers(model).values():
            layer.lora_B.fill_(0.05)
        assert not torch.allclose(model(idx), before)


def test_adapters_save_load_round_trip(tmp_path):
    model = _tiny()
    apply_lora(model, rank=4, alpha=8, targets=("qkv", "fc"))
    idx, _ = _train_a_few_steps(model, steps=2)
    model.eval()
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert all(".lora_" in k for k in f.keys())  # adapters only, no base weights
    fresh = _tiny()
    load_adapters(fresh, path)  # applies LoRA with the saved config
    assert all(isinstance(m, LoRALinear) for m in lora_layers(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx))


def test_bad_adapter_input(tmp_path):
    with pytest.raises(FastGPTError, match="no linear layer"):
        apply_lora(_tiny(), targets=("nope",))
    with pytest.raises(FastGPTError, match="no LoRA layers"):
        save_adapters(_tiny(), tmp_path / "a.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FastGPTError, match="bad.safetensors"):
        load_adapters(_tiny(), bad)
