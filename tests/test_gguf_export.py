"""The GGUF writer: what `gguf.GGUFReader` reads back is the model's weights and llama.cpp's gpt2 metadata.

The llama.cpp test at the end runs only where `llama-cpp-python` is installed (never in CI).
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF writer needs the optional gguf package (in the dev extra)")

from fastgpt.config import GPTConfig  # noqa: E402
from fastgpt.errors import FastGPTError  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.weights.gguf_export import gguf_tensors, write_gguf  # noqa: E402

TINY = GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=2, n_embd=64)


def _model(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def _read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _field(reader, key):
    return reader.fields[key].contents()


def _values(tensor):
    """A tensor read back as float32 in numpy's (rows, cols) order."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


def test_f32_round_trip_is_exact_with_gpt2_names_shapes_and_metadata(tmp_path):
    model = _model()
    reader, tensors = _read(write_gguf(model, tmp_path / "m.gguf", "f32"))
    expected = gguf_tensors(model)
    arch = gguf.MODEL_ARCH.GPT2
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for name in tensors:  # every name is one llama.cpp's gpt2 architecture knows
        assert name.rsplit(".", 1)[0].replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.") in allowed
    assert set(tensors) == set(expected) and "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    assert len(tensors) == 4 + 12 * TINY.n_layer
    assert tensors["token_embd.weight"].shape.tolist() == [64, 50257]  # ggml order (ne0 = in)
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, 192]
    assert tensors["blk.1.ffn_down.weight"].shape.tolist() == [256, 64]
    for name, tensor in tensors.items():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(_values(tensor), expected[name].numpy(), err_msg=name)
    assert np.array_equal(_values(tensors["blk.0.attn_qkv.weight"]), model.blocks[0].attn.qkv.weight.detach().numpy())
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "general.file_type") == 0
    assert [_field(reader, f"gpt2.{k}") for k in ("context_length", "embedding_length", "feed_forward_length",
                                                  "block_count", "attention.head_count")] == [32, 64, 256, 2, 2]
    assert _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[262] == "\u0120the"
    assert _field(reader, "tokenizer.ggml.token_type")[50256] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.merges")[0] == "\u0120 t"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == _field(reader, "tokenizer.ggml.bos_token_id") == 50256


@pytest.mark.parametrize("qtype, ggml_type, file_type, tolerance",
                         [("f16", "F16", 1, 1e-3), ("q8_0", "Q8_0", 7, 1 / 127)])
def test_f16_and_q8_0_matrices_are_close_and_small_tensors_stay_f32(tmp_path, qtype, ggml_type, file_type, tolerance):
    model = _model()  # no tokenizer: the f32 test checks it, and GGUFReader takes seconds over 100k strings
    reader, tensors = _read(write_gguf(model, tmp_path / "m.gguf", qtype, ids_only=True))
    assert _field(reader, "general.file_type") == file_type
    for name, want in gguf_tensors(model).items():
        tensor, want = tensors[name], want.numpy()
        if want.ndim == 1 or name == "position_embd.weight":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(_values(tensor), want)
            continue
        assert tensor.tensor_type.name == ggml_type, name
        got = _values(tensor)
        # f16: relative rounding; q8_0: at most half a step of each 32-block's absmax / 127
        assert np.abs(got - want).max() <= tolerance * np.abs(want).max(), name
        assert not np.array_equal(got, want), name


def test_untied_head_q8_fallback_and_ids_only_vocabulary(tmp_path):
    cfg = GPTConfig(vocab_size=300, context_length=16, n_layer=1, n_head=2, n_embd=48, tie_embeddings=False)
    model = _model(cfg)
    reader, tensors = _read(write_gguf(model, tmp_path / "m.gguf", "q8_0", ids_only=True))
    np.testing.assert_allclose(_values(tensors["output.weight"]), model.lm_head.weight.detach()[:300].numpy(),
                               atol=1e-3)
    # 48-wide rows are no multiple of q8_0's 32-value blocks: f16, as llama.cpp's converter falls back
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert _field(reader, "tokenizer.ggml.model") == "none" and _field(reader, "gpt2.vocab_size") == 300
    assert "tokenizer.ggml.tokens" not in reader.fields


