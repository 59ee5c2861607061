"""DPO: preference records and their errors, the pair collate, masked log-probabilities, the loss against a
plain-PyTorch DPO written out here, ln 2 at the start, and training that prefers the chosen answers."""
import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import GPT, preset
from fastgpt.bpe import BPETokenizer
from fastgpt.errors import FastGPTError
from fastgpt.finetune.dpo import (
    batch_loss,
    disable_dropout,
    encode_pairs,
    evaluate_pairs,
    fits,
    load_preference_records,
    pair_batches,
    reference_logprobs,
    sequence_logprobs,
)
from fastgpt.finetune.instruct import IGNORE_INDEX, split_in_order

COLORS = ["red", "blue", "green", "black"]


def _toy_records(n=24):
    """The chosen answer names the item's colour politely; the rejected one is rude and wrong."""
    return [{"instruction": "Name the color.", "input": f"item {k}", "output": "ignored",
             "chosen": f"It is {COLORS[k % 4]}.", "rejected": f"Go away, it is {COLORS[(k + 1) % 4]}!"}
            for k in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    text = json.dumps(_toy_records()) + " Below is an instruction that describes a task. Write a response"
    return BPETokenizer.train(text * 3, vocab_size=300)


def _model(tokenizer, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=tokenizer.vocab_size, dropout=dropout))


def _batches(tokenizer, records, batch_size=4, template="phi3", max_length=None):
    pairs = encode_pairs(records, tokenizer, template)
    return pairs, pair_batches(pairs, batch_size, tokenizer.eot_id, max_length)


# ---------------------------------------------------------------------- records
def test_records_json_and_jsonl_output_ignored_and_split(tmp_path):
    records = _toy_records(20)
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if k not in ("input", "output")})
                                                for r in records))
    expected = [{k: r[k] for k in ("instruction", "input", "chosen", "rejected")} for r in records]
    assert load_preference_records(tmp_path / "d.json") == expected
    assert load_preference_records(tmp_path / "d.jsonl") == [{**r, "input": ""} for r in expected]
    train, val, test = split_in_order(expected)
    assert (len(train), len(val), len(test)) == (17, 2, 1) and test[0]["input"] == "item 19"


@pytest.mark.parametrize("name,content,message", [
    ("chosen.json", '[{"instruction": "a", "chosen": "b", "rejected": "c"}, {"instruction": "a", "rejected": "c"}]',
     r"chosen.json: record 1: missing field 'chosen'"),
    ("rejected.json", '[{"instruction": "a", "chosen": "b"}]', r"rejected.json: record 0: missing field 'rejected'"),
    ("type.json", '[{"instruction": "a", "chosen": 3, "rejected": "c"}]',
     r"type.json: record 0: field 'chosen' must be a string"),
    ("input.json", '[{"instruction": "a", "input": null, "chosen": "b", "rejected": "c"}]',
     r"input.json: record 0: field 'input' must be a string"),
    ("obj.json", '{"instruction": "a"}', r"obj.json: expected a JSON list"),
    ("item.json", '["text"]', r"item.json: record 0: expected a JSON object"),
    ("syntax.json", '[{"instruction": "a",\n "chosen": }]', r"syntax.json:2: invalid JSON"),
    ("none.json", "[]", r"none.json: no records"),
    ("lines.jsonl", '{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"chosen": "b"}\n',
     r"lines.jsonl:2: missing field 'instruction'"),
])
def test_bad_records_name_file_record_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(FastGPTError, match=message):
        load_preference_records(path)


# ---------------------------------------------------------------------- collate
def test_pair_batch_holds_chosen_then_rejected_with_the_prompt_masked(tokenizer):
    records = _toy_records(3)
    pairs, batches = _batches(tokenizer, records, batch_size=3)
    (batch,) = batches
    assert batch.inputs.shape[0] == 6 and batch.index.tolist() == [0, 1, 2]
    eot = tokenizer.eot_id
    for row, pair in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        targets = batch.targets[row]
        kept = targets[targets != IGNORE_INDEX].tolist()
        response = pair.tokens[pair.prompt_length:]
        assert kept == response + [eot]  # exactly the response and the first end-of-text
        assert batch.inputs[row, :len(pair.tokens)].tolist() == pair.tokens
    assert tokenizer.decode(pairs[1].chosen.tokens[pairs[1].chosen.prompt_length:]) == "It is blue."
    assert tokenizer.decode(pairs[1].rejected.tokens[pairs[1].rejected.prompt_length:]) == "Go away, it is green!"


