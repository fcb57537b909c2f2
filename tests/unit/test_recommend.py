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
    rec = recommend(_saving(8), attention_profile=attn, proxies=probe, tolerance=0.1,
                    risks=("attention_lost", "answers_changed"))
    assert rec["recommended_layer"] == 2
    # the probe is reported but does not gate by default
    rec = recommend(_saving(8), attention_profile=attn, proxies=probe, tolerance=0.1)
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


def test_spearman_matches_its_definition_with_ties():
    from pg_analysis.recommend import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    r = np.array([1, 2.5, 2.5, 4])
    assert spearman([0, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(np.corrcoef(r, [1, 2, 3, 4])[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(InputError, match="equal 1-d"):
        spearman([1, 2], [1, 2, 3])


def test_bootstrap_accuracy_resamples_runs_and_questions():
    from pg_analysis.recommend import bootstrap_accuracy

    rng = np.random.default_rng(0)
    correct = {0: [rng.random(400) < 0.6, rng.random(400) < 0.4], 4: [np.ones(400)]}
    boot = bootstrap_accuracy(correct, n_boot=4000, seed=1)
    assert boot[4].min() == 1.0  # all correct: no resample changes it
    a, b = np.mean(correct[0][0]), np.mean(correct[0][1])
    assert boot[0].mean() == pytest.approx((a + b) / 2, abs=0.01)
    # between-run spread dominates: a replicate often holds one run twice (each with prob. 1/4)
    assert np.mean(boot[0] > a - 0.03) == pytest.approx(0.25, abs=0.04)
    assert np.array_equal(boot[0], bootstrap_accuracy(correct, n_boot=4000, seed=1)[0])


def test_validate_proxies_finds_a_predicting_risk_and_rejects_noise():
    from pg_analysis.recommend import frontier_check, validate_proxies

    rng = np.random.default_rng(0)
    acc = {0: 0.60, 2: 0.58, 4: 0.55, 8: 0.45, 12: 0.35, 16: 0.30}  # accuracy falls with L
    correct = {layer: [rng.random(400) < a for _ in range(2)] for layer, a in acc.items()}
    risks = {"good": {2: 0.05, 4: 0.1, 8: 0.3, 12: 0.6, 16: 0.8},
             "reversed": {2: 0.8, 4: 0.6, 8: 0.3, 12: 0.1, 16: 0.05},
             "sparse": {2: 0.1, 4: float("nan"), 8: float("nan"), 12: float("nan"), 16: 0.3}}
    v = validate_proxies(risks, correct, n_boot=500)
    assert v["proxies"]["good"]["predicts"] and v["proxies"]["good"]["rho"] > 0.8
    assert not v["proxies"]["reversed"]["predicts"] and v["proxies"]["reversed"]["rho"] < -0.8
    assert not v["proxies"]["sparse"]["predicts"] and v["proxies"]["sparse"]["rho"] is None
    rows = {r["layer"]: r for r in v["table"]}
    assert rows[0]["drop"] == 0 and rows[16]["drop"] > 0.2
    assert rows[8]["interval"][0] < rows[8]["accuracy"] < rows[8]["interval"][1]
    saving = {0: 0.0, 2: 0.05, 4: 0.1, 8: 0.2, 12: 0.35, 16: 0.5}
    assert frontier_check(4, saving, v["table"])["on_frontier"]
    assert frontier_check(0, saving, v["table"])["on_frontier"]  # within one interval of L = 2's accuracy
    worse = [dict(r, accuracy=0.2, interval=[0.15, 0.25]) if r["layer"] == 8 else r for r in v["table"]]
    assert frontier_check(8, saving, worse) == {"layer": 8, "trained": True, "on_frontier": False,
                                                "dominated_by": [12, 16]}
    assert frontier_check(6, saving, v["table"])["trained"] is False
    with pytest.raises(InputError, match="no L = 0"):
        validate_proxies(risks, {4: correct[4]})
    # one run at a layer: the interval leaves the seed spread out, so it reports ρ but cannot certify the proxy
    one = {**correct, 12: correct[12][:1]}
    v1 = validate_proxies(risks, one, n_boot=500)
    assert not v1["proxies"]["good"]["predicts"] and v1["proxies"]["good"]["rho"] > 0.8
    assert v1["proxies"]["good"]["interval"][0] > 0 and "one run at L = 12" in v1["proxies"]["good"]["why"]
    assert "why" not in v["proxies"]["good"]
    # a proxy that ranks the layers right but forbids one the sweep shows free (L = 2, within L = 0's interval)
    # predicts, yet does not gate; without a tolerance nothing is checked
    risks["alarmist"] = {2: 0.55, 4: 0.56, 8: 0.6, 12: 0.62, 16: 0.65}
    vt = validate_proxies(risks, correct, n_boot=500, tolerance=0.25)
    assert vt["free_layers"] == [2, 4] and vt["proxies"]["good"]["gates"]
    alarm = vt["proxies"]["alarmist"]
    assert alarm["predicts"] and not alarm["gates"] and "forbids L = 2, 4" in alarm["why"]
    assert validate_proxies(risks, correct, n_boot=500)["proxies"]["alarmist"]["gates"]
