"""Fake trained-sweep run folders (run.json, eval/eval.json, model/) for tests that need no training."""

import json
import shutil


def fake_run(root, layer, seed, tiny_vlm_dir, acc, lr=2e-4, evaluated=True, n=40):
    folder = root / f"L{layer}-s{seed}"
    (folder / "eval").mkdir(parents=True)
    shutil.copytree(tiny_vlm_dir, folder / "model")
    cfg = {"layer": layer, "seed": seed, "out_dir": str(folder), "stage2_lr": lr, "progress": False}
    (folder / "run.json").write_text(json.dumps({"command": "pg-train", "config": cfg}))
    if evaluated:
        k = round(acc * n)
        image = {"accuracy": k / n, "n": n, "correct": [1] * k + [0] * (n - k)}
        ev = {"insert_layer": layer,
              "mcq": {"image": image, "no_image": {"accuracy": 0.25}, "shuffled": {"accuracy": 0.26}},
              "rank4": {"image": {"accuracy": acc - 0.1}},
              "efficiency": {"measured_ratio": 1.0 - layer / 10, "text_tokens": 70.0, "vision_tokens": 4},
              "training": {"run_seconds": 600.0 + layer, "throughput": {"stage2": {"tokens_per_s": 400.0}}}}
        (folder / "eval" / "eval.json").write_text(json.dumps(ev))
    return folder
