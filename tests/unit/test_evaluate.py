"""Pure evaluation metrics."""

import numpy as np
import pytest
import torch

from pg_train.evaluate import caption_rows, cosine_choices, derangement, exact_match, rouge_l, wilson_interval


def test_wilson_interval():
    lo, hi = wilson_interval(48, 100)
    assert lo == pytest.approx(0.3846, abs=1e-3) and hi == pytest.approx(0.5768, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_rouge_l_and_exact_match():
    assert rouge_l("A red cat.", "a red cat") == 1.0
    assert rouge_l("a cat", "a red cat") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert rouge_l("dog", "a red cat") == 0.0
    assert exact_match("An apple!", "an apple") and not exact_match("an apple tree", "an apple")


@pytest.mark.parametrize("n", [2, 3, 10, 99])
def test_derangement_has_no_fixed_point(n):
    p = derangement(n, seed=n)
    assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))


def test_cosine_choices_picks_the_most_similar_option_by_direction_not_norm():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [100.0, 90.0]])
    queries = torch.tensor([[0.1, 1.0], [2.0, 0.1], [-3.0, 0.0]])
    options = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    # row 0: [0, 1] wins over the long [100, 90]; row 1: [1, 0] at position 3; row 2: [-1, 0] at position 3
    assert cosine_choices(queries, candidates, options).tolist() == [1, 3, 3]


def test_caption_rows_repeat_the_direction_at_the_given_norm():
    t = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    rows = caption_rows(t, 3, 10.0)
    assert rows.shape == (2, 3, 2)
    assert torch.allclose(rows[0], torch.tensor([[6.0, 8.0]] * 3))
    assert torch.allclose(rows[1], torch.tensor([[0.0, -10.0]] * 3))
