"""pg-sweep: collecting a trained insert-layer sweep (fake run folders; no training)."""

import json

import numpy as np
import pytest

from pg_analysis.errors import InputError
from tests.sweeps import fake_run as _run


def test_collect_and_summarize_a_sweep(tmp_path, tiny_vlm_dir):
    from pg_train.sweep import collect, predicted_savings, summarize

    for layer, accs in {0: (0.6, 0.5), 1: (0.55, 0.45), 2: (0.3, 0.35)}.items():
        for seed, acc in enumerate(accs):
            _run(tmp_path / "sweep", layer, seed, tiny_vlm_dir, acc)
    _run(tmp_path / "sweep", 3, 0, tiny_vlm_dir, 0.3, evaluated=False)
    runs, pending = collect([tmp_path / "sweep"])
    assert [(r.layer, r.seed) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert pending == [str(tmp_path / "sweep" / "L3-s0")]
    s = summarize(runs, n_boot=300)
    rows = {r["layer"]: r for r in s["table"]}
    assert rows[0]["accuracy"] == pytest.approx(0.55) and rows[2]["drop"] == pytest.approx(0.225)
    assert rows[1]["mcq_per_seed"] == [0.55, 0.45] and rows[1]["seeds"] == [0, 1]
    assert rows[2]["interval"][0] < rows[2]["accuracy"] < rows[2]["interval"][1]
    assert rows[2]["prefill_ratio"] == pytest.approx(0.8) and rows[0]["tokens_per_s"] == 400.0
    saving = predicted_savings(runs[0].path, [0, 1, 3], (88, 576))
    assert saving[0] == 0 and 0 < saving[1] < saving[3] < 1


def test_a_sweep_of_mixed_recipes_or_twice_the_same_run_is_one_clear_error(tmp_path, tiny_vlm_dir):
    from pg_train.cli import sweep
    from pg_train.sweep import collect

    _run(tmp_path / "a", 0, 0, tiny_vlm_dir, 0.5)
    _run(tmp_path / "a", 2, 0, tiny_vlm_dir, 0.5, lr=1e-4)
    with pytest.raises(InputError, match="mixes recipes.*stage2_lr"):
        collect([tmp_path / "a"])
    _run(tmp_path / "b", 0, 0, tiny_vlm_dir, 0.5)
    with pytest.raises(InputError, match="seed 0 twice"):
        collect([tmp_path / "b", tmp_path / "b" / "L0-s0"])
    with pytest.raises(InputError, match="no evaluated"):
        collect([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])
    assert sweep([str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_pg_sweep_writes_the_table_and_the_tradeoff(tmp_path, tiny_vlm_dir, capsys):
    from pg_train.cli import sweep

    rng = np.random.default_rng(0)
    for layer in (0, 1, 2):
        for seed in (0, 1):
            _run(tmp_path / "sweep", layer, seed, tiny_vlm_dir, 0.6 - 0.1 * layer + 0.05 * rng.random())
    bench = tmp_path / "bench"
    bench.mkdir()
    rows = [{"insert_layer": layer, "exit_layer": 3, "prefill_ratio": 1 - 0.2 * layer} for layer in (0, 1, 2)]
    (bench / "bench.json").write_text(json.dumps({"config": {"text_tokens": 88, "vision_tokens": 576},
                                                  "n_layers": 3, "rows": rows}))
    assert sweep([str(tmp_path / "sweep"), "--out", str(tmp_path / "bad"), "--bench", str(bench), "--shape",
                  "20,100"]) == 2  # measured at another shape
    assert sweep([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--n-boot", "200", "--bench",
                  str(bench)]) == 0
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["prefill_ratio_at_shape"] for r in result["table"]] == [1.0, 0.8, 0.6]
    assert [r["layer"] for r in result["table"]] == [0, 1, 2] and result["shape"] == {"text": 88, "vision": 576}
    assert result["table"][0]["saving"] == 0 and result["table"][2]["saving"] > result["table"][1]["saving"]
    assert (tmp_path / "out" / "tradeoff.png").is_file() and (tmp_path / "out" / "run.json").is_file()
    assert "interval" in capsys.readouterr().out
