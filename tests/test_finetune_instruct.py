"""Instruction fine-tuning: templates, records and their errors, collate targets, scoring, a short training run."""
import json
import sys

import pytest
import torch
from conftest import shared_file

from fastgpt.errors import FastGPTError
from fastgpt.finetune.instruct import (
    EncodedExample,
    collate,
    command_judge,
    exact_match,
    finetune_instruct,
    lcs_length,
    load_records,
    rouge_l_f1,
    score_responses,
    split_in_order,
)
from fastgpt.finetune.templates import extract_response, format_prompt

EOT, IGN = 50256, -100


# ---------------------------------------------------------------------- templates
def test_alpaca_template_with_and_without_input():
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    assert format_prompt("alpaca", "Add 2 and 3.", "") == (
        f"{preamble}\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert format_prompt("alpaca", "Translate.", "Bonjour") == (
        f"{preamble}\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    assert format_prompt("phi3", "Translate.", "Bonjour") == "<|user|>\nTranslate.\nBonjour\n<|assistant|>\n"
    with pytest.raises(FastGPTError, match="unknown template 'nope'"):
        format_prompt("nope", "x")


def test_extract_response():
    prompt = format_prompt("alpaca", "Say hi.")
    assert extract_response("alpaca", prompt + " Hi there! \n\n### Instruction:\nmore") == "Hi there!"
    assert extract_response("alpaca", "Hello.<|endoftext|>junk", prompt="") == "Hello."
    assert extract_response("phi3", "<|user|>\nq\n<|assistant|>\nAnswer\n<|user|>\nnext") == "Answer"


# ---------------------------------------------------------------------- records
def test_records_json_and_jsonl_and_split(tmp_path):
    records = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(20)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"instruction": r["instruction"], "output": r["output"]})
                                                for r in records))
    assert load_records(tmp_path / "d.json") == records
    assert load_records(tmp_path / "d.jsonl") == records  # a missing input means empty
    train, val, test = split_in_order(records)
    assert (len(train), len(val), len(test)) == (17, 2, 1) and train[0]["instruction"] == "i0"


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}]',
     r"missing.json: record 1: missing field 'output'"),
    ("type.json", '[{"instruction": "a", "output": 3}]', r"type.json: record 0: field 'output' must be a string"),
    ("obj.json", '{"instruction": "a"}', r"obj.json: expected a JSON list"),
    ("syntax.json", '[{"instruction": "a",\n "output": }]', r"syntax.json:2: invalid JSON"),
    ("empty.json", "", r"empty.json: file is empty"),
    ("none.json", "[]", r"none.json: no records"),
    ("lines.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n',
     r"lines.jsonl:2: missing field 'instruction'"),
    ("bytes.json", b'[{"instruction": "\xe9", "output": "b"}]', r"bytes.json:1: not valid UTF-8"),
])
def test_bad_records_name_file_record_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FastGPTError, match=message):
        load_records(path)


# ---------------------------------------------------------------------- collate
def test_collate_ragged_batch_exact_rows():
    batch = [EncodedExample([1, 2, 3, 4, 5], prompt_length=3), EncodedExample([6, 7], prompt_length=1),
             EncodedExample([8, 9, 10], prompt_length=2)]
    x, y = collate(batch)
    assert x.tolist() == [[1, 2, 3, 4, 5, EOT],
                          [6, 7, EOT, EOT, EOT, EOT],
                          [8, 9, 10, EOT, EOT, EOT]]
    # targets: shifted by one; the first end-of-text kept, every later pad ignored
    assert y.tolist() == [[2, 3, 4, 5, EOT, IGN],
                          [7, EOT, IGN, IGN, IGN, IGN],
                          [9, 10, EOT, IGN, IGN, IGN]]


def test_collate_prompt_masking_and_truncation():
    batch = [EncodedExample([1, 2, 3, 4, 5], prompt_length=3), EncodedExample([6, 7], prompt_length=1)]
    _, y = collate(batch, mask_prompt=True)
    assert y.tolist() == [[IGN, IGN, 4, 5, EOT, IGN],    # targets 2 and 3 are prompt tokens
                          [7, EOT, IGN, IGN, IGN, IGN]]  # a one-token prompt masks no target
    x, y = collate(batch, max_length=4)
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, EOT, EOT]]
    assert y.tolist() == [[2, 3, 4, 5], [7, EOT, IGN, IGN]]