def test_pairs_whose_prompt_fills_max_length_do_not_fit(tokenizer):
    (pair,) = encode_pairs(_toy_records(1), tokenizer, "alpaca")
    assert fits(pair, pair.chosen.prompt_length) and not fits(pair, pair.chosen.prompt_length - 1)
    (batch,) = pair_batches([pair], 1, tokenizer.eot_id, max_length=pair.chosen.prompt_length)
    assert ((batch.targets != IGNORE_INDEX).sum(dim=1) == 1).all()  # only the first response token remains


# ---------------------------------------------------------------------- log-probabilities
def _plain_logprobs(model, inputs, targets, mode):
    """Written out: log-softmax over the logits, the target's entry, summed (or averaged) over unmasked targets."""
    logits = model(inputs).float()
    mask = targets != IGNORE_INDEX
    picked = torch.gather(F.log_softmax(logits, dim=-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (picked * mask).sum(dim=1)
    return total if mode == "sum" else total / mask.sum(dim=1)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sequence_logprobs_equal_the_written_out_ones(tokenizer, mode):
    model = _model(tokenizer)
    _, (batch, *_) = _batches(tokenizer, _toy_records(8))
    got = sequence_logprobs(model, batch.inputs, batch.targets, mode)
    torch.testing.assert_close(got, _plain_logprobs(model, batch.inputs, batch.targets, mode), atol=2e-5, rtol=1e-6)


def _perturbed_at(model, rows_and_positions):
    """A forward hook that adds noise to the final hidden states (hence only those logits) at the given spots."""
    def hook(_module, _inputs, output):
        output = output.clone()
        for row, position in rows_and_positions:
            output[row, position] += 3.0 * torch.randn(output.shape[-1])
        return output
    return model.ln_f.register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_prompt_and_padding_logits_do_not_change_the_logprob(tokenizer, mode):
    model = _model(tokenizer)
    _, (batch, *_) = _batches(tokenizer, _toy_records(4))
    before = sequence_logprobs(model, batch.inputs, batch.targets, mode)
    masked = (batch.targets == IGNORE_INDEX).nonzero().tolist()
    assert any(p < 3 for _, p in masked) and any(p > 10 for _, p in masked)  # prompt and padding both present
    with _perturbed_at(model, masked):
        torch.testing.assert_close(sequence_logprobs(model, batch.inputs, batch.targets, mode), before,
                                   atol=0, rtol=0)
    response = (batch.targets != IGNORE_INDEX).nonzero()[0].tolist()
    with _perturbed_at(model, [response]):  # a response position does count
        changed = sequence_logprobs(model, batch.inputs, batch.targets, mode)
    assert changed[response[0]] != before[response[0]]
    assert torch.equal(changed[response[0] + 1:], before[response[0] + 1:])


def test_unknown_logprob_mode_is_an_error(tokenizer):
    _, (batch, *_) = _batches(tokenizer, _toy_records(2))
    with pytest.raises(FastGPTError, match="--logprob: unknown mode 'max'"):
        sequence_logprobs(_model(tokenizer), batch.inputs, batch.targets, "max")


# ---------------------------------------------------------------------- loss
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_first_step_loss_is_ln2_when_the_policy_is_the_reference(tokenizer, mode):
    model = _model(tokenizer, dropout=0.1)
    disable_dropout(model)
    _, batches = _batches(tokenizer, _toy_records(12))
    reference = reference_logprobs(model, batches, mode, contextlib.nullcontext)
    model.train()
    for batch in batches:
        loss, stats = batch_loss(model, batch, reference, 0.1, mode)
        assert abs(loss.item() - math.log(2)) < 1e-6
        assert stats["margin"].abs().item() < 1e-6 and stats["accuracy"].item() == 0.0


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_gradients_equal_a_plain_pytorch_dpo_loss(tokenizer, mode):
    """(The fused kernel's reduction="none" gradients are checked in test_kernels_linear_cross_entropy.py.)"""
    beta = 0.5
    _, batches = _batches(tokenizer, _toy_records(6), batch_size=6)
    reference = reference_logprobs(_model(tokenizer, seed=1), batches, mode, contextlib.nullcontext)
    (batch,) = batches

    ours = _model(tokenizer)
    loss, stats = batch_loss(ours, batch, reference, beta, mode)
    loss.backward()

    plain = _model(tokenizer)
    logprobs = _plain_logprobs(plain, batch.inputs, batch.targets, mode)
    policy_c, policy_r = logprobs[:6], logprobs[6:]
    ref_c, ref_r = reference[:, 0], reference[:, 1]
    logits = beta * ((policy_c - policy_r) - (ref_c - ref_r))
    expected = -F.logsigmoid(logits).mean()
    expected.backward()

    assert abs(loss.item() - expected.item()) < 1e-6 and abs(loss.item() - math.log(2)) > 1e-3
    torch.testing.assert_close(stats["chosen_reward"], (beta * (policy_c - ref_c)).mean().detach())
    torch.testing.assert_close(stats["rejected_reward"], (beta * (policy_r - ref_r)).mean().detach())
    torch.testing.assert_close(stats["margin"], logits.mean().detach())
    assert stats["accuracy"].item() == (logits > 0).float().mean().item()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_training_on_a_toy_preference_set_lowers_the_loss(tokenizer):
    """Six AdamW steps: the policy learns to prefer the chosen answers on held-out pairs too."""
    records = _toy_records(32)
    model = _model(tokenizer)
    _, train_batches = _batches(tokenizer, records[:24])
    _, val_batches = _batches(tokenizer, records[24:])
    reference = reference_logprobs(model, train_batches, "sum", contextlib.nullcontext)
    val_reference = reference_logprobs(model, val_batches, "sum", contextlib.nullcontext)
    before = evaluate_pairs(model, val_batches, val_reference, 0.1, "sum", contextlib.nullcontext)
    assert abs(before["loss"] - math.log(2)) < 1e-6
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in train_batches:
        loss, _ = batch_loss(model, batch, reference, 0.1, "sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate_pairs(model, val_batches, val_reference, 0.1, "sum", contextlib.nullcontext)
    assert after["loss"] < before["loss"] - 0.2
    assert after["margin"] > 0.5 and after["accuracy"] == 1.0
    assert after["chosen_reward"] > after["rejected_reward"]


# ---------------------------------------------------------------------- the run
def _instruction_model(directory, tokenizer, template="phi3"):
    """A random tiny model saved as if `finetune instruct` had made it (its template in the metadata)."""
    from fastgpt.finetune.checkpoint import save_model
    save_model(_model(tokenizer), directory, {"template": template} if template else {}, tokenizer)
    return str(directory)


def _run_options(**overrides):
    return dict(split_fractions=(0.75, 0.125, 0.125), max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1,
                eval_interval=3, ckpt_interval=2, keep_last=0, max_new_tokens=3, log=lambda *_: None, **overrides)


def _rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("ms", "tok_s")} for row in rows]


def test_finetune_dpo_run_logs_preferences_and_answers_side_by_side(tmp_path, tokenizer):
    from fastgpt.finetune.dpo import finetune_dpo
    from fastgpt.weights import load_fastgpt

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(_toy_records(32)))
    out = tmp_path / "out"
    report = finetune_dpo(_instruction_model(tmp_path / "base", tokenizer), str(data), str(out), **_run_options())
    assert report["split_sizes"] == {"train": 24, "val": 4, "test": 4} and report["template"] == "phi3"
    rows = _rows(out)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert abs(evals[0]["val_loss"] - math.log(2)) < 1e-6 and evals[0]["val_margin"] == 0.0
    assert evals[-1]["val_loss"] < math.log(2) - 0.2 and evals[-1]["val_accuracy"] == 1.0
    assert evals[-1]["val_chosen_reward"] > evals[-1]["val_rejected_reward"]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 6 and abs(train_rows[0]["loss"] - math.log(2)) < 1e-6
    assert all({"chosen_reward", "rejected_reward", "margin", "accuracy"} <= set(r) for r in train_rows)
    assert (out / "loss.png").is_file() and (out / "preferences.png").is_file()
    responses = json.loads((out / "test_responses.json").read_text())
    assert [r["input"] for r in responses] == [f"item {k}" for k in range(28, 32)]
    assert all({"chosen", "rejected", "reference_response", "policy_response"} <= set(r) for r in responses)
    _, metadata = load_fastgpt(out)
    assert metadata["finetune"] == "dpo" and metadata["template"] == "phi3" and metadata["dpo"]["beta"] == 0.1


