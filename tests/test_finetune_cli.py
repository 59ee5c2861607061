"""`fastgpt finetune classify|instruct` and `fastgpt classify` end to end: outputs, round trip, one-line errors."""
import json

import pytest
import torch
from conftest import shared_file

from fastgpt.cli import main
from fastgpt.finetune.checkpoint import load_classifier
from fastgpt.finetune.classify import balance, class_names, read_labeled_texts, split


def _toy_tsv(path, n=48):
    spam = ["WIN a FREE prize now", "Claim your cash prize", "FREE entry, txt WIN now", "Urgent! You won cash"]
    ham = ["see you at lunch", "ok, call me later", "are you home yet?", "thanks for dinner"]
    path.write_text("".join(f"spam\t{spam[i % 4]}\n" if i % 2 else f"ham\t{ham[i % 4]}\n" for i in range(n)))
    return path


def test_classify_with_lora_then_classify_command(tmp_path, capsys):
    data, out = _toy_tsv(tmp_path / "toy.tsv"), tmp_path / "clf"
    rc = main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--trainable", "lora",
               "--lora-rank", "4", "--epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "trainable: " in printed and "confusion matrix" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["ham", "spam"] and report["split_sizes"] == {"train": 33, "val": 4, "test": 11}
    assert sum(map(sum, report["confusion_matrix"])) == 11
    assert set(report["per_class"]["spam"]) == {"precision", "recall", "f1", "support"}
    assert {"train", "eval"} == {json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert (out / "loss.png").is_file()

    assert (out / "lora_adapters.safetensors").is_file()
    clf, meta = load_classifier(out)  # a plain model (LoRA merged) + head + labels
    assert meta["labels"] == ["ham", "spam"] and not any("lora" in n for n in clf.state_dict())
    assert main(["classify", "--model", str(out), "WIN a FREE prize now", "see you at lunch"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    label, prob, text = lines[0].split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0 and text == "WIN a FREE prize now"
    texts = tmp_path / "texts.txt"
    texts.write_text("are you home yet?\n\nClaim your cash prize\n")
    assert main(["classify", "--model", str(out), "--file", str(texts)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize("content,message", [
    ("ham\thi\nspam no tab\n", "bad.tsv:2: expected 'label<TAB>text'"),
    ("a\tx\nb\ty\nc\tz\n", "2 training examples for 3 classes"),
    (b"ham\thi\nspam\t\xff\n", "bad.tsv:2: not valid UTF-8"),
    ("", "bad.tsv: file is empty"),
])
def test_classify_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    data, out = tmp_path / "bad.tsv", tmp_path / "out"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_label_and_bad_arguments(tmp_path, capsys):
    data = _toy_tsv(tmp_path / "toy.tsv")
    assert main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--labels", "ham,eggs",
                 "--out", str(tmp_path / "o")]) == 2
    assert "toy.tsv:2: unknown label 'spam'" in capsys.readouterr().err
    assert main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--split", "0.5", "0.5", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["finetune", "classify", "--model", str(tmp_path / "nope"), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path), "hello"]) == 2


def test_instruct_missing_field_names_record(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "inptu": "d"}]))
    assert main(["finetune", "instruct", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "d.json: record 1: missing field 'output'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sms_spam_balanced_split_and_short_run(tmp_path):
    data = shared_file("SMSSpamCollection.tsv")
    examples = read_labeled_texts(data)
    assert class_names(examples) == ["ham", "spam"]
    balanced = balance(examples)
    assert len(balanced) == 1494 and sum(e.label == "spam" for e in balanced) == 747
    assert [len(part) for part in split(balanced, (0.7, 0.1, 0.2))] == [1045, 149, 300]
    out = tmp_path / "spam"
    torch.manual_seed(0)
    assert main(["finetune", "classify", "--model", "tiny", "--data", str(data), "--balance", "--split", "0.3", "0.05",
                 "0.65", "--max-length", "16", "--trainable", "all", "--epochs", "1", "--lr", "1e-3",
                 "--batch-size", "16", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_after"]["test"] > 0.75  # ~50% before training


def test_model_with_its_own_bpe_keeps_it_through_finetuning(tmp_path, capsys):
    """A model trained with a small BPE vocabulary (ids < 300) is fine-tuned and used with that
    tokenizer: GPT-2 ids (up to 50256) would not even fit its embedding."""
    from fastgpt import GPT, preset
    from fastgpt.bpe import BPETokenizer
    from fastgpt.finetune.checkpoint import model_tokenizer, save_model

    data = _toy_tsv(tmp_path / "toy.tsv")
    tokenizer = BPETokenizer.train(data.read_text() * 3, vocab_size=300)
    base = tmp_path / "base"
    save_model(GPT(preset("tiny", vocab_size=tokenizer.vocab_size)), base, {}, tokenizer)
    out = tmp_path / "clf"
    assert main(["finetune", "classify", "--model", str(base), "--data", str(data), "--epochs", "1",
                 "--batch-size", "8", "--out", str(out)]) == 0
    assert model_tokenizer(str(out)).encode("Claim your cash prize") == tokenizer.encode("Claim your cash prize")
    capsys.readouterr()
    assert main(["classify", "--model", str(out), "Claim your cash prize"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("ham", "spam")


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_instruct_bad_lora_rank_is_one_line(tmp_path, capsys, rank):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 4))
    assert main(["finetune", "instruct", "--model", "tiny", "--data", str(data), "--trainable", "lora",
                 "--lora-rank", rank, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--lora-rank: must be positive, got {rank}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_instruct_help_lists_the_trainable_choices(capsys):
    with pytest.raises(SystemExit) as done:
        main(["finetune", "instruct", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--trainable {last-n,all,lora}", "--lora-rank", "--lora-alpha", "--lora-targets", "(default: all)",
                   "lora_adapters.safetensors"):
        assert option in text


def _tiny_instruction_set_and_model(tmp_path):
    """16 instruction records (d.json) and a random tiny model with its own 300-token BPE (base/)."""
    from fastgpt import GPT, preset
    from fastgpt.bpe import BPETokenizer
    from fastgpt.finetune.checkpoint import save_model

    records = [{"instruction": "Name the color.", "input": f"item {k}", "output": "It is red."} for k in range(16)]
    data, base = tmp_path / "d.json", tmp_path / "base"
    data.write_text(json.dumps(records))
    tokenizer = BPETokenizer.train(data.read_text() * 3, vocab_size=300)
    save_model(GPT(preset("tiny", vocab_size=tokenizer.vocab_size)), base, {}, tokenizer)
    return data, base


def test_instruct_with_lora_then_chat_loads_the_saved_model(tmp_path, capsys, monkeypatch):
    """The LoRA run's output is an ordinary model directory: `fastgpt chat` uses it and its template."""
    import io
    import sys

    data, base = _tiny_instruction_set_and_model(tmp_path)
    out = tmp_path / "chatbot"
    assert main(["finetune", "instruct", "--model", str(base), "--data", str(data), "--trainable", "lora",
                 "--lora-rank", "2", "--template", "phi3", "--max-steps", "2", "--batch-size", "4", "--no-responses",
                 "--out", str(out)]) == 0
    # only the adapters train: 2 blocks x rank 2 x (in + out) of qkv, attn.proj, fc, mlp.proj = 2 * 2 * 16 * 64
    assert "trainable: 4,096 / " in capsys.readouterr().out
    assert (out / "lora_adapters.safetensors").is_file()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name the color.\n"))
    assert main(["chat", "--model", str(out), "--max-new-tokens", "3", "--temperature", "0", "--threads", "1"]) == 0
    assert "prompt template 'phi3'" in capsys.readouterr().err


def test_instruct_resume_from_the_command_line(tmp_path, capsys):
    """`--resume RUN` alone continues with the saved options; a flag that changes the template is one line."""
    import shutil

    data, base = _tiny_instruction_set_and_model(tmp_path)
    run = tmp_path / "run"
    assert main(["finetune", "instruct", "--model", str(base), "--data", str(data), "--template", "phi3",
                 "--max-steps", "4", "--batch-size", "4", "--ckpt-interval", "2", "--keep-last", "0",
                 "--no-responses", "--out", str(run)]) == 0
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    shutil.rmtree(run / "ckpt_000004")
    capsys.readouterr()
    # the default value given explicitly still counts as asking for it
    assert main(["finetune", "instruct", "--resume", str(run), "--template", "alpaca"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the run was made with --template phi3 but this run asks for --template " \
                                          "alpaca" in err
    assert main(["finetune", "instruct", "--resume", str(run)]) == 0
    assert "resumed from" in capsys.readouterr().out and (run / "ckpt_000004").is_dir()
    assert [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"] == losses
    assert main(["finetune", "instruct", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().endswith("--model is required (unless continuing a run with --resume)")


def test_finetune_options_from_a_config_file_with_flags_on_top(tmp_path, capsys):
    """The same mechanism as `pretrain --config`: file values, typed flags win, unknown keys name the file."""
    data, out = _toy_tsv(tmp_path / "toy.tsv"), tmp_path / "clf"
    config = tmp_path / "clf.toml"
    config.write_text(f'model = "tiny"\ndata = "{data}"\nout = "{out}"\ndtype = "float32"\nepochs = 3\n'
                      '[optim]\nbatch_size = 16\nlr = 1e-3\n')
    assert main(["finetune", "classify", "--config", str(config), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "dtype fp32" in printed and "epoch 1/1" in printed and "epoch 2" not in printed
    assert json.loads((out / "report.json").read_text())["labels"] == ["ham", "spam"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("template: phi3\nlearning_rate: 0.1\n")
    assert main(["finetune", "instruct", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "unknown key 'learning_rate'" in err
    assert main(["finetune", "classify", "--data", str(data), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("--model is required")
