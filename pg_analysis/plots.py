"""Figures from saved results only (never loads a model). Every function writes a PNG atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .runinfo import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())


def _ticks(n: int, max_labels: int = 17) -> list[int]:
    step = max(1, int(np.ceil(n / max_labels)))
    return list(range(0, n, step))


def alignment_profiles(summaries: list[dict[str, Any]], path: Path) -> None:
    """Fig. 5's comparison: each pg-align result's best alignment per LM layer (the maximum over encoder layers),
    against relative LM depth, with its shuffled null's mean dotted in the same colour — encoders of different kinds
    (self-supervised, supervised; other modalities) side by side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, s in enumerate(summaries):
        if "llm_layer_profile" in s:
            profile = np.array([np.nan if v is None else v for v in s["llm_layer_profile"]], dtype=float)
        else:  # an older result: the profile from its grid
            profile = np.nanmax(np.array(s["grid"], dtype=float), axis=0)
        depth = np.arange(len(profile)) / max(len(profile) - 1, 1)
        colour = f"C{i % 10}"
        label = f"{s['vision']} ({s.get('modality', 'image')}, N={s.get('n_samples', '?')})"
        ax.plot(depth, profile, "-o", ms=3, color=colour, label=label)
        if s.get("null"):
            ax.axhline(s["null"]["mean"], color=colour, ls=":", lw=1)
    ax.set_xlabel(f"relative LM depth ({summaries[0]['llm']}: layer / last layer)")
    ax.set_ylabel(f"{summaries[0]['metric']} (best encoder layer)")
    ax.set_title("alignment per LM layer; dotted: each pair's shuffled null")
    ax.legend(fontsize=7)
    _save(fig, path)


