"""pg-bench as a command on a tiny model."""

import json

from pg_train.cli import bench


def test_pg_bench_cli_writes_and_rejects(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_models["llama"]), "--text-tokens", "4", "--vision-tokens", "4", "--repeats", "1",
            "--decode-tokens", "1", "--device", "cpu", "--quiet", "--out", str(out)]
    assert bench(argv + ["--layers", "0,2"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert [r["insert_layer"] for r in data["rows"]] == [0, 2]
    assert (out / "efficiency.png").stat().st_size > 1000
    bad = tmp_path / "bad"
    assert bench(argv[:-1] + [str(bad), "--layers", "0,9"]) == 2
    err = capsys.readouterr().err
    assert "insert layer 9 outside [0, 3]" in err and "Traceback" not in err
    assert not bad.exists()