# ---------------------------------------------------------------------- scoring
def test_rouge_l_and_exact_match():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    assert rouge_l_f1("The cat sat", "the cat sat") == 1.0
    p, r = 4 / 6, 4 / 5  # LCS "the cat on mat" of 6 candidate and 5 reference words
    assert rouge_l_f1("the cat sat on the mat", "the cat lay on mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l_f1("", "x") == 0.0 and rouge_l_f1("x", "y") == 0.0
    assert exact_match(" Paris ", "paris") and not exact_match("Paris.", "Paris")


def test_score_responses_with_callable_and_command_judge():
    records = [{"instruction": "i", "input": "", "output": "yes it is", "model_response": "yes it is"},
               {"instruction": "i", "input": "", "output": "no", "model_response": "maybe"}]
    scores = score_responses(records, judge=lambda r: len(r["model_response"]))
    assert scores == {"count": 2, "rouge_l_f1": 0.5, "exact_match": 0.5, "judge_score": 7.0}
    assert records[0]["exact_match"] and records[1]["rouge_l_f1"] == 0.0
    judge = command_judge(f'{sys.executable} -c "import json,sys; print(len(json.load(sys.stdin)[\'output\']))"')
    assert score_responses(records, judge)["judge_score"] == 5.5
    with pytest.raises(FastGPTError, match="expected a number"):
        command_judge(f'{sys.executable} -c "print(\'great\')"')(records[0])


# ---------------------------------------------------------------------- training
def _toy_records(n=24):
    colors = ["red", "blue", "green", "black"]
    return [{"instruction": "Name the color.", "input": f"item {k}", "output": f"It is {colors[k % 4]}."}
            for k in range(n)]


def test_instruction_training_lowers_validation_loss(tmp_path):
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(_toy_records()))
    report = finetune_instruct("tiny", str(data), str(tmp_path / "out"), template="phi3",
                               split_fractions=(0.75, 0.125, 0.125),
                               max_steps=12, batch_size=6, lr=3e-3, warmup_steps=1, eval_interval=12,
                               max_new_tokens=4, log=lambda *_: None)
    assert report["val_loss_after"] < report["val_loss_before"] - 0.5
    out = tmp_path / "out"
    doc = json.loads((out / "config.json").read_text())
    assert doc["metadata"]["template"] == "phi3"
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 3 and all("model_response" in r for r in responses)
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 12 and kinds.count("eval") == 2
    assert (out / "loss.png").is_file() and (out / "report.json").is_file()


def test_real_instruction_data_smoke(tmp_path):
    data = shared_file("instruction-data.json")
    report = finetune_instruct("tiny", str(data), str(tmp_path / "out"), max_steps=3, batch_size=4, lr=2e-3,
                               warmup_steps=1, eval_interval=3, eval_batches=3, max_length=48, max_new_tokens=2,
                               test_limit=4, log=lambda *_: None)
    assert report["split_sizes"] == {"train": 935, "val": 110, "test": 55}
    assert report["val_loss_after"] < report["val_loss_before"]
    responses = json.loads((tmp_path / "out" / "test_responses.json").read_text())
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in load_records(data)[1045:1049]]


# ---------------------------------------------------------------------- LoRA
def _tiny_base_with_bpe(directory, text: str):
    """A random tiny GPT with a 300-token BPE learnt from `text`, saved as a model directory:
    a small vocabulary keeps CPU steps fast (GPT-2's 50,257-row head would dominate)."""
    from fastgpt import GPT, preset
    from fastgpt.bpe import BPETokenizer
    from fastgpt.finetune.checkpoint import save_model

    tokenizer = BPETokenizer.train(text, vocab_size=300)
    torch.manual_seed(0)
    save_model(GPT(preset("tiny", vocab_size=tokenizer.vocab_size)), directory, {}, tokenizer)
    return directory, tokenizer


