"""Which insert layer L? The rule and its evidence (pure). The pipeline that gathers the evidence by running a
VLM — ``pg-recommend``, ``pg-train --layer auto`` — lives with the code that runs VLMs (``choose_layer``).

Evidence per candidate L (LM with N blocks; L = 0 … N):

- **saving(L)** — the predicted prefill-FLOP saving ``1 − FLOPs(L) / FLOPs(0)`` at a prompt shape (``pg-recommend
  --shape``, default the paper's 88 text + 576 vision rows);
- **attention_lost(L)** — from ``pg-attnmap``: the share of language→vision attention (per-layer totals, the
  first ``skip_layers`` blocks left out as in the paper's Fig. 3) that falls in blocks ``skip_layers … L−1``,
  which a grounded model removes;
- **alignment_deficit(L)** — from ``pg-align`` (the per-LM-layer profile, max over vision layers; index L is the
  input of block L, exactly where the vision rows enter): ``max(0, a(0) − a(L)) / (max a − min a)``, how much
  less the LM's layer-L space is aligned with the vision encoder than its input space (the Platonic argument
  says deeper is at least as aligned, so this is usually 0);
- **entry_changed(L)**, **entry_kl(L)** — the entry knockout on the trained baseline (L = 0): the text rows may
  not read the vision rows in blocks 0 … L−1 (the vision rows are still computed). The share of MCQ answers
  (argmax over A–D) that change, and the mean KL(p₀ ‖ p_L) of the answer distributions as a share of the KL when
  the text reads them nowhere (so both are fractions);
- **answers_changed(L)** — the insertion probe: the baseline's projected rows inserted at L as they are.

The exit knockout (VTW's rule: text blind to vision in blocks ≥ K) is the same measure at the other end of a
window; it is reported for K, not used for L.

**The rule.** Each risk is a fraction in [0, 1]. L is *admissible* when every gating risk that was measured is
≤ ``tolerance``. The recommendation is the largest L such that every L' ≤ L is admissible (the saving grows with
L, so this is the cheapest model whose whole path from L = 0 stays within tolerance). Missing evidence is left out
and named in the output; with none at all, it is an error.

**Which risks gate.** A proxy is worth gating on only where it predicts what training at L costs. Given a trained
sweep (``pg-recommend --sweep``), :func:`validate_proxies` measures each proxy's Spearman correlation with the
accuracy drop ``acc(0) − acc(L)``, with a bootstrap interval over seeds and questions; the proxies whose interval
lies above 0 predict, and those of them that admit every trained layer the sweep shows free (accuracy within
L = 0's interval) gate. Without a sweep, or when none gates, the paper's two observations gate (``DEFAULT_RISKS``)
and the output says the rule is unvalidated. The insertion probe never gated by default: on the offline pair it
changes ~60 % of answers at every L ≥ 1 (docs/experiments.md, 2026-11-22), also where trained models lose nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

RISKS = ("attention_lost", "alignment_deficit", "entry_changed", "entry_kl", "answers_changed")
DEFAULT_RISKS = ("attention_lost", "alignment_deficit")


def default_candidates(n_layers: int) -> list[int]:
    """0–4, 6, 8, then every 4th layer, and N: dense where the choice is usually made, sparse above."""
    return sorted({x for x in [0, 1, 2, 3, 4, 6, 8, *range(12, n_layers, 4), n_layers] if x <= n_layers})


# ----------------------------------------------------------------------------------------------------------------
# pure pieces


def attention_lost(profile: Any, skip_layers: int = 2) -> np.ndarray:
    """``[N+1]``: share of the per-layer vision attention ``profile [N]`` (blocks ≥ ``skip_layers``) in blocks
    ``skip_layers … L−1``, for L = 0 … N."""
    p = np.clip(np.asarray(profile, dtype=float), 0, None)
    n = len(p)
    if not 0 <= skip_layers < n:
        raise InputError(f"skip_layers must be in [0, {n - 1}] for {n} layers, got {skip_layers}")
    kept = p.copy()
    kept[:skip_layers] = 0
    total = kept.sum()
    if total <= 0:
        raise InputError("the attention profile has no attention to vision rows after the skipped layers")
    return np.concatenate([[0.0], np.cumsum(kept) / total])


def alignment_deficit(profile: Any) -> np.ndarray:
    """``[N+1]``: ``max(0, a(0) − a(L)) / (max a − min a)`` of the per-LM-layer alignment profile ``a``; NaN
    where ``a(L)`` is undefined (``None``: a layer pg-align could not score)."""
    a = np.array([np.nan if v is None else v for v in profile], dtype=float)
    if not np.isfinite(a).any():
        return a
    span = float(np.nanmax(a) - np.nanmin(a))
    if span <= 0:
        return np.where(np.isfinite(a), 0.0, np.nan)
    return np.clip(a[0] - a, 0, None) / span


def answer_shift(logits0: Any, logits: Any) -> tuple[float, float]:
    """``(share of argmax answers that differ, mean KL(p₀ ‖ p))`` between two ``[n, options]`` logit tables."""
    import torch

    a = torch.as_tensor(logits0, dtype=torch.float64)
    b = torch.as_tensor(logits, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"answer logits must be two equal [n, options] tables, got {tuple(a.shape)}, {tuple(b.shape)}")
    la, lb = a.log_softmax(1), b.log_softmax(1)
    kl = (la.exp() * (la - lb)).sum(1).mean()
    return float((a.argmax(1) != b.argmax(1)).double().mean()), float(kl)


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (≥ in both coordinates, > in one), by first coordinate."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: points[i][0])


def recommend(saving: dict[int, float], attention_profile: Any = None, alignment_profile: Any = None,
              proxies: dict[int, dict[str, float]] | None = None, tolerance: float = 0.25,
              skip_layers: int = 2, risks: tuple[str, ...] = DEFAULT_RISKS) -> dict[str, Any]:
    """Apply the rule (module docstring) to the evidence; returns ``recommended_layer``, ``rule``, ``table``.

    ``saving``: L → predicted saving, for the candidate layers (L = 0 among them). ``attention_profile [N]``,
    ``alignment_profile [N+1]``, ``proxies``: L → the measured proxies' values (``entry_changed``, ``entry_kl``,
    ``answers_changed``, and what they report beside: accuracies, raw KLs) — each optional.
    """
    if not 0 <= tolerance <= 1:
        raise InputError(f"tolerance must be in [0, 1], got {tolerance}")
    unknown = set(risks) - set(RISKS)
    if unknown or not risks:
        raise InputError(f"risks must be a non-empty subset of {RISKS}, got {list(risks)}")
    layers = sorted(saving)
    if not layers or layers[0] != 0:
        raise InputError("the candidate layers must include L = 0 (the baseline)")
    if attention_profile is None and alignment_profile is None and not proxies:
        raise InputError("no evidence: give an attention profile, an alignment profile and/or proxies")
    n = None
    lost = deficit = None
    if attention_profile is not None:
        n = len(attention_profile)
        lost = attention_lost(attention_profile, skip_layers)
    if alignment_profile is not None:
        if n is not None and len(alignment_profile) != n + 1:
            raise InputError(f"mismatched layer counts: the attention map has {n} LM layers but the alignment "
                             f"profile has {len(alignment_profile)} entries (expected {n + 1}: embeddings + "
                             "one per layer) — were they measured on the same LM?")
        n = len(alignment_profile) - 1
        deficit = alignment_deficit(alignment_profile)
    if n is not None and layers[-1] > n:
        raise InputError(f"candidate layer {layers[-1]} exceeds the LM's {n} layers")
    if proxies and set(proxies) != set(layers):
        raise InputError(f"the proxies cover layers {sorted(proxies)}, the candidates are {layers}")
    table, admissible_prefix, recommended = [], True, 0
    for layer in layers:
        row: dict[str, Any] = {"layer": layer, "saving": float(saving[layer])}
        if lost is not None:
            row["attention_lost"] = float(lost[layer])
        if proxies:
            row.update({k: None if v is None else float(v) for k, v in proxies[layer].items()})
        if deficit is not None:
            row["alignment_deficit"] = float(deficit[layer])
        gating = [row[k] for k in risks if row.get(k) is not None and np.isfinite(row[k])]  # undefined: no gate
        row["admissible"] = all(r <= tolerance + 1e-12 for r in gating)
        admissible_prefix = admissible_prefix and row["admissible"]
        if admissible_prefix:
            recommended = layer
        table.append(row)
    used = [k for k in risks if k in table[0]]
    if not used:
        raise InputError(f"none of the gating risks {list(risks)} was measured")
    return {"recommended_layer": recommended,
            "rule": {"tolerance": tolerance, "skip_layers": skip_layers, "risks_used": used,
                     "risks_missing": [k for k in risks if k not in used],
                     "text": "largest L such that every L' <= L has all risks <= tolerance"},
            "table": table}


def format_table(rec: dict[str, Any]) -> str:
    cols = ["layer", "saving", "attention_lost", "alignment_deficit", "entry_changed", "entry_kl",
            "entry_accuracy", "answers_changed", "accuracy"]
    cols = [c for c in cols if rec["table"][0].get(c) is not None]
    lines = ["  ".join(f"{c:>17}" for c in cols + ["admissible"])]
    for r in rec["table"]:
        cells = [f"{r[c]:>17d}" if c == "layer" else f"{r[c]:>17.3f}" if r.get(c) is not None else f"{'-':>17}"
                 for c in cols]
        mark = "yes" if r["admissible"] else "no"
        if r["layer"] == rec["recommended_layer"]:
            mark += "  <- recommended"
        lines.append("  ".join(cells + [f"{mark:>17}"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# validation against a trained sweep (pure)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (ties get their average rank); NaN when either is constant."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties: the mean of their ranks
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"spearman needs two equal 1-d arrays, got {x.shape} and {y.shape}")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap_accuracy(correct: dict[int, list[Any]], n_boot: int = 2000, seed: int = 0) -> dict[int, np.ndarray]:
    """``{layer: [n_boot]}`` bootstrap replicates of each layer's mean MCQ accuracy over its runs, resampling the
    runs (seeds) and, within each, its questions. ``correct``: layer → one 0/1 vector per run (its questions)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, runs in sorted(correct.items()):
        if not runs:
            raise InputError(f"layer {layer} has no runs")
        # resampling a run's n questions with replacement: its correct count is Binomial(n, its accuracy)
        per_run = np.stack([rng.binomial(len(c), float(np.mean(c)), n_boot) / len(c) for c in runs])  # [k, B]
        pick = rng.integers(len(runs), size=(n_boot, len(runs)))  # [B, k]: the runs of each replicate
        out[layer] = per_run[pick, np.arange(n_boot)[:, None]].mean(1)
    return out


