"""pg-attnmap as a command on tiny VLMs: outputs, figures, bad input, an HF LLaVA checkpoint."""

import json

import numpy as np
import pytest

from pg_analysis.attention import AttnmapConfig
from pg_analysis.errors import InputError


def test_pg_attnmap_end_to_end_and_bad_input(tiny_vlm_dir, tiny_pairs, tmp_path, capsys):
    from pg_analysis.attention import load_attnmap
    from pg_train.cli import attnmap

    out = tmp_path / "am"
    assert attnmap(["--vlm", str(tiny_vlm_dir), "--data", str(tiny_pairs), "--n", "10", "--show-tokens", "3",
                    "--skip-layers", "1", "--out", str(out), "--quiet"]) == 0
    for name in ("attention.npy", "attnmap.json", "run.json", "attention_all.png", "attention_skip1.png",
                 "profile.png"):
        assert (out / name).is_file(), name
    res = load_attnmap(out)
    assert res["attention"].shape == (3, 4) and res["n_prompts"] == 10 and len(res["shown_tokens"]) == 3
    assert np.allclose(res["profile"], res["attention"].sum(1), atol=1e-6)
    assert json.loads((out / "run.json").read_text())["config"]["n"] == 10
    capsys.readouterr()
    assert attnmap(["--vlm", str(tmp_path / "missing"), "--data", str(tiny_pairs), "--out", str(tmp_path / "x"),
                    "--quiet"]) == 2
    assert attnmap(["--vlm", str(tiny_vlm_dir), "--n", "0", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("pg-attnmap: error:") for line in err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(InputError):
        AttnmapConfig(backend="tl")


def test_pg_attnmap_on_an_hf_llava_checkpoint(tiny_hf_llava, tiny_pairs, tmp_path):
    """An HF LLaVA folder (the --vlm llava path): vicuna_v1 prompts, 16 CLIP patch tokens, both backends equal."""
    from pg_analysis.attention import load_attnmap
    from pg_train.cli import attnmap

    folder, _ = tiny_hf_llava
    for backend in ("hf", "nnsight"):
        assert attnmap(["--vlm", str(folder), "--data", str(tiny_pairs), "--n", "6", "--backend", backend,
                        "--out", str(tmp_path / backend), "--quiet"]) == 0
    a, b = load_attnmap(tmp_path / "hf"), load_attnmap(tmp_path / "nnsight")
    assert a["attention"].shape == (3, 16)
    np.testing.assert_allclose(a["attention"], b["attention"], atol=1e-6)
    assert json.loads((tmp_path / "hf" / "run.json").read_text())["template"] == "vicuna_v1"