def test_dpo_lora_resume_is_bit_exact(tmp_path, tokenizer):
    import shutil

    from fastgpt.finetune.dpo import finetune_dpo
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(_toy_records(32)))
    base = _instruction_model(tmp_path / "base", tokenizer)
    options = _run_options(trainable="lora", lora_rank=2, lora_alpha=4.0, logprob="mean", beta=0.5)
    report = finetune_dpo(base, str(data), str(tmp_path / "reference"), **options)
    run = tmp_path / "killed"  # the run as it was when the process died just after checkpoint 4
    shutil.copytree(tmp_path / "reference", run)
    for path in run.iterdir():
        if path.name == "ckpt_000006" or path.suffix in (".safetensors", ".png", ".json") \
                and path.name != "reference_logprobs.safetensors":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    lines = []
    resumed = finetune_dpo(resume=str(run), **{**options, "log": lines.append})
    assert resumed == report and _rows(run) == _rows(tmp_path / "reference")
    assert any("reference log-probabilities read from" in line for line in lines)  # not computed again
    assert (run / "lora_adapters.safetensors").is_file()
    with pytest.raises(FastGPTError, match="the run was made with --logprob mean but this run asks for --logprob sum"):
        finetune_dpo(resume=str(run), explicit={"logprob"}, **{**options, "logprob": "sum"})


