"""A trained sweep over the insert layer: ``pg-train`` runs of one recipe at several L and seeds, each evaluated by
``pg-eval``, collected into one table (``pg-sweep``). It is the ground truth the training-free proxies are
validated against (:func:`pg_analysis.recommend.validate_proxies`) and the points of the Fig. 1-style trade-off.

A run is a folder holding ``run.json`` (written by ``pg-train``) and ``eval/eval.json`` (``pg-eval``); the folders
given are searched one level down. Runs still training or not yet evaluated are counted as pending and left out.
All runs must share one recipe: every training option apart from the layer, the seed and the options a resumed run
may change (``config.RESUME_FREE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pg_analysis.errors import InputError
from pg_analysis.recommend import validate_proxies
from pg_analysis.runs import EVAL_DIR, EVAL_RESULT, read_result_json, read_run_record

from .config import RESUME_FREE

#: options that may differ between the runs of one sweep
SWEEP_FREE = ("layer", "seed", *RESUME_FREE)


@dataclass
class SweepRun:
    """One trained and evaluated run."""

    path: str
    layer: int
    seed: int
    recipe: dict[str, Any]  # the training options that must agree across the sweep
    correct: list[int]  # per held-out MCQ question (image), 1 = right
    mcq: float
    no_image: float
    shuffled: float
    rank4: float | None
    tokens_per_s: float | None  # stage 2, median over steps
    train_seconds: float | None
    prefill_ratio: float | None  # measured prefill time vs L = 0, at the trained prompts' shape
    text_tokens: float | None
    vision_tokens: int | None


def _run_folders(roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        if not root.is_dir():
            raise InputError(f"{root}: no such sweep folder")
        found += [root] if (root / "run.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    return found


def read_run(folder: Path) -> SweepRun | None:
    """The run at ``folder``; None when it is not (yet) a trained and evaluated ``pg-train`` run."""
    record = read_run_record(folder)
    if not record or record.get("command") != "pg-train" or not (folder / EVAL_DIR / EVAL_RESULT).is_file():
        return None
    ev = read_result_json(folder / EVAL_DIR, EVAL_RESULT, "pg-eval", keys=("mcq", "insert_layer"))
    image = ev["mcq"]["image"]
    if "correct" not in image:
        raise InputError(f"{folder}/eval/eval.json has no per-question results; run pg-eval on it again")
    cfg = record["config"]
    training = ev.get("training") or {}
    stage2 = ((training.get("throughput") or {}).get("stage2") or {})
    eff = ev.get("efficiency") or {}
    rank4 = (ev.get("rank4") or {}).get("image", {}).get("accuracy")
    return SweepRun(str(folder), int(cfg["layer"]), int(cfg["seed"]),
                    {k: v for k, v in cfg.items() if k not in SWEEP_FREE}, list(image["correct"]),
                    image["accuracy"], ev["mcq"]["no_image"]["accuracy"], ev["mcq"]["shuffled"]["accuracy"], rank4,
                    stage2.get("tokens_per_s"), training.get("run_seconds"), eff.get("measured_ratio"),
                    eff.get("text_tokens"), eff.get("vision_tokens"))


def collect(roots: list[str | Path]) -> tuple[list[SweepRun], list[str]]:
    """The sweep's evaluated runs and the folders still pending. One clear error when the runs are of different
    recipes, or when one (layer, seed) appears twice."""
    runs, pending = [], []
    for folder in _run_folders([Path(r) for r in roots]):
        run = read_run(folder)
        if run is None:
            pending.append(str(folder))
        else:
            runs.append(run)
    if not runs:
        raise InputError(f"no evaluated pg-train runs under {', '.join(map(str, roots))}")
    first = runs[0]
    for run in runs[1:]:
        diff = sorted(k for k in set(first.recipe) | set(run.recipe) if first.recipe.get(k) != run.recipe.get(k))
        if diff:
            k = diff[0]
            raise InputError(f"the sweep mixes recipes: {first.path} and {run.path} differ in {k} "
                             f"({first.recipe.get(k)!r} vs {run.recipe.get(k)!r}); a sweep varies only L and the seed")
    seen: dict[tuple[int, int], str] = {}
    for run in runs:
        key = (run.layer, run.seed)
        if key in seen:
            raise InputError(f"L = {run.layer}, seed {run.seed} twice: {seen[key]} and {run.path}")
        seen[key] = run.path
    return sorted(runs, key=lambda r: (r.layer, r.seed)), pending


def correct_by_layer(runs: list[SweepRun]) -> dict[int, list[np.ndarray]]:
    """Layer → each run's per-question 0/1 vector: what :func:`~pg_analysis.recommend.validate_proxies` takes."""
    correct: dict[int, list[np.ndarray]] = {}
    for run in runs:
        correct.setdefault(run.layer, []).append(np.array(run.correct))
    return correct


def summarize(runs: list[SweepRun], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per layer: runs, seeds, MCQ mean with its bootstrap interval over seeds and questions, the controls,
    4-way ranking, stage-2 tokens/s, training seconds and the measured prefill ratio (means over the runs)."""
    correct = correct_by_layer(runs)
    if 0 not in correct:
        raise InputError("the sweep has no L = 0 runs (the baseline every drop is measured against)")
    table = validate_proxies({}, correct, n_boot=n_boot, seed=seed)["table"]

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    for row in table:
        mine = [r for r in runs if r.layer == row["layer"]]
        row.update(seeds=[r.seed for r in mine], mcq_per_seed=[r.mcq for r in mine],
                   no_image=mean([r.no_image for r in mine]), shuffled=mean([r.shuffled for r in mine]),
                   rank4=mean([r.rank4 for r in mine]), tokens_per_s=mean([r.tokens_per_s for r in mine]),
                   train_seconds=mean([r.train_seconds for r in mine]),
                   prefill_ratio=mean([r.prefill_ratio for r in mine]),
                   half_width=(row["interval"][1] - row["interval"][0]) / 2)
    return {"table": table, "recipe": runs[0].recipe, "runs": [r.path for r in runs], "n_boot": n_boot,
            "trained_shape": {"text": mean([r.text_tokens for r in runs]), "vision": runs[0].vision_tokens},
            "correct": {str(k): [v.tolist() for v in vs] for k, vs in correct.items()}}


def predicted_savings(run: str | Path, layers: list[int], shape: tuple[int, int]) -> dict[int, float]:
    """``1 − FLOPs(L) / FLOPs(0)`` of a prefill of ``shape`` (text, vision rows) for the LM of the run at ``run``,
    built on the meta device from its saved configuration (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pg_analysis.runs import model_folder

    from .bench import FlopModel
    from .configuration_grounded_llava import GroundedLlavaConfig

    folder = model_folder(Path(run))
    if folder is None:
        raise InputError(f"{run}: no model folder to read the LM's shape from")
    config = GroundedLlavaConfig.from_pretrained(folder)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config.text_config)
    flops = FlopModel.of(lm)
    return {layer: 1.0 - flops.prefill_ratio(shape[0], shape[1], layer) for layer in layers}
