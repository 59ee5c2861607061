"""A fastgpt GPT -> a GGUF file of llama.cpp's "gpt2" architecture, in f32, f16 or q8_0.

Why: to run llama.cpp on exactly the weights fastgpt runs (`fastgpt bench generate --llama-cpp`)
and to hand a fastgpt model to llama.cpp's tools. Written with ggml-org's `gguf` package, an
optional dependency (pip install gguf).

Layout: llama.cpp's gpt2 loader wants every matrix as ggml ne = (in, out), which in numpy's
row-major order is (out, in): nn.Linear's own layout. fastgpt's fused qkv is [q; k; v] stacked
like GPT-2's c_attn, so no tensor is transposed or reordered. As llama.cpp's own converter does,
1-D tensors (LayerNorms, biases) and the position embedding stay f32, a q8_0 matrix whose rows
are not a multiple of 32 falls back to f16, and a tied LM head is not written (llama.cpp reuses
token_embd).

Vocabulary: a GGUF carries its tokenizer. By default it is GPT-2's (the model's vocab_size must
be 50257), or pass the model's own `BPETokenizer`. `ids_only=True` writes no tokenizer at all
(tokenizer.ggml.model "none"): llama.cpp then evaluates token ids but cannot turn text into ids;
that is what a benchmark on random weights with a made-up vocabulary size needs, and nothing
pretends to be a vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import FastGPTError
from .state import file_state

# the types a GGUF matrix can be written in (llama.cpp: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0)
GGUF_TYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32  # q8_0 stores blocks of 32 int8 values with one f16 scale: 34 bytes
BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
ARCH = "gpt2"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FastGPTError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp gpt2 tensor name -> float32 CPU tensor, in llama.cpp's layout (see the module docstring)."""
    state = file_state(model)  # as every file holds it: vocab_size rows, no pad rows
    if "tok_emb.weight" not in state or any(not t.is_floating_point() for t in state.values()):
        raise FastGPTError("write_gguf: model must be an unquantized fastgpt GPT (float weights)")
    top = {"token_embd.weight": "tok_emb.weight", "position_embd.weight": "pos_emb.weight",
           "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias"}
    block = {"attn_norm": "ln_1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj", "ffn_norm": "ln_2",
             "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
    names = dict(top)
    if not model.tied:
        names["output.weight"] = "lm_head.weight"
    for i in range(model.config.n_layer):
        for ours_gguf, ours in block.items():
            for part in ("weight", "bias"):
                names[f"blk.{i}.{ours_gguf}.{part}"] = f"blocks.{i}.{ours}.{part}"
    missing = [ours for ours in names.values() if ours not in state]
    if missing:
        raise FastGPTError(f"write_gguf: model has no tensor {missing[0]!r} (quantized, adapted or streamed? "
                           "write a plain fastgpt GPT)")
    return {name: state[ours].to(torch.float32) for name, ours in names.items()}


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type one tensor is written in: `qtype` for matrices, f32 for vectors and the position
    embedding, f16 for a q8_0 matrix whose rows do not split into q8_0's 32-value blocks."""
    if len(shape) == 1 or name == "position_embd.weight" or qtype == "f32":
        return "f32"
    if qtype == "q8_0" and shape[-1] % Q8_0_BLOCK:
        return "f16"
    return qtype


def weight_bytes_per_token(model, qtype: str) -> int:
    """Bytes of the GGUF weights one llama.cpp decode step reads: every matrix and vector once,
    one row of each embedding, and the whole token embedding again as a tied LM head."""
    total = 0
    for name, tensor in gguf_tensors(model).items():
        rows, cols = (tensor.shape[0], tensor.shape[1]) if tensor.dim() == 2 else (1, tensor.shape[0])
        if name in ("token_embd.weight", "position_embd.weight"):
            rows = 1 + (tensor.shape[0] if name == "token_embd.weight" and model.tied else 0)
        total += int(rows * cols * BYTES_PER_VALUE[tensor_type(name, tuple(tensor.shape), qtype)])
    return total


def write_gguf(model, path: str | Path, qtype: str = "f32", tokenizer=None, ids_only: bool = False,
               name: str = "fastgpt") -> Path:
    """Write `model` (a fastgpt GPT) to the GGUF file `path` with its matrices in `qtype`
    ("f32", "f16" or "q8_0"); `tokenizer`: a fastgpt BPETokenizer (default GPT-2's);
    `ids_only`: no tokenizer (see the module docstring). Returns the path."""
    gguf = _gguf()
    if qtype not in GGUF_TYPES:
        raise FastGPTError(f"write_gguf: qtype {qtype!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = model.config
    tensors = gguf_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)
    writer.add_file_type(int(file_type))
    if ids_only:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(cfg.vocab_size)
    else:
        _add_tokenizer(writer, gguf, tokenizer, cfg.vocab_size)
    for tensor_name, tensor in tensors.items():
        data, kind = tensor.numpy(), tensor_type(tensor_name, tuple(tensor.shape), qtype)
        if kind == "f32":
            writer.add_tensor(tensor_name, data)
        elif kind == "f16":
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, types.Q8_0), raw_dtype=types.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE as llama.cpp's "gpt2" tokenizer: tokens and merges in GPT-2's printable
    byte form, <|endoftext|> (and any other special token) as a control token and as bos/eos.
    Ids past the tokenizer's last one (a padded embedding) become unused [PAD<id>] tokens, as
    llama.cpp's converter writes them."""
    from ..bpe import BPETokenizer
    from ..gpt2_vocab import ENDOFTEXT, GPT2_SPLIT_PATTERN, bytes_to_unicode

    if tokenizer is None:
        tokenizer = BPETokenizer.from_gpt2_files()
    if not isinstance(tokenizer, BPETokenizer):
        raise FastGPTError(f"write_gguf: tokenizer must be a fastgpt BPETokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > vocab_size:
        raise FastGPTError(f"write_gguf: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                           f"{vocab_size} (pass the model's own tokenizer, or ids_only=True)")
    if tokenizer.pattern != GPT2_SPLIT_PATTERN:
        raise FastGPTError("write_gguf: tokenizer's pre-tokenization pattern is not GPT-2's, which is the only one "
                           "written as llama.cpp's 'gpt-2' pre-tokenizer")
    table = bytes_to_unicode()
    show = lambda raw: "".join(table[b] for b in raw)  # noqa: E731
    types = gguf.TokenType
    tokens, kinds = [f"[PAD{i}]" for i in range(vocab_size)], [types.UNUSED] * vocab_size
    for i, raw in tokenizer.vocab.items():
        tokens[i], kinds[i] = show(raw), types.NORMAL
    for text, i in tokenizer.special_tokens.items():
        tokens[i], kinds[i] = text, types.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges([f"{show(tokenizer.vocab[a])} {show(tokenizer.vocab[b])}" for a, b in tokenizer.merges])
    eot = tokenizer.special_tokens.get(ENDOFTEXT)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)
