"""Faults as a hostile user or a bad day makes them: each one line on stderr and exit code 2 (130 on a signal), and
nothing half-written or hidden left behind."""

import argparse
import json
import os
import signal

import pytest

from pg_analysis.cli import Parser, run_cli
from pg_analysis.errors import InputError
from pg_analysis.runinfo import atomic_output_dir


def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"{prog}: "), err
    return err


def test_bad_flags_are_one_line_not_a_usage_block(capsys):
    from pg_analysis.cli import align
    from pg_train.cli import bench, train_cli

    for fn, argv, prog in ((align, ["--metric", "nope"], "pg-align"), (train_cli, ["--layer", "abc"], "pg-train"),
                           (bench, ["--layers", ","], "pg-bench")):
        with pytest.raises(SystemExit) as exit_:
            fn(argv)
        assert exit_.value.code == 2
        assert "error:" in _one_line(capsys, prog)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_writing_leaves_no_temp_folder(tmp_path, capsys, sig):
    out = tmp_path / "result"
    # a shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def main(args: argparse.Namespace) -> int:
        with atomic_output_dir(out) as tmp:
            (tmp / "half.json").write_text("{")
            os.kill(os.getpid(), sig)  # delivered at the next bytecode, inside the block
            (tmp / "never.json").write_text("{}")
        return 0

    try:
        assert run_cli(main, Parser(prog="pg-x"), []) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _one_line(capsys, "pg-x") in ("pg-x: terminated", "pg-x: interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the result nor a hidden .result.*.tmp


def test_os_refusals_are_one_line(tmp_path, capsys):
    def main(args: argparse.Namespace) -> int:
        raise OSError(28, "No space left on device", str(tmp_path / "heatmap.png"))

    assert run_cli(main, Parser(prog="pg-x"), []) == 2
    assert _one_line(capsys, "pg-x") == f"pg-x: error: No space left on device ({tmp_path / 'heatmap.png'})"


def test_a_huge_image_is_refused_not_decoded(tmp_path, monkeypatch):
    from PIL import Image

    from pg_analysis.data import open_image

    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels is then a decompression bomb
    with pytest.raises(InputError, match="too large to decode safely"):
        open_image(tmp_path / "big.png")


def test_a_missing_local_folder_is_missing_not_a_hub_id(tmp_path, monkeypatch):
    from pg_analysis.registry import resolve_model

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no such folder: runs/train-L0"):
        resolve_model("runs/train-L0", "vlm")
    with pytest.raises(InputError, match="no such folder"):
        resolve_model("./train-L0", "vlm")
    assert resolve_model("lmsys/vicuna-7b-v1.5", "lm").hub_id == "lmsys/vicuna-7b-v1.5"


def test_torn_or_incomplete_saved_results_are_one_line(tmp_path, tiny_vlm_dir, capsys):
    from pg_analysis.recommend import load_recommendation
    from pg_train.cli import eval_cli

    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "recommend.json").write_text(json.dumps({"recommended_layer": 4}))
    with pytest.raises(InputError, match="lacks rule"):
        load_recommendation(rec)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"files": {"test_mcq": "a.json", ')  # torn write
    assert eval_cli([str(tiny_vlm_dir), "--data-dir", str(data), "--quiet", "--out", str(tmp_path / "ev")]) == 2
    assert "manifest" in _one_line(capsys, "pg-eval") and not (tmp_path / "ev").exists()


def test_a_damaged_converted_asset_is_converted_again(tmp_path, monkeypatch):
    from pg_analysis import assets

    builds = []

    def build(downloads, out):
        builds.append(1)
        (out / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (out / "config.json").write_text('{"a": 1}')
        return {"source": "test"}

    monkeypatch.setenv("PG_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(assets.ASSETS, "toy", assets.Asset("toy", "toy", build, "a test asset"))
    folder = assets.ensure_asset("toy")
    assert len(builds) == 1 and assets.ensure_asset("toy") == folder and len(builds) == 1  # intact: used as is
    weights = folder / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert assets.damaged_files("toy") == ["weights.bin"]
    assets.ensure_asset("toy")
    assert len(builds) == 2 and weights.stat().st_size == 256 * 64
    weights.write_bytes(b"\0" * (256 * 64))  # same size, other bytes: only the checksum sees it
    assets.ensure_asset("toy")
    assert len(builds) == 2  # sizes alone pass
    assets.ensure_asset("toy", verify=True)
    assert len(builds) == 3 and weights.read_bytes() == bytes(range(256)) * 64
    (folder / ".complete.json").write_text("{torn")
    assets.ensure_asset("toy")
    assert len(builds) == 4 and not list(tmp_path.glob(".toy.*.tmp"))


@pytest.mark.parametrize("where", ["disk full while drawing", "rename refused"])
def test_pg_align_write_failures_leave_nothing(tiny_models, tiny_pairs, tmp_path, capsys, monkeypatch, where):
    from pg_analysis import plots, runinfo
    from pg_analysis.cli import align

    if where == "disk full while drawing":
        def full(path, data):
            raise OSError(28, "No space left on device", str(path))
        monkeypatch.setattr(plots, "atomic_write_bytes", full)
    else:
        real_replace = os.replace

        def refuse(src, dst):
            if str(dst).endswith("out"):
                raise PermissionError(13, "Permission denied", str(dst))
            return real_replace(src, dst)
        monkeypatch.setattr(runinfo.os, "replace", refuse)
    out = tmp_path / "out"
    argv = ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]), "--data", str(tiny_pairs),
            "--k", "3", "--null", "2", "--quiet", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert align(argv) == 2
    # transformers keeps a logging handler on the stderr of the first test that used it, which pytest has closed
    # since; its "--- Logging error ---" reports are an artefact of running commands in-process
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pg-align")]
    assert len(ours) == 1, ours
    assert ("No space left on device" in ours[0]) if where.startswith("disk") else ("Permission denied" in ours[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_quiet_silences_every_bar(tiny_models, tmp_path):
    import subprocess
    import sys

    code = "import sys; from pg_train.cli import bench_main; sys.argv[0] = 'pg-bench'; bench_main()"
    args = ["--model", str(tiny_models["llama"]), "--layers", "0,1", "--repeats", "1", "--decode-tokens", "1",
            "--no-train", "--text-tokens", "8", "--vision-tokens", "4", "--out", str(tmp_path / "b")]
    quiet = subprocess.run([sys.executable, "-c", code, *args, "--quiet"], capture_output=True, text=True,
                           timeout=300)
    loud = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:]
    assert "Loading weights" in loud.stderr  # the bar exists …
    assert "it/s]" not in quiet.stderr and "Loading weights" not in quiet.stderr  # … and --quiet removes it
