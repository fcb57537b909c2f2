"""The insert-layer rule, its evidence, pg-recommend and pg-train --layer auto."""


import numpy as np
import pytest
import torch

from pg_analysis.errors import InputError
from pg_analysis.recommend import (alignment_deficit, answer_shift, attention_lost, default_candidates,
                                   pareto_frontier, recommend)


def test_attention_lost_skips_the_first_layers():
    lost = attention_lost([5.0, 5.0, 1.0, 1.0, 2.0], skip_layers=2)
    np.testing.assert_allclose(lost, [0, 0, 0, 0.25, 0.5, 1.0])
    with pytest.raises(InputError, match="skip_layers"):
        attention_lost([1.0, 1.0], skip_layers=2)
    with pytest.raises(InputError, match="no attention"):
        attention_lost([1.0, 0.0, 0.0], skip_layers=1)


def test_alignment_deficit_and_answer_shift():
    np.testing.assert_allclose(alignment_deficit([0.2, 0.1, 0.3, 0.6]), [0, 0.2, 0, 0])
    np.testing.assert_allclose(alignment_deficit([0.5, 0.5]), [0, 0])
    a = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    changed, kl = answer_shift(a, a)
    assert changed == 0 and kl == pytest.approx(0, abs=1e-12)
    b = torch.tensor([[3.0, 0, 0, 0], [0, 0, 3.0, 0]])
    changed, kl = answer_shift(a, b)
    p = torch.softmax(a[1], 0)
    assert changed == 0.5 and kl == pytest.approx(float((p * (p.log() - torch.log_softmax(b[1], 0))).sum()) / 2)
    with pytest.raises(InputError):
        answer_shift(a, a[:1])


def test_pareto_frontier_and_candidates():
    assert pareto_frontier([(0, 0.5), (0.1, 0.45), (0.2, 0.3), (0.15, 0.2)]) == [0, 1, 2]
    assert default_candidates(30) == [0, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 30]
    assert default_candidates(3) == [0, 1, 2, 3]


def _saving(n):
    return {L: L / (2 * n) for L in range(n + 1)}


def test_rule_picks_the_largest_admissible_prefix():
    attn = [9.0, 9.0, 0.1, 0.1, 0.1, 2.0, 2.0, 2.0]  # N = 8 layers; attention starts at block 5
    rec = recommend(_saving(8), attention_profile=attn, tolerance=0.1)
    assert rec["recommended_layer"] == 5 and rec["rule"]["risks_used"] == ["attention_lost"]
    assert [r["admissible"] for r in rec["table"]] == [True] * 6 + [False] * 3
    # a risk that dips back under the tolerance above a bad layer does not count: the path must stay admissible
    probe = {L: {"answers_changed": 0.0 if L in (0, 1, 2, 6) else 0.5, "accuracy": 0.5, "kl": 0.1}
             for L in range(9)}
    rec = recommend(_saving(8), attention_profile=attn, probe=probe, tolerance=0.1,
                    risks=("attention_lost", "answers_changed"))
    assert rec["recommended_layer"] == 2
    # the probe is reported but does not gate by default
    rec = recommend(_saving(8), attention_profile=attn, probe=probe, tolerance=0.1)
    assert rec["recommended_layer"] == 5 and "answers_changed" in rec["table"][3]
    rec = recommend(_saving(8), attention_profile=attn, alignment_profile=[0.3, 0.1] + [0.5] * 7, tolerance=0.1)
    assert rec["recommended_layer"] == 0  # layer 1 is far less aligned than the input space


def test_rule_bad_input_is_clear():
    with pytest.raises(InputError, match="mismatched layer counts"):
        recommend(_saving(4), attention_profile=[1.0] * 4, alignment_profile=[0.1] * 4)
    with pytest.raises(InputError, match="no evidence"):
        recommend(_saving(4))
    with pytest.raises(InputError, match="L = 0"):
        recommend({2: 0.1}, attention_profile=[1.0] * 4)
    with pytest.raises(InputError, match="tolerance"):
        recommend(_saving(4), attention_profile=[1.0] * 4, tolerance=2)
    with pytest.raises(InputError, match="were measured|was measured"):
        recommend(_saving(4), attention_profile=[1.0] * 4, risks=("answers_changed",))