def test_lora_trains_only_adapters_and_saves_a_plain_merged_model(tmp_path):
    from fastgpt.finetune.checkpoint import model_tokenizer
    from fastgpt.finetune.lora import load_adapters, merge_lora
    from fastgpt.weights import load_fastgpt

    data, out, rank = tmp_path / "toy.json", tmp_path / "out", 4
    data.write_text(json.dumps(_toy_records()))
    base_dir, tokenizer = _tiny_base_with_bpe(tmp_path / "base", data.read_text() * 4)
    report = finetune_instruct(str(base_dir), str(data), str(out), template="phi3", trainable="lora", lora_rank=rank,
                               lora_alpha=8.0, split_fractions=(0.75, 0.125, 0.125), max_steps=16, batch_size=6,
                               lr=2e-2, warmup_steps=1, eval_interval=16, generate_responses=False,
                               log=lambda *_: None)
    base, _ = load_fastgpt(base_dir)
    C, L = base.config.n_embd, base.config.n_layer
    # rank * (in + out) for qkv (C -> 3C), attn.proj (C -> C), fc (C -> 4C), mlp.proj (4C -> C), in every block
    adapters = L * rank * (4 * C + 2 * C + 5 * C + 5 * C)
    assert report["trainable"] == "lora" and report["trainable_parameters"] == adapters
    assert report["total_parameters"] == base.num_parameters() + adapters
    assert report["val_loss_after"] < report["val_loss_before"] - 0.3

    saved, meta = load_fastgpt(out)  # knows nothing about LoRA: an ordinary fastgpt model directory
    assert meta["template"] == "phi3" and meta["trainable"] == "lora" and meta["lora"]["rank"] == rank
    assert model_tokenizer(str(out)).encode("It is red.") == tokenizer.encode("It is red.")
    base_state, saved_state = base.state_dict(), saved.state_dict()
    assert saved_state.keys() == base_state.keys()
    adapted = {f"blocks.{i}.{name}.weight" for i in range(L)
               for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    for name, before in base_state.items():
        if name in adapted:  # the frozen base plus a rank-r update, nothing else
            delta = (saved_state[name] - before).double()
            singular = torch.linalg.svdvals(delta)
            assert singular[0] > 1e-4 and singular[rank:].max() < 1e-5 * singular[0], name
        else:  # embeddings, LayerNorms, biases: frozen, bit for bit
            assert torch.equal(saved_state[name], before), name

    merged = merge_lora(load_adapters(base, out / "lora_adapters.safetensors")).eval()
    idx = torch.tensor([tokenizer.encode(format_prompt("phi3", "Name the color.", "item 3"))])
    with torch.no_grad():
        assert torch.equal(saved.eval()(idx), merged(idx))


def test_lora_rank_must_be_positive(tmp_path):
    data = tmp_path / "toy.json"
    data.write_text(json.dumps(_toy_records(8)))
    for rank in (0, -2):
        with pytest.raises(FastGPTError, match=f"^--lora-rank: must be positive, got {rank}$"):
            finetune_instruct("tiny", str(data), str(tmp_path / "out"), trainable="lora", lora_rank=rank,
                              log=lambda *_: None)
    with pytest.raises(FastGPTError, match="--trainable: unknown mode 'some'"):
        finetune_instruct("tiny", str(data), str(tmp_path / "out"), trainable="some", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_set_trainable_last_n_leaves_the_tied_embedding_frozen():
    from fastgpt.finetune.trainable import set_trainable
    from fastgpt.model import GPT

    gpt = GPT("tiny")
    set_trainable(gpt, "last-n", last_n=1)
    trainable = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "ln_f.")) for n in trainable)
    set_trainable(gpt, "all")
    assert all(p.requires_grad for p in gpt.parameters())


def test_lora_on_real_instruction_data_lowers_validation_loss(tmp_path):
    data = shared_file("instruction-data.json")
    text = "\n".join(r["instruction"] + r["input"] + r["output"] for r in load_records(data)[:200])
    base_dir, _ = _tiny_base_with_bpe(tmp_path / "base", text)
    report = finetune_instruct(str(base_dir), str(data), str(tmp_path / "out"), trainable="lora", lora_rank=8,
                               max_steps=12, batch_size=8, lr=2e-2, warmup_steps=1, eval_interval=12, eval_batches=3,
                               max_length=64, generate_responses=False, log=lambda *_: None)
    assert report["split_sizes"] == {"train": 935, "val": 110, "test": 55}
    assert report["val_loss_after"] < report["val_loss_before"] - 0.2  # measured: 5.64 -> 5.28
    assert (tmp_path / "out" / "lora_adapters.safetensors").is_file()


