"""The insert-layer rule, its evidence, pg-recommend and pg-train --layer auto."""

import json

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


@pytest.fixture(scope="module")
def evidence(tiny_vlm_dir, tiny_pairs, tmp_path_factory):
    """A pg-attnmap result and an alignment.json for the tiny 3-layer VLM."""
    from pg_train.cli import attnmap

    root = tmp_path_factory.mktemp("evidence")
    assert attnmap(["--vlm", str(tiny_vlm_dir), "--data", str(tiny_pairs), "--n", "8", "--skip-layers", "0",
                    "--out", str(root / "attnmap"), "--quiet"]) == 0
    (root / "align").mkdir()
    (root / "align" / "alignment.json").write_text(json.dumps(
        {"vision": "tiny", "llm": "tiny", "metric": "mutual_knn", "n_samples": 8, "llm_layer_profile": [0.1, 0.2, 0.3, 0.4]}))
    (root / "align5").mkdir()
    (root / "align5" / "alignment.json").write_text(json.dumps(
        {"vision": "tiny", "llm": "tiny", "metric": "mutual_knn", "n_samples": 8, "llm_layer_profile": [0.1] * 5}))
    return root


def test_pg_recommend_end_to_end(tiny_vlm_dir, tiny_pairs, evidence, tmp_path, capsys):
    from pg_train.cli import recommend as recommend_cli
    from pg_analysis.recommend import load_recommendation

    out = tmp_path / "rec"
    args = ["--vlm", str(tiny_vlm_dir), "--data", str(tiny_pairs), "--n", "8", "--align", str(evidence / "align"),
            "--attnmap", str(evidence / "attnmap"), "--skip-layers", "0", "--precision", "fp32", "--quiet"]
    assert recommend_cli([*args, "--tolerance", "1.0", "--out", str(out)]) == 0
    rec = load_recommendation(out)
    assert rec["recommended_layer"] == 3  # tolerance 1 admits every layer
    assert [r["layer"] for r in rec["table"]] == [0, 1, 2, 3]
    row0 = rec["table"][0]
    assert row0["answers_changed"] == 0 and row0["kl"] == pytest.approx(0, abs=1e-9) and row0["saving"] == 0
    assert all(0 < r["saving"] < 1 for r in rec["table"][1:])
    assert set(rec["evidence"]) == {"alignment", "attention", "probe"}
    assert (out / "recommend.png").is_file() and (out / "run.json").is_file()
    assert "recommended insert layer: L = 3" in capsys.readouterr().out
    assert recommend_cli([*args, "--tolerance", "0", "--out", str(tmp_path / "rec0")]) == 0
    assert load_recommendation(tmp_path / "rec0")["recommended_layer"] == 0
    capsys.readouterr()
    bad = [a if a != str(evidence / "align") else str(evidence / "align5") for a in args]
    assert recommend_cli([*bad, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mismatched layer counts" in err[0] and not (tmp_path / "bad").exists()


def test_pg_train_layer_auto_reads_or_refuses(tiny_models, tiny_pairs, tiny_vlm_dir, evidence, tmp_path, capsys):
    from pg_train.cli import train_cli

    common = ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]), "--data", str(tiny_pairs),
              "--vision-pool", "2", "--stage0-steps", "1", "--stage1-steps", "1", "--stage2-steps", "1",
              "--batch-size", "4", "--precision", "fp32", "--cache-dir", str(tmp_path / "features"), "--quiet"]
    # nothing saved and nothing to compute from: one clear line, exit 2, nothing written
    assert train_cli(["--layer", "auto", "--out", str(tmp_path / "a"), "--recommendation", str(tmp_path / "none"),
                      "--baseline", str(tmp_path / "no-baseline"), "--align-result", str(tmp_path / "no-align"),
                      "--attnmap", str(tmp_path / "no-attn"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layer auto" in err[0] and "no-baseline" in err[0]
    assert not (tmp_path / "a").exists()
    # computed from the saved evidence (written to --recommendation), recorded in the run config
    rec_dir = tmp_path / "recommend"
    assert train_cli(["--layer", "auto", "--out", str(tmp_path / "b"), "--recommendation", str(rec_dir),
                      "--baseline", str(tiny_vlm_dir), "--align-result", str(evidence / "align"),
                      "--attnmap", str(evidence / "attnmap"), *common]) == 0
    rec = json.loads((rec_dir / "recommend.json").read_text())
    cfg = json.loads((tmp_path / "b" / "run.json").read_text())
    assert cfg["config"]["layer"] == rec["recommended_layer"] and cfg["layer_auto"]["table"] == rec["table"]
    assert "--layer auto: L =" in capsys.readouterr().out
