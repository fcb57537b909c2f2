"""Regenerate the paper-style figures from saved results only — never loads a model (no torch, no transformers).

    python figures/make_figures.py [--runs runs] [--out figures/out]

Reads, when present (each figure is skipped, with a line saying why, when its inputs are missing):

| output | paper | inputs |
|---|---|---|
| ``fig1_tradeoff.png`` | Fig. 1 | ``<sweep>/sweep.json`` (``pg-sweep``; + ``<recommend>/recommend.json`` marks the chosen L) |
| ``fig2_alignment.png`` | Fig. 2 / 5 | ``<align>/alignment.json`` |
| ``fig5_profiles.png`` | Fig. 5 | every ``<runs>/align*/alignment.json`` (or ``--profiles``): encoders side by side |
| ``fig3_attention.png``, ``fig6_attention_all.png``, ``fig3_profile.png`` | Fig. 3 / 6 | ``<attnmap>/attnmap.json``, ``attention.npy`` |
| ``fig7_loss.png`` | Fig. 7 | ``<run>/log.jsonl`` of the ``--loss-runs`` |
| ``table4.md`` | Table 4 | ``eval.json`` of the ``--loss-runs`` and the sweep; ``<bench>/bench.json`` |
| ``efficiency.png`` | Fig. 1 / Table 4 | ``<bench>/bench.json`` |
| ``recommend.png`` | — | ``<recommend>/recommend.json`` |
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pg_analysis import plots
from pg_analysis.runinfo import atomic_write_bytes
from pg_analysis.runs import (ALIGN_RESULT, ATTNMAP_RESULT, BENCH_RESULT, EVAL_DIR, EVAL_RESULT, RECOMMEND_RESULT,
                             SWEEP_RESULT, TRAIN_LOG)


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _layer_of(folder: Path) -> int:
    m = re.search(r"L(\d+)$", folder.name)
    return int(m.group(1)) if m else -1


def sweep_points(sweep: Path) -> tuple[list[dict[str, Any]], str]:
    """One point per trained layer of ``<sweep>/sweep.json`` (``pg-sweep``): L, predicted prefill saving at the
    sweep's shape, mean MCQ accuracy over seeds and its bootstrap interval; and the x-axis label."""
    result = _json(sweep / SWEEP_RESULT)
    if result is None:
        return [], ""
    shape = result["shape"]
    counts = sorted({x["runs"] for x in result["table"]})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    points = [{"layer": r["layer"], "saving": r["saving"], "accuracy": r["accuracy"], "ci95": r["interval"],
               "metric": f"MCQ accuracy (mean of {seeds} seed{'s' if counts[-1] > 1 else ''} per L)"}
              for r in result["table"]]
    return points, f"predicted prefill saving at {shape['text']} text + {shape['vision']} vision rows (%)"


