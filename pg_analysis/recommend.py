"""Which insert layer L? The rule and its evidence (pure). The pipeline that gathers the evidence by running a
VLM — ``pg-recommend``, ``pg-train --layer auto`` — lives with the code that runs VLMs (``choose_layer``).

Evidence per candidate L (LM with N blocks; L = 0 … N):

- **saving(L)** — the predicted prefill-FLOP saving ``1 − FLOPs(L) / FLOPs(0)`` for the probe prompts' lengths;
- **attention_lost(L)** — from ``pg-attnmap``: the share of language→vision attention (per-layer totals, the
  first ``skip_layers`` blocks left out as in the paper's Fig. 3) that falls in blocks ``skip_layers … L−1``,
  which a grounded model removes;
- **answers_changed(L)** — the training-free probe the paper lacks: the baseline VLM run grounded at L with its
  weights unchanged; the share of MCQ answers (argmax over A–D) that differ from its answers at L = 0. Its
  accuracy and the mean KL(p₀ ‖ p_L) of the answer distributions are reported beside it;
- **alignment_deficit(L)** — from ``pg-align`` (the per-LM-layer profile, max over vision layers; index L is the
  input of block L, exactly where the vision rows enter): ``max(0, a(0) − a(L)) / (max a − min a)``, how much
  less the LM's layer-L space is aligned with the vision encoder than its input space (the Platonic argument
  says deeper is at least as aligned, so this is usually 0).

**The rule.** Each risk is a fraction in [0, 1]. L is *admissible* when every gating risk that was measured is
≤ ``tolerance``. The recommendation is the largest L such that every L' ≤ L is admissible (the saving grows with
L, so this is the cheapest model whose whole path from L = 0 stays within tolerance). Missing evidence is left out
and named in the output; with none at all, it is an error.

Gating risks by default: ``attention_lost`` and ``alignment_deficit`` — the paper's two observations. The probe
is always measured and reported, and gates when ``risks`` includes ``answers_changed``. Why not by default: on the
offline pair (DINOv2-S × SmolLM2-135M) the untrained probe changes ~60 % of answers at *every* L ≥ 1 (accuracy at
chance, with or without rescaling the vision rows to layer L's norm), so it measures that the model must be
retrained, not which L retrains well (docs/experiments.md, 2026-11-22).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

RISKS = ("attention_lost", "answers_changed", "alignment_deficit")
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
              probe: dict[int, dict[str, float]] | None = None, tolerance: float = 0.25,
              skip_layers: int = 2, risks: tuple[str, ...] = DEFAULT_RISKS) -> dict[str, Any]:
    """Apply the rule (module docstring) to the evidence; returns ``recommended_layer``, ``rule``, ``table``.

    ``saving``: L → predicted saving, for the candidate layers (L = 0 among them). ``attention_profile [N]``,
    ``alignment_profile [N+1]``, ``probe``: L → ``{"answers_changed", "accuracy", "kl"}`` — each optional.
    """
    if not 0 <= tolerance <= 1:
        raise InputError(f"tolerance must be in [0, 1], got {tolerance}")
    unknown = set(risks) - set(RISKS)
    if unknown or not risks:
        raise InputError(f"risks must be a non-empty subset of {RISKS}, got {list(risks)}")
    layers = sorted(saving)
    if not layers or layers[0] != 0:
        raise InputError("the candidate layers must include L = 0 (the baseline)")
    if attention_profile is None and alignment_profile is None and not probe:
        raise InputError("no evidence: give an attention profile, an alignment profile and/or a probe")
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
    if probe is not None and set(probe) != set(layers):
        raise InputError(f"the probe covers layers {sorted(probe)}, the candidates are {layers}")
    table, admissible_prefix, recommended = [], True, 0
    for layer in layers:
        row: dict[str, Any] = {"layer": layer, "saving": float(saving[layer])}
        if lost is not None:
            row["attention_lost"] = float(lost[layer])
        if probe is not None:
            row.update({k: float(v) for k, v in probe[layer].items()})
        if deficit is not None:
            row["alignment_deficit"] = float(deficit[layer])
        gating = [row[k] for k in risks if k in row and np.isfinite(row[k])]  # undefined risks do not gate
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
    cols = ["layer", "saving", "attention_lost", "answers_changed", "accuracy", "kl", "alignment_deficit"]
    cols = [c for c in cols if c in rec["table"][0]]
    lines = ["  ".join(f"{c:>17}" for c in cols + ["admissible"])]
    for r in rec["table"]:
        cells = [f"{r[c]:>17d}" if c == "layer" else f"{r[c]:>17.3f}" for c in cols]
        mark = "yes" if r["admissible"] else "no"
        if r["layer"] == rec["recommended_layer"]:
            mark += "  <- recommended"
        lines.append("  ".join(cells + [f"{mark:>17}"]))
    return "\n".join(lines)


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
