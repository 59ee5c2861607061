"""Drawing tokens from probabilities (fastgpt.sampling.draw): the distribution it samples,
never a token of probability zero, and reproducible with a seeded generator."""
import torch

from fastgpt.sampling import draw


def test_draw_samples_the_given_distribution_and_never_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0],
                          [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    generator = torch.Generator().manual_seed(11)
    n = 20000
    counts = torch.zeros_like(probs)
    for _ in range(n // 100):  # 100 rows at a time: each row its own draw
        tokens = draw(probs.repeat(100, 1), generator).view(100, 2)
        for row in range(2):
            counts[row] += torch.bincount(tokens[:, row], minlength=6).float()
    assert (counts[probs == 0] == 0).all()
    frequencies = counts / n
    # 4 standard deviations of a binomial frequency at p=0.5, n=20000: 0.014
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.015)


def test_draw_takes_unnormalised_rows_and_is_reproducible():
    weights = torch.tensor([[2.0, 0.0, 6.0]])  # as the speculative residual may be
    first = [int(draw(weights, torch.Generator().manual_seed(3))[0]) for _ in range(5)]
    again = [int(draw(weights, torch.Generator().manual_seed(3))[0]) for _ in range(5)]
    assert first == again and set(first) <= {0, 2}
    one_hot = torch.zeros(1, 50257)
    one_hot[0, 50256] = 1.0  # the last token: no off-the-end index
    assert int(draw(one_hot)[0]) == 50256
