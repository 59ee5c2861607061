"""Weight interop: Hugging Face, OpenAI TensorFlow and fastgpt directories in and out.

The reference for "loaded correctly" is `transformers.GPT2LMHeadModel` itself: the
logits of fastgpt's model, loaded from each layout, must match its logits.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tf_checkpoint import openai_variables, write_openai_release

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.weights import load_fastgpt, load_pretrained, save_fastgpt, save_pretrained
from fastgpt.weights.crc32c import crc32c
from fastgpt.weights.sstable import read_table, write_table
from fastgpt.weights.tensor_bundle import read_bundle, write_bundle

transformers = pytest.importorskip("transformers")

# Two programs computing fp32 logits from the same weights differ only in summation order:
# observed at most 4 ulps (fp32 eps) of the largest logit (1.2e-6 at logits up to 2.5).
FP32_LOGIT_ULPS = 16


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol = FP32_LOGIT_ULPS * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def make_hf_model(**config):
    """A random GPT2LMHeadModel; LayerNorm and bias parameters are randomised too, so none is trivially 0 or 1."""
    cfg = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_pytorch_bin(directory: Path, hf_model) -> Path:
    """An old-style Hub directory: pytorch_model.bin without the `transformer.` prefix, with mask buffers."""
    directory.mkdir(parents=True)
    hf_model.config.save_pretrained(directory)
    n = hf_model.config.n_positions
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    torch.save(state, directory / "pytorch_model.bin")
    return directory


class Reference:
    """An HF model, a few tokens, its logits, and its weights written in each layout (lazily)."""

    def __init__(self, name: str, root: Path):
        self.hf = make_hf_model(**CONFIGS[name])
        self.idx = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 8))
        with torch.no_grad():
            self.logits = self.hf(self.idx).logits
        self.root, self._dirs = root, {}

    def directory(self, layout: str) -> Path:
        if layout not in self._dirs:
            path = self.root / layout
            if layout == "safetensors":
                self.hf.save_pretrained(path)
                assert (path / "model.safetensors").is_file()
            elif layout == "bin":
                write_pytorch_bin(path, self.hf)
            else:
                write_openai_release(path, self.hf)
            self._dirs[layout] = path
        return self._dirs[layout]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name: str) -> Reference:
        if name not in cache:
            torch.manual_seed(1234)
            cache[name] = Reference(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


def logits(model, idx):
    with torch.no_grad(), ops.use_backend("torch"):
        return model(idx)


@pytest.mark.parametrize("layout", ["safetensors", "bin", "openai_tf"])
@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_logits_match_transformers(references, name, layout):
    ref = references(name)
    model = load_pretrained(ref.directory(layout))
    assert not model.training
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.config.n_layer == CONFIGS[name]["n_layer"]
    assert model.config.context_length == CONFIGS[name]["n_positions"]
    # GPT-2's Conv1D matrices are stored transposed: loaded, they are the model's own contiguous (out, in)
    assert all(p.is_contiguous() for p in model.parameters())
    assert_same_logits(logits(model, ref.idx), ref.logits)


def test_save_pretrained_loads_in_transformers(references, tmp_path):
    ref = references("tiny")
    ours = load_pretrained(ref.directory("safetensors"))
    save_pretrained(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    # the same weights, bit for bit, including the tied head
    original = ref.hf.state_dict()
    for key, tensor in back.state_dict().items():
        if not key.endswith((".attn.bias", ".attn.masked_bias")):
            assert torch.equal(tensor, original[key]), key
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        hf_logits = back(ref.idx).logits
    torch.testing.assert_close(hf_logits, ref.logits, atol=0, rtol=0)
    assert_same_logits(logits(ours, ref.idx), hf_logits)


def test_fastgpt_directory_roundtrip_keeps_metadata(tmp_path):
    model = GPT("tiny")
    metadata = {"labels": {"ham": 0, "spam": 1}, "prompt_template": "alpaca", "step": 12}
    save_fastgpt(model, tmp_path / "ckpt", metadata=metadata)
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"trainer state")  # other files in the directory stay
    save_fastgpt(model, tmp_path / "ckpt", metadata=metadata)
    assert (tmp_path / "ckpt" / "optimizer.pt").read_bytes() == b"trainer state"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                      "optimizer.pt"]
    from safetensors import safe_open
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "tok_emb.weight" in f.keys()  # tied matrix stored once
    loaded, meta = load_fastgpt(tmp_path / "ckpt")
    assert meta == metadata and loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(FastGPTError, match="JSON"):
        save_fastgpt(model, tmp_path / "bad", metadata={"x": object()})


def untied_model() -> GPT:
    """A small model with its own LM head (the book's ch. 5 model: PyTorch's default initialisation)."""
    from fastgpt.config import GPTConfig
    torch.manual_seed(7)
    return GPT(GPTConfig(vocab_size=101, context_length=32, n_layer=2, n_head=4, n_embd=32,
                         tie_embeddings=False, init="pytorch")).eval()


def test_untied_model_roundtrips_in_fastgpt_format(tmp_path):
    from safetensors import safe_open
    model = untied_model()
    save_fastgpt(model, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert {"lm_head.weight", "tok_emb.weight"} <= set(f.keys())
    loaded, _ = load_fastgpt(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.tied
    idx = torch.randint(0, 101, (2, 8))
    assert torch.equal(logits(loaded, idx), logits(model, idx))
    # an untied config whose file lacks the head is refused, not filled with random numbers
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(FastGPTError, match="missing tensor 'lm_head.weight'"):
        load_fastgpt(tmp_path / "ckpt")


def test_untied_model_exports_to_transformers(tmp_path):
    model = untied_model()
    save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert back.lm_head.weight.data_ptr() != back.transformer.wte.weight.data_ptr()
    assert torch.equal(back.lm_head.weight, model.lm_head.weight[:model.config.vocab_size])  # the real rows
    idx = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        hf_logits = back(idx).logits
    assert_same_logits(logits(model, idx), hf_logits)
    again = load_pretrained(tmp_path / "hf")  # and fastgpt reads the untied directory back
    assert not again.tied and torch.equal(logits(again, idx), logits(model, idx))
    edit_json(tmp_path / "hf" / "config.json", tie_word_embeddings=True)
    with pytest.raises(FastGPTError, match="differs from the token embedding, but config.json ties them"):
        load_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file
    edit_json(tmp_path / "hf" / "config.json", tie_word_embeddings=False)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(FastGPTError, match="missing tensor 'lm_head.weight'"):
        load_pretrained(tmp_path / "hf")


def test_dtype_and_device(references):
    model = load_pretrained(references("tiny").directory("safetensors"), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu")


def test_sharded_safetensors(references, tmp_path):
    from safetensors.torch import save_file
    ref = references("tiny")
    state = {k: v.contiguous() for k, v in ref.hf.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ref.hf.config.save_pretrained(tmp_path)
    assert_same_logits(logits(load_pretrained(tmp_path), ref.idx), ref.logits)


# ---------------------------------------------------------------- bad input: one clear line each
def copy_of(references, layout, tmp_path) -> Path:
    return Path(shutil.copytree(references("tiny").directory(layout), tmp_path / layout))


def edit_json(path: Path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_missing_and_unknown_directories(tmp_path):
    with pytest.raises(FastGPTError, match="no such model directory"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FastGPTError, match="expected a model directory"):
        load_pretrained(tmp_path / "file")
    with pytest.raises(FastGPTError, match="no config.json or hparams.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(FastGPTError, match="unknown config format"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FastGPTError, match="model_type 'llama' is not supported"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1,
                                                      "n_head": 2, "n_positions": 8, "vocab_size": 10}))
    with pytest.raises(FastGPTError, match="no weights file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(FastGPTError, match="invalid JSON"):
        load_pretrained(tmp_path)


def test_truncated_safetensors(references, tmp_path):
    d = copy_of(references, "safetensors", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(FastGPTError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(d)


def test_missing_key_is_named(references, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_of(references, "safetensors", tmp_path)
    state = load_file(d / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FastGPTError, match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        load_pretrained(d)


def test_shape_mismatch_names_key_and_shapes(references, tmp_path):
    d = copy_of(references, "safetensors", tmp_path)
    edit_json(d / "config.json", n_positions=64, n_ctx=64)
    with pytest.raises(FastGPTError, match=r"'transformer\.wpe\.weight' has shape \(32, 32\), but the config "
                                           r"needs \(64, 32\)"):
        load_pretrained(d)


def test_unexpected_untied_and_unsupported(references, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_of(references, "safetensors", tmp_path)
    state = load_file(d / "model.safetensors")
    save_file({**state, "score.weight": torch.zeros(2, 32)}, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FastGPTError, match="unexpected tensor 'score.weight'"):
        load_pretrained(d)
    save_file({**state, "lm_head.weight": torch.randn(101, 32)}, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FastGPTError, match="untied head"):
        load_pretrained(d)
    edit_json(d / "config.json", activation_function="relu")
    with pytest.raises(FastGPTError, match="activation_function='relu' is not supported"):
        load_pretrained(d)
    edit_json(d / "config.json", activation_function="gelu_new", n_layer="2")
    with pytest.raises(FastGPTError, match="'n_layer' must be an integer"):
        load_pretrained(d)


def test_corrupt_pytorch_bin(references, tmp_path):
    d = copy_of(references, "bin", tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(FastGPTError, match=r"pytorch_model\.bin: not a loadable PyTorch weights file"):
        load_pretrained(d)


def test_openai_checkpoint_corruption_is_detected(references, tmp_path):
    d = copy_of(references, "openai_tf", tmp_path)
    data_file = d / "model.ckpt.data-00000-of-00001"
    original = data_file.read_bytes()
    flipped = bytearray(original)
    flipped[100] ^= 0x01  # one flipped bit in a weight
    data_file.write_bytes(bytes(flipped))
    with pytest.raises(FastGPTError, match="checksum mismatch in variable"):
        load_pretrained(d)
    data_file.write_bytes(original[:-10])
    with pytest.raises(FastGPTError, match="truncated"):
        load_pretrained(d)
    index = bytearray((d / "model.ckpt.index").read_bytes())
    index[10] ^= 0x01
    (d / "model.ckpt.index").write_bytes(bytes(index))
    with pytest.raises(FastGPTError, match=r"model\.ckpt\.index: not a valid table file \(checksum mismatch"):
        load_pretrained(d)


def test_openai_hparams_mismatch_is_detected(references, tmp_path):
    d = copy_of(references, "openai_tf", tmp_path)
    edit_json(d / "hparams.json", n_embd=64)
    with pytest.raises(FastGPTError, match=r"'model/wte' has shape \(101, 32\), but the config needs \(101, 64\)"):
        load_pretrained(d)
    edit_json(d / "hparams.json", n_embd=32, n_layer=3)
    with pytest.raises(FastGPTError, match="missing tensor 'model/h2/ln_1/g'"):
        load_pretrained(d)
    edit_json(d / "hparams.json", n_layer=1)
    with pytest.raises(FastGPTError, match="unexpected variable 'model/h1/"):
        load_pretrained(d)
    edit_json(d / "hparams.json", n_layer=2)
    del_key = json.loads((d / "hparams.json").read_text())
    del del_key["n_vocab"]
    (d / "hparams.json").write_text(json.dumps(del_key))
    with pytest.raises(FastGPTError, match="hparams.json: missing key 'n_vocab'"):
        load_pretrained(d)


def test_openai_checkpoint_with_optimizer_state_loads(references, tmp_path):
    """Fine-tuning scripts save Adam slots and a step counter beside the weights; they are skipped."""
    ref = references("tiny")
    variables = openai_variables(ref.hf.state_dict())
    extra = {f"{k}/Adam": torch.zeros_like(v) for k, v in list(variables.items())[:3]}
    extra["global_step"] = torch.tensor(7, dtype=torch.int64)
    d = copy_of(references, "openai_tf", tmp_path)
    write_bundle(d / "model.ckpt", {**variables, **extra})
    (d / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt"\n')  # absolute, other machine
    assert_same_logits(logits(load_pretrained(d), ref.idx), ref.logits)


# ---------------------------------------------------------------- the TensorFlow format pieces
def test_crc32c_known_values_and_parallel_path():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) test vector: 32 zero bytes
    assert crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720: 32 ascending bytes
    data = torch.randint(0, 256, (300_001,), dtype=torch.uint8).numpy().tobytes()  # long: the parallel path
    assert crc32c(data) == crc32c(data[123_457:], crc32c(data[:123_457]))
    assert crc32c(data) == crc32c(data[2:], crc32c(data[:2]))


def test_sstable_roundtrip_many_blocks(tmp_path):
    entries = [(b""), *(f"model/h{i}/attn/c_attn/w{j}".encode() for i in range(40) for j in range(5))]
    entries = sorted((k, bytes([len(k)]) * (i % 7)) for i, k in enumerate(entries))
    write_table(tmp_path / "t.index", entries, block_size=256)
    assert read_table(tmp_path / "t.index") == entries
    with pytest.raises(ValueError, match="sorted"):
        write_table(tmp_path / "u.index", list(reversed(entries)))


def test_tensor_bundle_roundtrip_dtypes(tmp_path):
    tensors = {"a/w": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.zeros(0, 3), "s": torch.tensor(1.5)}
    write_bundle(tmp_path / "m.ckpt", tensors)
    back = read_bundle(tmp_path / "m.ckpt")
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_tensor_bundle_matches_tensorflow(tmp_path):
    """Independent check of the reader and the writer against TensorFlow itself (skipped without it)."""
    tf = pytest.importorskip("tensorflow")
    import numpy as np
    rng = np.random.default_rng(0)
    theirs = {"model/wte": rng.standard_normal((50, 8)).astype(np.float32),
              "model/h0/attn/c_attn/w": rng.standard_normal((1, 8, 24)).astype(np.float32),
              "half": rng.standard_normal((3,)).astype(np.float16), "step": np.array(3, np.int64)}
    theirs.update({f"many/{i:03d}": rng.standard_normal((i % 4 + 1,)).astype(np.float32) for i in range(100)})
    names = list(theirs)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "tf" / "model.ckpt"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[theirs[n] for n in names])
    read = read_bundle(tmp_path / "tf" / "model.ckpt")
    assert sorted(read) == sorted(names)
    for name in names:
        assert np.array_equal(read[name].numpy(), theirs[name]), name
    write_bundle(tmp_path / "ours.ckpt", {n: torch.from_numpy(v) for n, v in theirs.items()})
    reader = tf.train.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(names)
    for name in names:
        assert np.array_equal(reader.get_tensor(name), theirs[name]), name


# ---------------------------------------------------------------- the generate command on a saved model
def test_generate_cli_runs_on_saved_model(tmp_path, capsys):
    if not (REPO / "fastgpt" / "cli" / "generate.py").is_file():
        pytest.skip("fastgpt generate is not there yet")
    from fastgpt.cli import main
    torch.manual_seed(0)
    save_pretrained(GPT("tiny"), tmp_path / "hf")
    code = main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "5",
                 "--device", "cpu", "--seed", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")


def test_snappy_blocks_decode():
    """Table blocks may be Snappy-compressed; streams built by hand from the format description."""
    from fastgpt.weights.sstable import snappy_decompress
    # literal "abc", then copy offset 3 length 9 (overlapping: the pattern repeats), 1-byte-offset form
    stream = bytes([12, 2 << 2]) + b"abc" + bytes([((9 - 4) << 2) | 1, 3])
    assert snappy_decompress(stream) == b"abc" * 4
    # a 70-byte literal (length in an extra byte) then a 2-byte-offset copy of its first 20 bytes
    text = bytes(range(70))
    stream = bytes([90, 60 << 2, 69]) + text + bytes([(19 << 2) | 2, 70, 0])
    assert snappy_decompress(stream) == text + text[:20]
    with pytest.raises(ValueError, match="copy before the start"):
        snappy_decompress(bytes([4, (0 << 2) | 1, 9]))