def table4(evals: dict[str, dict[str, Any]], bench: dict[str, Any] | None) -> str:
    """Markdown: per trained model, accuracy with controls, prefill time vs L=0 (measured, predicted), training."""
    lines = ["| model | L | MCQ | MCQ no-img / shuffled | rank-4 | rank-4 no-img / shuffled | prefill ×L0 measured "
             "(predicted) | stage-2 tokens/s | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, ev in evals.items():
        m, r = ev["mcq"], ev["rank4"]
        eff = ev.get("efficiency") or {}
        tr = (ev.get("training") or {})
        s2 = ((tr.get("throughput") or {}).get("stage2") or {}).get("tokens_per_s")
        rss = tr.get("peak_rss_mib")
        prefill = f"{eff['measured_ratio']:.2f} ({eff['predicted_ratio']:.2f})" if eff else "–"
        tokens = f"{s2:.0f}" if s2 else "–"
        memory = f"{rss / 1024:.1f}" if rss else "–"
        lines.append(
            f"| {name} | {ev['insert_layer']} | {m['image']['accuracy']:.3f} | {m['no_image']['accuracy']:.3f} / "
            f"{m['shuffled']['accuracy']:.3f} | {r['image']['accuracy']:.3f} | {r['no_image']['accuracy']:.3f} / "
            f"{r['shuffled']['accuracy']:.3f} | {prefill} | {tokens} | {memory} |")
    if bench:
        lines += ["", f"pg-bench ({bench['model']}, T={bench['config']['text_tokens']}, "
                      f"V={bench['config']['vision_tokens']}):", "",
                  "| L | prefill ×L0 measured (predicted) | train step ×L0 | KV cache MiB |", "|---|---|---|---|"]
        for row in bench["rows"]:
            train = f"{row['train_ratio']:.2f}" if row.get("train_ratio") is not None else "–"
            measured = f"{row['prefill_ratio']:.2f}" if row.get("prefill_ratio") is not None else "–"
            lines.append(f"| {row['insert_layer']} | {measured} ({row['prefill_pred']:.2f}) | {train} | "
                         f"{row['kv_cache_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs", help="root of the saved results (default: %(default)s)")
    p.add_argument("--align", default=None, help="pg-align result (default: <runs>/align)")
    p.add_argument("--profiles", nargs="*", default=None,
                   help="pg-align results compared in Fig. 5 (default: every <runs>/align*)")
    p.add_argument("--attnmap", default=None, help="pg-attnmap result (default: <runs>/attnmap)")
    p.add_argument("--sweep", default=None, help="pg-sweep result (default: <runs>/sweep-result)")
    p.add_argument("--recommend", default=None, help="pg-recommend result (default: <runs>/recommend)")
    p.add_argument("--bench", default=None, help="pg-bench result (default: <runs>/bench)")
    p.add_argument("--loss-runs", nargs="*", default=None,
                   help="pg-train runs compared in Fig. 7 and Table 4 (default: <runs>/train-L*)")
    p.add_argument("--out", default="figures/out", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    at = lambda v, name: Path(v) if v else runs / name  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made, skipped = [], []

    rec = _json(at(args.recommend, "recommend") / RECOMMEND_RESULT)
    points, xlabel = sweep_points(at(args.sweep, "sweep-result"))
    if points:
        plots.tradeoff_figure(points, out / "fig1_tradeoff.png", rec["recommended_layer"] if rec else None, xlabel)
        made.append("fig1_tradeoff.png")
    else:
        skipped.append(f"fig1_tradeoff.png (no {at(args.sweep, 'sweep-result')}/{SWEEP_RESULT})")

    align = _json(at(args.align, "align") / ALIGN_RESULT)
    if align:
        plots.alignment_heatmap(align, out / "fig2_alignment.png")
        made.append("fig2_alignment.png")
    else:
        skipped.append(f"fig2_alignment.png (no {at(args.align, 'align')}/alignment.json)")

    folders = [Path(f) for f in args.profiles] if args.profiles is not None else sorted(runs.glob("align*"))
    profiles = [r for f in folders if (r := _json(f / ALIGN_RESULT)) is not None]
    if len(profiles) >= 2:
        plots.alignment_profiles(profiles, out / "fig5_profiles.png")
        made.append("fig5_profiles.png")
    else:
        skipped.append(f"fig5_profiles.png ({len(profiles)} pg-align result(s) found; it compares two or more)")

    am_dir = at(args.attnmap, "attnmap")
    am = _json(am_dir / ATTNMAP_RESULT)
    if am and (am_dir / "attention.npy").is_file():
        attention = np.load(am_dir / "attention.npy")
        shown = np.asarray(am["shown_tokens"])
        skip = am.get("skip_layers", 2)
        plots.attention_heatmap(attention, shown, out / "fig6_attention_all.png", skip=0, title=am["vlm"])
        plots.attention_heatmap(attention, shown, out / "fig3_attention.png", skip=skip, title=am["vlm"])
        plots.attention_profile_figure(am, out / "fig3_profile.png")
        made += ["fig6_attention_all.png", "fig3_attention.png", "fig3_profile.png"]
    else:
        skipped.append(f"fig3/fig6 (no {am_dir}/attnmap.json + attention.npy)")

    loss_runs = [Path(r) for r in args.loss_runs] if args.loss_runs is not None else sorted(
        runs.glob("train-L*"), key=_layer_of)
    logs = {}
    for run in loss_runs:
        if (run / TRAIN_LOG).is_file():
            logs[run.name] = [json.loads(line) for line in (run / TRAIN_LOG).read_text().splitlines()]
    if logs:
        plots.loss_curve_figure(logs, out / "fig7_loss.png")
        made.append("fig7_loss.png")
    else:
        skipped.append("fig7_loss.png (no log.jsonl in the --loss-runs)")

    evals = {run.name: ev for run in loss_runs if (ev := _json(run / EVAL_DIR / EVAL_RESULT))}
    swept = _json(at(args.sweep, "sweep-result") / SWEEP_RESULT) or {"runs": []}
    evals.update({f"sweep/{Path(f).name}": ev for f in swept["runs"] if (ev := _json(Path(f) / EVAL_DIR / EVAL_RESULT))})
    bench = _json(at(args.bench, "bench") / BENCH_RESULT)
    if evals or bench:
        atomic_write_bytes(out / "table4.md", table4(evals, bench).encode())
        made.append("table4.md")
    else:
        skipped.append("table4.md (no eval.json and no bench.json)")
    if bench:
        plots.efficiency_figure(bench, out / "efficiency.png")
        made.append("efficiency.png")
    if rec:
        plots.recommendation_figure(rec, out / "recommend.png")
        made.append("recommend.png")

    print(f"wrote {out}/: {' '.join(made) or '(nothing)'}")
    for s in skipped:
        print(f"skipped {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
