"""pg-align end to end on tiny local models, and every bad input: one line on stderr, exit 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pg_analysis.cli import align
from pg_analysis.errors import InputError, ModelUnavailable
from pg_analysis.models import resolve_source
from pg_analysis.registry import MODELS, resolve_model


def _args(tiny_models, tiny_pairs, out, *extra):
    return ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]), "--data", str(tiny_pairs),
            "--k", "3", "--null", "3", "--quiet", "--out", str(out), *extra]


def test_pg_align_tiny_end_to_end(tiny_models, tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    assert align(_args(tiny_models, tiny_pairs, out, "--cache-dir", str(cache))) == 0
    text = capsys.readouterr().out
    assert "best cell" in text and "computed" in text
    grid = np.load(out / "grid.npy")
    assert grid.shape == (3, 4)  # Dinov2 emb+2 blocks × Llama emb+3 blocks
    assert np.load(out / "null.npy").shape == (3, 3, 4)
    summary = json.loads((out / "alignment.json").read_text())
    best = summary["best"]
    assert grid[best["vision_layer"], best["llm_layer"]] == pytest.approx(np.nanmax(grid))
    # the embeddings output's CLS row is one vector for every image: not scored, named, hatched
    assert np.isnan(grid[0]).all() and np.isfinite(grid[1:]).all()
    assert summary["degenerate"]["vision"]["0"].startswith("constant rows") and best["vision_layer"] != 0
    assert "not scored: vision layer 0" in text and "duplicates:" in text
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["config"]["k"] == 3 and "torch" in cfg["versions"] and "git_commit" in cfg
    assert (out / "heatmap.png").stat().st_size > 1000
    # second run reads the cache and gives the same grid
    assert align(_args(tiny_models, tiny_pairs, out, "--cache-dir", str(cache))) == 0
    assert "vision cached, text cached" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out / "grid.npy"), grid)


def _expect_exit2(argv, capsys, out, match):
    assert align(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pg-align: error:"), err
    assert match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_unknown_alias(tiny_models, tiny_pairs, tmp_path, capsys):
    out = tmp_path / "o"
    argv = _args(tiny_models, tiny_pairs, out)
    argv[1] = "nonexistent-model"
    _expect_exit2(argv, capsys, out, "unknown vision model 'nonexistent-model'")


def test_hub_model_unavailable_offline(tiny_models, tiny_pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    argv = _args(tiny_models, tiny_pairs, out)
    argv[1] = "clip"
    _expect_exit2(argv, capsys, out, "openai/clip-vit-large-patch14-336")


def test_hub_error_message_names_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="local folder"):
        resolve_source(MODELS["vicuna"])
    with pytest.raises(ModelUnavailable, match="some-org/some-model"):
        resolve_source(resolve_model("some-org/some-model", "lm"))


@pytest.mark.parametrize("extra,match", [
    (["--k", "24"], "k must be < number of samples"),
    (["--k", "0"], "k must be >= 1"),
    (["--n", "50"], "only 24"),
    (["--metric", "cka", "--null", "-1"], "null must be >= 0"),
])
def test_bad_numbers(tiny_models, tiny_pairs, tmp_path, capsys, extra, match):
    out = tmp_path / "o"
    _expect_exit2(_args(tiny_models, tiny_pairs, out, *extra), capsys, out, match)


def test_empty_caption_and_corrupt_image(tiny_models, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [{"image": "ok.png", "caption": f"a cat {i}"} for i in range(6)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"image": "ok.png", "caption": " "}]))
    out = tmp_path / "o"
    _expect_exit2(_args(tiny_models, empty, out), capsys, out, "empty caption")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"image": "bad.png", "caption": "a dog"}]))
    _expect_exit2(_args(tiny_models, corrupt, out, "--cache-dir", str(tmp_path / "c")), capsys, out, "bad.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_nonroot(tiny_models, tiny_pairs, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    _expect_exit2(_args(tiny_models, tiny_pairs, ro / "out"), capsys, ro / "out", "cannot be written")


def test_output_path_is_a_file(tiny_models, tiny_pairs, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert align(_args(tiny_models, tiny_pairs, f / "out")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc here")
def test_output_under_proc_is_refused_before_any_work(tiny_models, tiny_pairs, tmp_path, capsys):
    # root passes every permission check there; only trying to create a folder tells
    _expect_exit2(_args(tiny_models, tiny_pairs, Path("/proc/pg-align-test"), "--cache-dir", str(tmp_path / "c")),
                  capsys, Path("/proc/pg-align-test"), "cannot be written")
    assert not (tmp_path / "c").exists()  # refused before any feature was computed


def test_nan_features_rejected():
    import torch

    from pg_analysis.align import AlignConfig, score_features

    vf = torch.randn(2, 10, 4)
    vf[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        score_features(vf, torch.randn(3, 10, 4), AlignConfig(k=3, null=0))
    with pytest.raises(InputError, match="different sample counts"):
        score_features(torch.randn(2, 10, 4), torch.randn(3, 11, 4), AlignConfig(k=3, null=0))


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from pg_analysis.cli import align_main; align_main()",
                           "--vision", "nope", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_images_replaced_in_place_are_encoded_again(tiny_models, tiny_pairs, tmp_path, capsys):
    import shutil

    from PIL import Image

    data = tmp_path / "pairs"
    shutil.copytree(tiny_pairs.parent, data)
    pairs, cache = data / tiny_pairs.name, tmp_path / "cache"
    assert align(_args(tiny_models, pairs, tmp_path / "a", "--cache-dir", str(cache))) == 0
    capsys.readouterr()
    Image.new("RGB", (10, 12), (1, 2, 3)).save(data / "img05.png")  # same path, other picture
    assert align(_args(tiny_models, pairs, tmp_path / "b", "--cache-dir", str(cache))) == 0
    assert "vision computed, text cached" in capsys.readouterr().out


def test_cache_folder_that_is_a_file_is_one_line(tiny_models, tiny_pairs, tmp_path, capsys):
    (tmp_path / "cache").write_text("x")
    _expect_exit2(_args(tiny_models, tiny_pairs, tmp_path / "out", "--cache-dir", str(tmp_path / "cache")), capsys,
                  tmp_path / "out", "is a file, not a folder")
