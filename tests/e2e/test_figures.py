"""figures/make_figures.py regenerates every figure from saved results, with torch and transformers unimportable."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# an import hook that refuses torch and transformers (a sys.modules = None entry would confuse scipy's probes)
BLOCK = """
import sys, runpy
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(name + " is blocked: figures never load a model")
sys.meta_path.insert(0, Refuse())
sys.argv = ["make_figures.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def _eval(layer, acc):
    rec = lambda a: {"accuracy": a, "ci95": [a - 0.05, a + 0.05], "n": 99}  # noqa: E731
    return {"insert_layer": layer, "mcq": {c: rec(acc) for c in ("image", "no_image", "shuffled")},
            "rank4": {c: rec(acc) for c in ("image", "no_image", "shuffled")},
            "efficiency": {"measured_ratio": 1 - layer / 40, "predicted_ratio": 1 - layer / 30},
            "training": {"throughput": {"stage2": {"tokens_per_s": 300.0}}, "peak_rss_mib": 2048}}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_make_figures_from_saved_results_only(tmp_path):
    runs = tmp_path / "runs"
    table = []
    for layer, acc in ((0, 0.5), (4, 0.45), (8, 0.3)):
        _write(runs / "sweep" / f"L{layer}-s0" / "eval" / "eval.json", _eval(layer, acc))
        table.append({"layer": layer, "runs": 1, "saving": layer / 30, "accuracy": acc,
                      "interval": [acc - 0.05, acc + 0.05]})
    _write(runs / "sweep-result" / "sweep.json", {"table": table, "shape": {"text": 88, "vision": 576},
                                                  "runs": [str(runs / "sweep" / f"L{x}-s0") for x in (0, 4, 8)]})
    grid = np.random.default_rng(0).random((4, 6))
    _write(runs / "align" / "alignment.json",
           {"vision": "v", "llm": "l", "metric": "mutual_knn", "k": 10, "n_samples": 64, "grid": grid.tolist(),
            "best": {"vision_layer": 1, "llm_layer": 2, "score": float(grid[1, 2])}})
    for name, modality in (("align-cnn", "image"), ("align-molecule", "molecule")):  # Fig. 5 compares pg-align runs
        _write(runs / name / "alignment.json",
               {"vision": name, "llm": "l", "metric": "mutual_knn", "n_samples": 64, "modality": modality,
                "llm_layer_profile": [0.1, None, 0.2, 0.3, 0.25, 0.3], "null": {"mean": 0.05}})
    (runs / "attnmap").mkdir(parents=True)
    np.save(runs / "attnmap" / "attention.npy", np.random.default_rng(1).random((5, 16)).astype(np.float32))
    _write(runs / "attnmap" / "attnmap.json", {"vlm": "tiny", "n_prompts": 8, "query": "text", "insert_layer": 0,
                                              "profile": [1.0] * 5, "shown_tokens": list(range(0, 16, 2)),
                                              "skip_layers": 2})
    log = [{"stage": s, "step": i, "loss": 1.0 / (i + 1)} for s in (1, 2) for i in range(12)]
    (runs / "train-L0").mkdir()
    (runs / "train-L0" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    _write(runs / "train-L0" / "eval" / "eval.json", _eval(0, 0.5))
    _write(runs / "recommend" / "recommend.json",
           {"recommended_layer": 4, "rule": {"tolerance": 0.25, "risks_used": ["attention_lost"]},
            "table": [{"layer": L, "saving": L / 30, "attention_lost": L / 10, "admissible": L <= 4}
                      for L in (0, 4, 8)]})
    out = tmp_path / "figs"
    script = str(ROOT / "figures" / "make_figures.py")
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(script=script), "--runs", str(runs), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in ("fig1_tradeoff.png", "fig2_alignment.png", "fig3_attention.png", "fig6_attention_all.png",
                 "fig3_profile.png", "fig7_loss.png", "table4.md", "recommend.png", "fig5_profiles.png"):
        assert (out / name).is_file(), name
    table = (out / "table4.md").read_text()
    assert "| sweep/L4-s0 | 4 | 0.450 |" in table and "| train-L0 | 0 | 0.500 |" in table
    assert "skipped" not in proc.stdout