def test_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(FastGPTError, match="qtype 'q4_0'"):
        write_gguf(_model(), tmp_path / "m.gguf", "q4_0")
    small = _model(GPTConfig(vocab_size=300, context_length=16, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(FastGPTError, match="tokenizer has 50257 tokens but the model's vocab_size is 300"):
        write_gguf(small, tmp_path / "m.gguf", "f32")
    from fastgpt.quantize import quantize
    with pytest.raises(FastGPTError, match="write_gguf: model"):
        write_gguf(quantize(_model(), "int8"), tmp_path / "m.gguf", "f32")


def test_llama_cpp_greedy_tokens_equal_fastgpt_fp32(tmp_path):
    """llama.cpp on the written file decodes the same greedy tokens as fastgpt in fp32. An untied
    head, so that a random model does not just repeat its last token (a tied random head does)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (not a CI dependency)")
    from fastgpt.bench.llamacpp import LlamaCppGreedy
    from fastgpt.generate import generate

    cfg = GPTConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=4, n_embd=128, tie_embeddings=False)
    model = _model(cfg, seed=1)
    prompt, new = [464, 2068, 7586, 21831, 18045], 24
    ours = generate(model, [prompt], new, temperature=0, eos_id=None).tokens[0]
    assert len(set(ours)) > new // 2  # a real sequence, not one token repeated
    # f32 must agree throughout; f16 and q8_0 round the weights, so only a first stretch must
    for qtype, at_least in (("f32", new), ("f16", 12), ("q8_0", 8)):
        runner = LlamaCppGreedy(write_gguf(model, tmp_path / f"m-{qtype}.gguf", qtype), n_ctx=64, threads=1)
        theirs = runner.generate(prompt, new).tokens
        runner.close()
        assert len(theirs) == new and theirs[:at_least] == ours[:at_least], qtype
    runner = LlamaCppGreedy(tmp_path / "m-f32.gguf", n_ctx=64, threads=1)
    with pytest.raises(FastGPTError, match="exceed n_ctx 64"):
        runner.generate(prompt, 60)
    runner.close()


def test_convert_writes_a_book_checkpoint_as_gguf(tmp_path, capsys):
    from test_book_weights import book_model

    from fastgpt.cli import main
    from fastgpt.weights.book import build_book
    book = book_model()  # vocabulary 97: no tokenizer fits, so the file is ids-only
    torch.save(book.state_dict(), tmp_path / "model.pth")
    assert main(["convert", str(tmp_path / "model.pth"), "--out", str(tmp_path / "g"), "--n-head", "4",
                 "--format", "gguf-f16"]) == 0
    out = capsys.readouterr().out
    assert "no tokenizer" in out and "GPTModel" in out
    reader, tensors = _read(tmp_path / "g" / "model-f16.gguf")
    ours = gguf_tensors(build_book(tmp_path / "model.pth", n_head=4)[0])
    assert set(tensors) == set(ours) and _field(reader, "general.file_type") == 1
    np.testing.assert_allclose(_values(tensors["blk.1.ffn_down.weight"]), ours["blk.1.ffn_down.weight"].numpy(),
                               atol=1e-3)


def test_llama_cpp_reads_gpt2_tokenizer_as_gpt2_encodes(tmp_path):
    """The written vocabulary and merges make llama.cpp tokenize text exactly as GPT-2 (tiktoken) does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (not a CI dependency)")
    from fastgpt.tokenizer import Tokenizer

    path = write_gguf(_model(GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=1, n_embd=32)),
                      tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=16, verbose=False)
    gpt2 = Tokenizer()
    for text in ["Hello world, it's 2026!", " The quick brown fox\n\njumps<|endoftext|>", "naïve café 😀   spaces"]:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == gpt2.encode(text)
        assert llm.detokenize(ids, special=True).decode() == text
    llm.close()
