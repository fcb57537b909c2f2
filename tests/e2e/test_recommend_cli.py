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