def test_dpo_refuses_an_instruct_checkpoint_and_a_model_without_template(tmp_path, tokenizer):
    from fastgpt.finetune.dpo import finetune_dpo
    from fastgpt.finetune.instruct import finetune_instruct

    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(_toy_records(16)))
    plain = _instruction_model(tmp_path / "plain", tokenizer, template=None)
    with pytest.raises(FastGPTError, match="no prompt template in its metadata .*give --template"):
        finetune_dpo(plain, str(data), str(tmp_path / "out"), **_run_options())
    assert not (tmp_path / "out").exists()
    finetune_instruct(plain, str(data), str(tmp_path / "instruct"), template="phi3", max_steps=1,
                      generate_responses=False, log=lambda *_: None)
    with pytest.raises(FastGPTError, match="not a resumable `fastgpt finetune dpo` checkpoint"):
        finetune_dpo(resume=str(tmp_path / "instruct"), log=lambda *_: None)


# ---------------------------------------------------------------------- command line
def test_cli_missing_chosen_is_one_line_and_writes_nothing(tmp_path, capsys, tokenizer):
    from fastgpt.cli import main

    data = tmp_path / "d.json"
    data.write_text(json.dumps([*_toy_records(2), {"instruction": "a", "input": "", "rejected": "b"}]))
    model = _instruction_model(tmp_path / "base", tokenizer)
    assert main(["finetune", "dpo", "--model", model, "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "d.json: record 2: missing field 'chosen'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "dpo", "--model", model, "--data", str(data), "--out", str(tmp_path / "o"),
              "--logprob", "max"])
    assert exit_.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err


def test_cli_run_with_flags_and_help_explains_the_logprob_default(tmp_path, capsys, tokenizer):
    from fastgpt.cli import main

    data = tmp_path / "d.json"
    data.write_text(json.dumps(_toy_records(16)))
    model = _instruction_model(tmp_path / "base", tokenizer)
    out = tmp_path / "o"
    assert main(["finetune", "dpo", "--model", model, "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--beta", "0.3", "--logprob", "mean", "--dtype", "float32", "--lr", "1e-3",
                 "--no-responses"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["beta"], report["logprob"], report["steps"]) == (0.3, "mean", 2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["finetune", "dpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the DPO paper's and TRL's, the default" in text and "(default: sum)" in text and "(default: 0.1)" in text
