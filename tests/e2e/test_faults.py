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

    def main(args: argparse.Namespace) -> int:
        with atomic_output_dir(out) as tmp:
            (tmp / "half.json").write_text("{")
            os.kill(os.getpid(), sig)  # delivered at the next bytecode, inside the block
            (tmp / "never.json").write_text("{}")
        return 0

    assert run_cli(main, Parser(prog="pg-x"), []) == 130
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