def validate_proxies(risks: dict[str, dict[int, float]], correct: dict[int, list[Any]], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95, tolerance: float | None = None) -> dict[str, Any]:
    """How well each proxy's per-layer risk predicts the trained sweep's accuracy drop ``acc(0) − acc(L)``.

    ``risks``: proxy → {layer: risk} (NaN: not measured there); ``correct``: layer → per-run 0/1 question vectors
    (layer 0 among them). For each proxy: Spearman's ρ over the layers both cover (L = 0 left out: its drop is 0 by
    definition), with a bootstrap interval over seeds and questions (:func:`bootstrap_accuracy`); it *predicts*
    when the interval's lower end is above 0 and every layer it is measured on (L = 0 included) has at least two
    runs: with one run at a layer the interval resamples its questions only and leaves out the seed spread, which on
    the offline pair is larger than the questions' (≈ 0.08 against ≈ 0.025), so it cannot certify a proxy; its ρ and
    that interval are still reported. A proxy that predicts also *gates* (``"gates"``) unless, at ``tolerance``, it
    forbids a trained layer whose accuracy lies within L = 0's interval: a rank can be right while the level is not
    (the insertion probe changes over half the answers at every L ≥ 1, where trained L = 2 loses nothing), and such
    a proxy would rule out layers the sweep shows are free. Also the per-layer accuracy table with its intervals."""
    if 0 not in correct:
        raise InputError("the sweep has no L = 0 runs: the accuracy drop is measured against them")
    boot = bootstrap_accuracy(correct, n_boot, seed)
    mean = {layer: float(np.mean([np.mean(c) for c in runs])) for layer, runs in correct.items()}
    tail = (1 - level) / 2
    table = [{"layer": layer, "runs": len(correct[layer]), "accuracy": mean[layer],
              "interval": [float(np.quantile(boot[layer], tail)), float(np.quantile(boot[layer], 1 - tail))],
              "drop": mean[0] - mean[layer]} for layer in sorted(correct)]
    free = [r["layer"] for r in table if r["layer"] > 0 and r["accuracy"] >= table[0]["interval"][0]]
    proxies = {}
    for name, per_layer in risks.items():
        layers = [layer for layer in sorted(correct) if layer > 0 and np.isfinite(per_layer.get(layer, np.nan))]
        if len(layers) < 3:
            proxies[name] = {"layers": layers, "rho": None, "interval": None, "predicts": False, "gates": False,
                             "why": "fewer than 3 trained layers above 0 where it is measured"}
            continue
        r = [per_layer[layer] for layer in layers]
        rho = spearman(r, [mean[0] - mean[layer] for layer in layers])
        reps = np.array([spearman(r, boot[0][b] - np.array([boot[layer][b] for layer in layers]))
                         for b in range(n_boot)])
        reps = reps[np.isfinite(reps)]
        lo, hi = (float(np.quantile(reps, tail)), float(np.quantile(reps, 1 - tail))) if len(reps) else (None, None)
        single = [layer for layer in [0, *layers] if len(correct[layer]) < 2]
        verdict = {"layers": layers, "rho": rho, "interval": [lo, hi],
                   "predicts": bool(lo is not None and lo > 0 and not single)}
        if single:
            verdict["why"] = (f"one run at L = {', '.join(map(str, single))}: the interval resamples questions only, "
                              "not seeds")
        blocked = [layer for layer in free if layer in layers and tolerance is not None
                   and per_layer[layer] > tolerance]
        verdict["gates"] = verdict["predicts"] and not blocked
        if verdict["predicts"] and blocked:
            verdict["why"] = (f"ranks the layers, but at tolerance {tolerance:g} forbids L = "
                              f"{', '.join(map(str, blocked))}, within L = 0's accuracy interval in the sweep "
                              f"(risk {', '.join(f'{per_layer[b]:.2f}' for b in blocked)})")
        proxies[name] = verdict
    return {"proxies": proxies, "table": table, "n_boot": n_boot, "level": level, "tolerance": tolerance,
            "free_layers": free}


