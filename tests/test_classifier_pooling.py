"""Mean pooling of the classifier: the average of the real tokens' hidden states, whatever the padding."""
import pytest
import torch

from fastgpt.errors import FastGPTError
from fastgpt.finetune.checkpoint import load_classifier, save_classifier
from fastgpt.finetune.classifier import GPTClassifier
from fastgpt.finetune.classify import pad_batch
from fastgpt.model import GPT


def _classifier(pooling):
    torch.manual_seed(0)
    return GPTClassifier(GPT("tiny"), 3, pooling).eval()


def test_mean_pooling_is_the_mean_over_real_tokens_on_either_padding_side():
    clf = _classifier("mean")
    sequences = [[5, 9, 2, 7, 1], [3, 8], [4, 4, 6]]
    with torch.no_grad():
        alone = torch.stack([clf.head(clf.gpt.hidden_states(torch.tensor([s]))[0].mean(0)) for s in sequences])
        for side in ("right", "left"):
            ids, mask = pad_batch(sequences, pad_id=11, side=side)
            torch.testing.assert_close(clf(ids, mask), alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(clf(torch.tensor([sequences[0]])), alone[:1], atol=1e-5, rtol=0)
        last = _classifier("last")
        ids, mask = pad_batch(sequences)
        assert not torch.allclose(last(ids, mask), clf(ids, mask))  # the two poolings read different features


def test_pooling_is_saved_with_the_classifier(tmp_path):
    clf = _classifier("mean")
    save_classifier(clf, tmp_path / "clf", ["a", "b", "c"], {"pooling": "mean"})
    loaded, metadata = load_classifier(tmp_path / "clf")
    assert loaded.pooling == "mean" and metadata["pooling"] == "mean"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), clf(ids))


def test_unknown_pooling_is_refused():
    with pytest.raises(FastGPTError, match="unknown 'max'"):
        GPTClassifier(GPT("tiny"), 2, "max")
