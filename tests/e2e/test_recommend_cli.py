"""pg-recommend and pg-train --layer auto as commands on tiny models."""

import json

import pytest


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
    assert recommend_cli([*args, "--tolerance", "1.0", "--probe", "--out", str(out)]) == 0
    rec = load_recommendation(out)
    assert rec["recommended_layer"] == 3  # tolerance 1 admits every layer
    assert [r["layer"] for r in rec["table"]] == [0, 1, 2, 3]
    row0 = rec["table"][0]
    assert row0["answers_changed"] == 0 and row0["kl"] == pytest.approx(0, abs=1e-9) and row0["saving"] == 0
    assert row0["entry_changed"] == 0 and row0["entry_kl"] == 0  # nothing knocked out below L = 0
    assert rec["table"][3]["entry_kl"] == 1.0  # blind in every layer: the whole KL
    assert [r["exit_layer"] for r in rec["exit_knockout"]] == [0, 1, 2, 3] and rec["exit_knockout"][3]["kl"] == 0
    assert all(0 < r["saving"] < 1 for r in rec["table"][1:])
    assert rec["shape"] == {"text": 88, "vision": 576} and not rec["rule"]["validated"]
    assert set(rec["evidence"]) == {"alignment", "attention", "proxies"}
    assert set(rec["evidence"]["proxies"]["seconds"]) == {"entry_knockout", "exit_knockout", "insertion_probe"}
    assert (out / "recommend.png").is_file() and (out / "run.json").is_file()
    assert "recommended insert layer: L = 3" in capsys.readouterr().out
    assert recommend_cli([*args, "--tolerance", "0", "--out", str(tmp_path / "rec0")]) == 0
    assert load_recommendation(tmp_path / "rec0")["recommended_layer"] == 0
    capsys.readouterr()
    bad = [a if a != str(evidence / "align") else str(evidence / "align5") for a in args]
    assert recommend_cli([*bad, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mismatched layer counts" in err[0] and not (tmp_path / "bad").exists()
    # gating risks that these options cannot measure: refused before any forward pass
    unmeasured = ["--vlm", "/no/such/model", "--align", "none", "--attnmap", "none", "--quiet"]
    assert recommend_cli([*unmeasured, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the gating risks" in err[0] and "entry_kl" in err[0]
    assert not (tmp_path / "none").exists()


def test_pg_recommend_validates_the_proxies_against_a_sweep(tiny_vlm_dir, tiny_pairs, evidence, tmp_path, capsys):
    from pg_train.cli import recommend as recommend_cli
    from pg_analysis.recommend import load_recommendation
    from tests.sweeps import fake_run

    for layer, acc in {0: 0.6, 1: 0.5, 2: 0.4, 3: 0.3}.items():
        for seed in (0, 1):
            fake_run(tmp_path / "sweep", layer, seed, tiny_vlm_dir, acc + 0.02 * seed, n=200)
    args = ["--vlm", str(tiny_vlm_dir), "--data", str(tiny_pairs), "--n", "8", "--align", "none", "--attnmap",
            str(evidence / "attnmap"), "--skip-layers", "0", "--precision", "fp32", "--n-boot", "200", "--quiet",
            "--shape", "20,100", "--layers", "0,1"]
    assert recommend_cli([*args, "--sweep", str(tmp_path / "sweep"), "--out", str(tmp_path / "rec")]) == 0
    rec = load_recommendation(tmp_path / "rec")
    v = rec["validation"]
    assert [r["layer"] for r in rec["table"]] == [0, 1, 2, 3]  # every trained layer gets its proxies
    assert set(v["proxies"]) == {"attention_lost", "entry_changed", "entry_kl"}  # no insertion probe by default
    assert "answers_changed" not in rec["table"][1] and "insertion_probe" not in rec["evidence"]["proxies"]["seconds"]
    assert v["proxies"]["attention_lost"]["layers"] == [1, 2, 3]
    assert v["predicting"] == [k for k, p in v["proxies"].items() if p["predicts"]]
    assert v["gating"] == [k for k, p in v["proxies"].items() if p["gates"]]
    assert set(v["gating"]) <= set(v["predicting"])
    assert rec["rule"]["validated"] == bool(v["gating"])
    assert rec["rule"]["risks_used"] == (v["gating"] or ["attention_lost"])
    assert v["frontier"]["layer"] == rec["recommended_layer"] and v["frontier"]["trained"]
    assert rec["shape"] == {"text": 20, "vision": 100}
    out = capsys.readouterr().out
    assert "Spearman with the sweep's accuracy drop" in out and "frontier" in out
    fake_run(tmp_path / "mixed", 0, 0, tiny_vlm_dir, 0.5)
    fake_run(tmp_path / "mixed", 1, 0, tiny_vlm_dir, 0.5, lr=1e-3)
    assert recommend_cli([*args, "--sweep", str(tmp_path / "mixed"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixes recipes" in err[0] and not (tmp_path / "bad").exists()
    assert recommend_cli([*args, "--shape", "5", "--out", str(tmp_path / "bad")]) == 2


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