def frontier_check(layer: int, saving: dict[int, float], table: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether ``layer`` lies on the measured accuracy–cost frontier within one interval: no trained layer saves
    at least as much and is more accurate than the top of ``layer``'s interval. ``table``: the sweep's rows
    (:func:`validate_proxies`)."""
    rows = {r["layer"]: r for r in table}
    if layer not in rows:
        return {"layer": layer, "trained": False, "on_frontier": None, "dominated_by": []}
    top = rows[layer]["interval"][1]
    better = [r["layer"] for r in table if r["layer"] != layer and r["layer"] in saving
              and saving[r["layer"]] >= saving.get(layer, 0.0) and r["accuracy"] > top]
    return {"layer": layer, "trained": True, "on_frontier": not better, "dominated_by": better}


# ----------------------------------------------------------------------------------------------------------------
# saved recommendations


def load_recommendation(out_dir: Path) -> dict[str, Any]:
    """A saved ``recommend.json`` (``pg-recommend``'s result); one clear error when it is missing or incomplete."""
    from .runs import RECOMMEND_RESULT, read_result_json

    rec = read_result_json(out_dir, RECOMMEND_RESULT, "pg-recommend", keys=("recommended_layer", "rule"))
    rule = rec["rule"]
    if not isinstance(rule, dict) or not {"tolerance", "risks_used"} <= set(rule):
        raise InputError(f"{out_dir}/recommend.json: its rule lacks tolerance or risks_used")
    if not isinstance(rec.get("recommended_layer"), int):
        raise InputError(f"{out_dir}/recommend.json: no recommended_layer")
    return rec