# ---------------------------------------------------------------------- resume
def _resumable_run(tmp_path, **options):
    """A 9-step run (3 steps per epoch) on a dropout-0.1 tiny base, with a checkpoint every 2 steps, all kept."""
    from fastgpt import GPT, preset
    from fastgpt.bpe import BPETokenizer
    from fastgpt.finetune.checkpoint import save_model

    data = tmp_path / "toy.json"
    data.write_text(json.dumps(_toy_records()))
    tokenizer = BPETokenizer.train(data.read_text() * 4, vocab_size=300)
    torch.manual_seed(0)  # dropout makes the restored RNG state matter
    save_model(GPT(preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.1)), tmp_path / "base", {}, tokenizer)
    run_options = dict(template="phi3", split_fractions=(0.75, 0.125, 0.125), max_steps=9, batch_size=6, lr=3e-3,
                       warmup_steps=1, eval_interval=3, ckpt_interval=2, keep_last=0, max_new_tokens=3,
                       log=lambda *_: None, **options)
    report = finetune_instruct(str(tmp_path / "base"), str(data), str(tmp_path / "reference"), **run_options)
    return data, run_options, report


def _as_if_killed_after(reference, run, step: int):
    """A copy of the finished run as it was when the process died just after checkpoint `step`."""
    import shutil
    shutil.copytree(reference, run)
    for path in run.iterdir():
        if path.name.startswith("ckpt_") and int(path.name[5:]) > step or path.suffix in (".safetensors", ".png") \
                or path.name in ("config.json", "report.json", "test_responses.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _rows(run):
    """Every metrics record without its timings (ms, tok/s)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("ms", "tok_s")} for row in rows]


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.mark.parametrize("resume_at", [4, 6])  # mid-epoch (epoch 2, batch 1) and an epoch's end
def test_resume_is_bit_exact(tmp_path, resume_at):
    data, options, report = _resumable_run(tmp_path)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    _as_if_killed_after(reference, run, resume_at)
    resumed = finetune_instruct(resume=str(run), **options)  # the run dir: its latest checkpoint
    assert resumed == report
    assert _rows(run) == _rows(reference) and sum(r["kind"] == "train" for r in _rows(run)) == 9
    final, expected = _weights(run / "model.safetensors"), _weights(reference / "model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert json.loads((run / "test_responses.json").read_text()) == json.loads(
        (reference / "test_responses.json").read_text())


def test_lora_resume_is_bit_exact_and_checkpoints_keep_base_and_adapters(tmp_path):
    from fastgpt.weights import load_fastgpt

    data, options, report = _resumable_run(tmp_path, trainable="lora", lora_rank=2, lora_alpha=4.0)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    base, _ = load_fastgpt(tmp_path / "base")
    stored, _ = load_fastgpt(reference / "ckpt_000004" / "model")  # the frozen base, not a merged model
    assert all(torch.equal(stored.state_dict()[k], v) for k, v in base.state_dict().items())
    assert (reference / "ckpt_000004" / "lora_adapters.safetensors").is_file()

    _as_if_killed_after(reference, run, 4)
    resumed = finetune_instruct(resume=str(run / "ckpt_000004"), **options)
    assert resumed == report and _rows(run) == _rows(reference)
    for name in ("model.safetensors", "lora_adapters.safetensors"):
        final, expected = _weights(run / name), _weights(reference / name)
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected), name


def test_resume_refuses_another_template_or_trainable_and_writes_nothing(tmp_path):
    data, options, _ = _resumable_run(tmp_path)
    run = tmp_path / "reference"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for changed, message in ((dict(template="alpaca", explicit={"template"}), "--template phi3 .* --template alpaca"),
                             (dict(trainable="lora"), "--trainable all .* --trainable lora")):
        with pytest.raises(FastGPTError, match=f"^--resume {run / 'ckpt_000009'}: the run was made with {message}; "
                                               "start a new --out to change it$"):
            finetune_instruct(resume=str(run), **{**options, **changed})
    with pytest.raises(FastGPTError, match=r"already holds checkpoints \(ckpt_000009\); continue it with --resume"):
        finetune_instruct(str(tmp_path / "base"), str(data), str(run), **options)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