def alignment_heatmap(summary: dict[str, Any], path: Path) -> None:
    """Paper orientation (Fig. 2): LM layers vertical (0 at the bottom), vision layers horizontal.

    With a null, a second panel shows the per-cell z-score against the shuffled-pairs null. No cell is left
    blank: degenerate layers (not scored) are hatched grey, and so — with another hatch — are cells whose z is
    undefined (a null without spread); a legend says which is which.
    """
    import seaborn as sns
    from matplotlib.patches import Patch

    plt = _pyplot()
    grid = np.array(summary["grid"], dtype=float)  # [Lv, Ll]; None (undefined) → NaN
    null = summary.get("null")
    panels = [("alignment", grid, "viridis", summary["metric"])]
    if null is not None:
        panels.append(("z", np.array(null["z"], dtype=float), "magma", "z-score vs shuffled pairs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6), squeeze=False)
    best = summary["best"]
    degenerate = summary.get("degenerate") or {"vision": {}, "llm": {}}
    bad_v = {int(i) for i in degenerate.get("vision", {})}
    bad_l = {int(j) for j in degenerate.get("llm", {})}
    styles = {"degenerate": dict(facecolor="0.85", edgecolor="0.45", hatch="///", lw=0),
              "undefined": dict(facecolor="0.93", edgecolor="0.55", hatch="..", lw=0)}
    for ax, (kind, values, cmap, label) in zip(axes[0], panels):
        sns.heatmap(values.T, ax=ax, cmap=cmap, cbar_kws={"label": label}, square=False)
        ax.invert_yaxis()
        lv, ll = values.shape
        used = set()
        for i in range(lv):
            for j in range(ll):
                if np.isfinite(values[i, j]):
                    continue
                why = "degenerate" if i in bad_v or j in bad_l else "undefined"
                used.add(why)
                ax.add_patch(plt.Rectangle((i, j), 1, 1, **styles[why]))
        ax.set_xticks([i + 0.5 for i in _ticks(lv)], [str(i) for i in _ticks(lv)], rotation=0)
        ax.set_yticks([j + 0.5 for j in _ticks(ll)], [str(j) for j in _ticks(ll)], rotation=0)
        ax.set_xlabel(f"{summary['vision']} layer (0 = embeddings)")
        ax.set_ylabel(f"{summary['llm']} layer (0 = embeddings)")
        ax.add_patch(plt.Rectangle((best["vision_layer"], best["llm_layer"]), 1, 1, fill=False, ec="red", lw=1.5))
        if used:
            names = {"degenerate": "degenerate layer, not scored (alignment.json)",
                     "undefined": "z undefined: the null has no spread"}
            ax.legend(handles=[Patch(**styles[w], label=names[w]) for w in sorted(used)], fontsize=7,
                      loc="upper left", bbox_to_anchor=(0, -0.1), frameon=False)
        if kind == "alignment":
            title = f"{summary['metric']} (k={summary['k']}, N={summary['n_samples']}), best {best['score']:.3f}"
            if null is not None:
                title += f"\nshuffled null {null['mean']:.3f} ± {null['std']:.3f} ({null['permutations']} perms)"
            ax.set_title(title, fontsize=9)
        else:
            z = null["best_cell_z"]
            z_text = "undefined" if z is None else f"{z:.1f}"
            p_line = null.get("best_cell_p_text") or f"p = {null['best_cell_p']:.3g}"  # results saved before
            ax.set_title(f"z at best cell: {z_text}\n{p_line}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def efficiency_figure(result: dict[str, Any], path: Path) -> None:
    """Fig. 1 / Table 4 style: measured prefill and training-step time vs L (relative to L=0) with the
    FLOP-proportional prediction, and KV-cache size."""
    plt = _pyplot()
    n = result.get("n_layers")
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in result["rows"]:  # one line per exit layer K (results before windows existed: K = N)
        groups.setdefault(r.get("exit_layer", n), []).append(r)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (k, rows) in enumerate(sorted(groups.items(), key=lambda kv: -(kv[0] if kv[0] is not None else 1 << 30))):
        rows = sorted(rows, key=lambda r: r["insert_layer"])
        ls = [r["insert_layer"] for r in rows]
        tag = "" if len(groups) == 1 else f", K={k}"
        colour = f"C{i}"
        ax.plot(ls, [r["prefill_pred"] for r in rows], "--", color=colour, alpha=0.6, label=f"predicted (FLOPs){tag}")
        if "prefill_ratio" in rows[0]:
            ax.plot(ls, [r["prefill_ratio"] for r in rows], "o-", color=colour, label=f"prefill (measured){tag}")
            if rows[0].get("train_ratio") is not None and len(groups) == 1:
                ax.plot(ls, [r["train_ratio"] for r in rows], "s-", color="C1", label="train step (measured)")
        ax2.plot(ls, [r["kv_cache_bytes"] / 2**20 for r in rows], "o-", color=colour, label=f"K={k}")
    ax.set_xlabel("insert layer L")
    ax.set_ylabel("time relative to the ordinary model")
    ax.set_title(f"{result['model']}: T={result['config']['text_tokens']}, V={result['config']['vision_tokens']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_xlabel("insert layer L")
    ax2.set_ylabel("KV cache (MiB)")
    if len(groups) > 1:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def loss_curve_figure(runs: dict[str, list[dict[str, Any]]], path: Path, smooth: int = 10) -> None:
    """Training loss per stage (columns) for one or more runs (the paper's Fig. 7 compares baseline and grounded).

    ``runs``: label → ``log.jsonl`` records (``stage``, ``step``, ``loss``). A running mean over ``smooth`` steps
    is drawn over the raw curve.
    """
    plt = _pyplot()
    stages = list(dict.fromkeys(r["stage"] for recs in runs.values() for r in recs))  # the order they ran in
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4.2 * max(1, len(stages)), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for i, (label, recs) in enumerate(runs.items()):
            rs = sorted((r for r in recs if r["stage"] == stage), key=lambda r: r["step"])
            if not rs:
                continue
            x = np.array([r["step"] for r in rs])
            y = np.array([r["loss"] for r in rs], dtype=float)
            colour = f"C{i}"
            ax.plot(x, y, color=colour, alpha=0.25, lw=0.8)
            k = min(smooth, len(y))
            ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color=colour, lw=1.6, label=label)
        name = {0: "stage 0 (InfoNCE warm-up)", 1: "stage 1 (projector)", 2: "stage 2 (projector + LM)",
                3: "format stage (text only)"}
        ax.set_title(name.get(stage, f"stage {stage}"), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def letter_histogram(mcq: dict[str, dict[str, Any]], path: Path, title: str = "") -> None:
    """Predicted option letters per condition (image / no image / shuffled), with the uniform line."""
    plt = _pyplot()
    conds = list(mcq)
    letters = list(next(iter(mcq.values()))["letters"])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.8 / len(conds)
    for i, cond in enumerate(conds):
        counts = [mcq[cond]["letters"][x] for x in letters]
        acc = mcq[cond]["accuracy"]
        ax.bar(np.arange(len(letters)) + (i - (len(conds) - 1) / 2) * width, counts, width,
               label=f"{cond.replace('_', ' ')} (acc {acc:.2f})")
    n = mcq[conds[0]]["n"]
    ax.axhline(n / len(letters), color="grey", ls="--", lw=1, label="uniform")
    ax.set_xticks(range(len(letters)), letters)
    ax.set_ylabel("predicted")
    ax.set_title(title or "MCQ answer letters", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def attention_heatmap(attention: np.ndarray, shown: np.ndarray, path: Path, skip: int = 0, title: str = "") -> None:
    """Fig. 3 / Fig. 6: head-averaged language→vision attention, the ``shown`` vision tokens left to right
    (positional order), LLM layers vertical (first layer at the bottom); ``skip`` leaves out the first layers."""
    import seaborn as sns

    plt = _pyplot()
    values = np.asarray(attention, dtype=float)[skip:, shown]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.09 * len(shown) + 2.5), 4.8))
    sns.heatmap(values, ax=ax, cmap="viridis", cbar_kws={"label": "mean attention (heads, queries, prompts)"})
    ax.invert_yaxis()
    rows = _ticks(values.shape[0])
    ax.set_yticks([r + 0.5 for r in rows], [str(r + skip) for r in rows], rotation=0)
    cols = _ticks(len(shown), 20)
    ax.set_xticks([c + 0.5 for c in cols], [str(int(shown[c])) for c in cols], rotation=90, fontsize=7)
    ax.set_xlabel(f"vision token ({len(shown)} of {attention.shape[1]}, positional order)")
    ax.set_ylabel("LLM layer")
    ax.set_title((title + "\n" if title else "") + ("all layers" if not skip else f"layers {skip}+"), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def attention_profile_figure(summary: dict[str, Any], path: Path) -> None:
    """Total attention to the vision rows per LLM layer (sum over all vision tokens)."""
    plt = _pyplot()
    profile = np.asarray(summary["profile"], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(np.arange(len(profile)), profile, "o-", ms=3)
    if summary.get("insert_layer"):
        ax.axvline(summary["insert_layer"] - 0.5, color="grey", ls="--", lw=1, label=f"L = {summary['insert_layer']}")
        ax.legend(fontsize=8)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("attention to vision rows")
    ax.set_title(f"{summary['vlm']}: {summary['n_prompts']} prompts, queries: {summary['query']}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def recommendation_figure(rec: dict[str, Any], path: Path) -> None:
    """Predicted prefill saving vs the risk measures across L, the tolerance and the recommended L; with a sweep's
    validation, each proxy's Spearman ρ with the measured accuracy drop in the legend (✓: it predicts, and gates)."""
    plt = _pyplot()
    rows = rec["table"]
    ls = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    shape = rec.get("shape")
    at = f" ({shape['text']} text + {shape['vision']} vision rows)" if shape else ""
    ax.plot(ls, [100 * r["saving"] for r in rows], "k-o", ms=3, label="predicted prefill saving" + at)
    ax.set_xlabel("insert layer L")
    ax.set_ylabel("saving (%)")
    ax2 = ax.twinx()
    proxies = (rec.get("validation") or {}).get("proxies", {})
    for key, label, style in (("attention_lost", "vision attention lost", "C0-s"),
                              ("alignment_deficit", "alignment deficit", "C2-v"),
                              ("entry_changed", "answers changed (entry knockout)", "C3-D"),
                              ("entry_kl", "KL share (entry knockout)", "C4-o"),
                              ("answers_changed", "answers changed (insertion)", "C1-^")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            v = proxies.get(key)
            if v and v.get("rho") is not None:
                label += f", ρ = {v['rho']:.2f}" + (" ✓" if v.get("gates", v["predicts"]) else "")
            ax2.plot(ls, [np.nan if y is None else y for y in ys], style, ms=3, label=label)
    ax2.axhline(rec["rule"]["tolerance"], color="grey", ls=":", lw=1, label="tolerance")
    ax2.set_ylabel("risk (fraction)")
    ax2.set_ylim(-0.02, 1.02)
    ax.axvline(rec["recommended_layer"], color="red", lw=1.2)
    used = ", ".join(rec["rule"]["risks_used"])
    checked = "validated" if rec["rule"].get("validated") else "unvalidated"
    ax.set_title(f"recommended L = {rec['recommended_layer']} (gating: {used}; {checked})", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="center right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def tradeoff_figure(points: list[dict[str, Any]], path: Path, recommended: int | None = None,
                    xlabel: str = "predicted prefill saving (%)") -> None:
    """Fig. 1 style: accuracy of trained models vs their prefill saving, one point per insert layer L;
    ``points``: ``{"layer", "saving", "accuracy", "ci95"?, "label"?}``; the Pareto frontier is drawn."""
    plt = _pyplot()
    pts = sorted(points, key=lambda p: p["saving"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for p in pts:
        yerr = None
        if p.get("ci95"):
            yerr = [[p["accuracy"] - p["ci95"][0]], [p["ci95"][1] - p["accuracy"]]]
        colour = "red" if p["layer"] == recommended else "C0"
        ax.errorbar(100 * p["saving"], p["accuracy"], yerr=yerr, fmt="o", color=colour, capsize=3)
        ax.annotate(f"L={p['layer']}", (100 * p["saving"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    from .recommend import pareto_frontier

    front = pareto_frontier([(p["saving"], p["accuracy"]) for p in pts])
    ax.plot([100 * pts[i]["saving"] for i in front], [pts[i]["accuracy"] for i in front], "k--", lw=1,
            label="frontier")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(points[0].get("metric", "accuracy"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)

