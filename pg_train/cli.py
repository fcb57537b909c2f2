"""Entry points of the commands that run a grounded model or a VLM: pg-train, pg-eval, pg-bench, pg-attnmap,
pg-recommend, pg-sweep (pg-align and pg-assets: :mod:`pg_analysis.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pg_analysis.cli import Parser, entry_point, int_list, run_cli


def bench_parser() -> argparse.ArgumentParser:
    from .bench import SHAPES, BenchConfig

    d = BenchConfig()
    p = Parser(prog="pg-bench",
                                description="Efficiency sweep over the insert layer L of the grounded forward pass.")
    p.add_argument("--model", default=d.model, help="causal LM: alias, local folder or hub id (default: %(default)s)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="benchmark random weights of this shape instead of --model (e.g. llama-7b on a GPU)")
    p.add_argument("--text-tokens", type=int, default=d.text_tokens, help="text rows T (default: %(default)s)")
    p.add_argument("--vision-tokens", type=int, default=d.vision_tokens, help="vision rows V (default: %(default)s)")
    p.add_argument("--layers", type=int_list, default=None, help="insert layers, e.g. 0,2,4,8 (default: 0, N/8 … N)")
    p.add_argument("--exit-layers", type=int_list, default=None,
                   help="exit layers K, e.g. 16,24,30: every window L <= K is timed (default: N only, the vision "
                        "rows stay to the end)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats, median reported (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                   help="tokens decoded with the cache per repeat, 0 to skip (default: %(default)s)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 … (default: bf16 on CUDA cc >= 8, else fp32)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log loading")
    return p


def _bench_main(args: argparse.Namespace) -> int:
    from pg_analysis.plots import efficiency_figure
    from pg_analysis.runinfo import atomic_output_dir, atomic_write_json, check_writable_parent
    from pg_analysis.runs import BENCH_RESULT, write_run_record

    from .bench import BenchConfig, format_table, run_bench

    out = Path(args.out)
    check_writable_parent(out)
    cfg = BenchConfig(model=args.model, shape=args.shape, text_tokens=args.text_tokens,
                      vision_tokens=args.vision_tokens, layers=args.layers, exit_layers=args.exit_layers,
                      batch_size=args.batch_size,
                      repeats=args.repeats, decode_tokens=args.decode_tokens, train=not args.no_train,
                      device=args.device, dtype=args.dtype)
    result = run_bench(cfg, progress=not args.quiet)
    with atomic_output_dir(out) as tmp:
        atomic_write_json(tmp / BENCH_RESULT, result)
        write_run_record(tmp, "pg-bench", cfg.to_dict())
        efficiency_figure(result, tmp / "efficiency.png")
    print(format_table(result))
    print(f"wrote {out}/: bench.json run.json efficiency.png")
    return 0


def bench(argv: Sequence[str] | None = None) -> int:
    return run_cli(_bench_main, bench_parser(), argv)


bench_main = entry_point(bench)


# ----------------------------------------------------------------------------------------------------------------
# pg-train




def _layer(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer layer or 'auto', got {value!r}") from None


def train_parser() -> argparse.ArgumentParser:
    from pg_analysis.options import add_dataclass_arguments

    from .config import TrainConfig

    p = Parser(
        prog="pg-train",
        description="Train a grounded frozen-encoder VLM (vision rows enter the LM at layer L): stage 0 InfoNCE "
                    "warm-up, stage 1 projector, stage 2 projector + LM. Default: DINOv2-S x SmolLM2-135M on the "
                    "offline Tux Paint instruction data.")
    add_dataclass_arguments(p, TrainConfig, skip=("progress",), rename={"out_dir": "--out"}, types={"layer": _layer},
                            only_given=True)
    auto = p.add_argument_group("--layer auto")
    auto.add_argument("--recommendation", default="runs/recommend",
                      help="pg-recommend result folder: read if present, else written there (default: %(default)s)")
    auto.add_argument("--baseline", default="runs/train-L0",
                      help="baseline L=0 VLM for the training-free probe (default: %(default)s)")
    auto.add_argument("--align-result", default="runs/align", help="pg-align result folder (default: %(default)s)")
    auto.add_argument("--attnmap", default="runs/attnmap", help="pg-attnmap result folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log progress details")
    return p


def _resolve_auto_layer(args: argparse.Namespace) -> dict:
    from .choose_layer import RecommendConfig, auto_layer

    rcfg = RecommendConfig(vlm=args.baseline, align=args.align_result, attnmap=args.attnmap)
    rec = auto_layer(args.recommendation, rcfg, out_dir=Path(args.recommendation), progress=not args.quiet)
    print(f"--layer auto: L = {rec['recommended_layer']} (pg-recommend, {rec['source']}; "
          f"tolerance {rec['rule']['tolerance']}, risks {', '.join(rec['rule']['risks_used'])})")
    return rec


def _train_main(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .trainer import train

    fields = {k: v for k, v in vars(args).items()
              if k not in ("quiet", "verbose", "recommendation", "baseline", "align_result", "attnmap")}
    evidence = None
    if fields.get("layer") == "auto":
        evidence = _resolve_auto_layer(args)
        fields["layer"] = evidence["recommended_layer"]
    cfg = resolve_config({**fields, "progress": not args.quiet})
    summary = train(cfg, layer_evidence=evidence)
    if not summary.get("main_process", True):  # one report per run, from the main process
        return 0
    if summary.get("stopped_early"):
        print(f"stopped after --stop-after {cfg.stop_after} steps; continue with --resume")
        return 0
    th = summary.get("throughput", {})
    for stage, t in th.items():
        tok = f", {t['tokens_per_s']:.0f} tokens/s" if t.get("tokens_per_s") else ""
        print(f"{stage}: {t['steps']} steps in {t['seconds']:.0f} s ({t['samples_per_s']:.1f} samples/s{tok})")
    if summary.get("skipped_records"):
        print(f"skipped {summary['skipped_records']} bad records (--on-bad-record skip; see the log)")
    print(f"run {summary['run_seconds']:.0f} s, peak RSS {summary['peak_rss_mib']:.0f} MiB")
    print(f"wrote {cfg.out_dir}/: model/ run.json recipe.json log.jsonl logs/ loss.png summary.json data/ checkpoints/")
    return 0


def train_cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(_train_main, train_parser(), argv)


train_main = entry_point(train_cli)


# ----------------------------------------------------------------------------------------------------------------
# pg-eval


def eval_parser() -> argparse.ArgumentParser:
    from .evaluate import EvalConfig

    d = EvalConfig(run="")
    p = Parser(
        prog="pg-eval",
        description="Evaluate pg-train runs on held-out images: MCQ accuracy (letter logits, Wilson 95%% CI, letter "
                    "histogram), caption ranking (4 options and all captions), caption generation, no-image and "
                    "shuffled-image controls, and prefill efficiency.")
    p.add_argument("runs", nargs="+", help="pg-train output folders (with model/, config.json, data/)")
    p.add_argument("--data-dir", default=None, help="instruction data folder (default: <run>/data)")
    p.add_argument("--split", default=d.split, choices=["train", "val", "test"], help="split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per forward (default: %(default)s)")
    p.add_argument("--no-rank-all", action="store_true", help="skip ranking among all test captions (the slow part)")
    p.add_argument("--no-generate", action="store_true", help="skip caption generation")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="generation length limit (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast, fp32, or auto: bf16 where the device runs it fast (default: %(default)s)")
    p.add_argument("--bench-repeats", type=int, default=d.bench_repeats,
                   help="timed repeats of the prefill comparison; 0 skips it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the shuffled-image control (default: %(default)s)")
    p.add_argument("--modality", default=None, choices=["image", "molecule"],
                   help="the inputs each run's model must read; a run whose model reads others is an error "
                        "(default: whatever it reads, recorded in eval.json)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval for each run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log loading")
    return p


def _eval_main(args: argparse.Namespace) -> int:
    from pg_analysis.plots import letter_histogram
    from pg_analysis.runinfo import atomic_output_dir, atomic_write_json, check_writable_parent
    from pg_analysis.runs import EVAL_DIR, EVAL_RESULT, write_run_record

    from .evaluate import EvalConfig, evaluate, format_results

    if args.out and len(args.runs) > 1:
        from pg_analysis.errors import InputError

        raise InputError("--out takes one run; with several runs each writes <run>/eval")
    results = {}
    for run in args.runs:
        cfg = EvalConfig(run=run, data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
                         rank_all=not args.no_rank_all, generate=not args.no_generate,
                         max_new_tokens=args.max_new_tokens, precision=args.precision, seed=args.seed,
                         bench_repeats=args.bench_repeats, progress=not args.quiet, modality=args.modality)
        out = Path(args.out) if args.out else Path(run) / EVAL_DIR
        check_writable_parent(out)
        result = evaluate(cfg)
        with atomic_output_dir(out) as tmp:
            atomic_write_json(tmp / EVAL_RESULT, result)
            write_run_record(tmp, "pg-eval", vars(cfg))
            letter_histogram(result["mcq"], tmp / "letters.png", title=f"{run} (L={result['insert_layer']})")
        results[run] = result
        print(f"wrote {out}/: eval.json run.json letters.png")
    print(format_results(results))
    return 0


def eval_cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(_eval_main, eval_parser(), argv)


eval_main = entry_point(eval_cli)


# ----------------------------------------------------------------------------------------------------------------
# pg-attnmap


def _vlm_run_args(p: argparse.ArgumentParser, d, out: str, seed_help: str, data_help: str = "") -> None:
    """Options pg-attnmap and pg-recommend share: the pairs the prompts come from, and running."""
    p.add_argument("--data", default=d.data,
                   help=f"{data_help}pairs: tuxpaint, coco, or a .jsonl/.csv (default: %(default)s)")
    p.add_argument("--coco-root", default=None, help="COCO folder (annotations/, val2017/) for --data coco")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"{seed_help} (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--cache-dir", default=None, help="encoder-feature cache (default: <asset cache>/features)")
    p.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log loading")


def attnmap_parser() -> argparse.ArgumentParser:
    from pg_analysis.attention import BACKENDS, QUERIES, AttnmapConfig

    d = AttnmapConfig()
    p = Parser(
        prog="pg-attnmap",
        description="Language→vision attention per LLM layer of a LLaVA-format VLM on multiple-choice prompts "
                    "(the paper's Fig. 3 / Fig. 6): head-averaged, averaged over query tokens and prompts.")
    p.add_argument("--vlm", default=d.vlm, help="pg-train run or model folder, or an HF LLaVA checkpoint "
                                                 "('llava' = llava-hf/llava-1.5-7b-hf) (default: %(default)s)")
    p.add_argument("--n", type=int, default=d.n, help="pairs, capped at what the data holds (default: %(default)s)")
    p.add_argument("--query", choices=QUERIES, default=d.query,
                   help="query rows: text = text after the image, last = the answer position (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="hf (forward hooks) or nnsight (trace) (default: %(default)s)")
    p.add_argument("--show-tokens", type=int, default=d.show_tokens,
                   help="vision tokens shown in the figures, a seeded sample (default: %(default)s)")
    p.add_argument("--skip-layers", type=int, default=d.skip_layers,
                   help="first layers left out of the second figure (default: %(default)s)")
    _vlm_run_args(p, d, "runs/attnmap", "pair sample, distractors, shown tokens")
    return p


def _attnmap_main(args: argparse.Namespace) -> int:
    from pg_analysis.attention import AttnmapConfig, save_attnmap
    from pg_analysis.runinfo import check_writable_parent

    from .probe import run_attnmap

    out = Path(args.out)
    check_writable_parent(out)
    cfg = AttnmapConfig(vlm=args.vlm, data=args.data, coco_root=args.coco_root, n=args.n, query=args.query,
                        backend=args.backend, show_tokens=args.show_tokens, skip_layers=args.skip_layers,
                        batch_size=args.batch_size, seed=args.seed, device=args.device, cache_dir=args.cache_dir)
    result = run_attnmap(cfg, progress=not args.quiet)
    save_attnmap(result, out)
    s = result.summary()
    prof = " ".join(f"{x:.3f}" for x in s["profile"])
    print(f"{s['vlm']} (L={s['insert_layer']}): {s['n_prompts']} prompts, {s['shape'][0]} layers x "
          f"{s['shape'][1]} vision tokens, queries: {s['query']}, {result.info['seconds']:.1f} s")
    print(f"attention to vision rows per layer: {prof}")
    print(f"peak layer {s['peak_layer']}; after the first {s['skip_layers']}: {s['peak_layer_after_skip']}")
    figs = " ".join(sorted(p.name for p in out.glob("*.png")))
    print(f"wrote {out}/: attention.npy attnmap.json run.json {figs}")
    return 0


def attnmap(argv: Sequence[str] | None = None) -> int:
    return run_cli(_attnmap_main, attnmap_parser(), argv)


attnmap_main = entry_point(attnmap)


# ----------------------------------------------------------------------------------------------------------------
# pg-recommend


def recommend_parser() -> argparse.ArgumentParser:
    from pg_analysis.recommend import RISKS

    from .choose_layer import RecommendConfig

    d = RecommendConfig()
    p = Parser(
        prog="pg-recommend",
        description="Recommend the insert layer L from the alignment profile (pg-align), the attention profile "
                    "(pg-attnmap) and training-free proxies measured on the baseline VLM (entry and exit "
                    "knockouts; the insertion probe on request); with --sweep, the proxies that predict a trained "
                    "sweep's accuracy drop and admit its free layers gate. Rule: the largest L such that every "
                    "L' <= L keeps every gating risk <= --tolerance.")
    p.add_argument("--vlm", default=d.vlm, help="baseline L=0 VLM (pg-train run or LLaVA) (default: %(default)s)")
    p.add_argument("--align", default=d.align, help="pg-align result folder, or 'none' (default: %(default)s)")
    p.add_argument("--attnmap", default=d.attnmap, help="pg-attnmap result folder, or 'none' (default: %(default)s)")
    p.add_argument("--probe", action="store_true",
                   help="also the insertion probe (answers_changed: the baseline's rows inserted at L as they are); "
                        "off by default: against the trained sweep it ranks the layers but flags every L >= 1, "
                        "also those that lose nothing (docs/experiments.md, 2026-12-03)")
    p.add_argument("--no-knockout", action="store_true", help="skip the entry and exit knockouts")
    p.add_argument("--sweep", nargs="+", default=None,
                   help="trained sweep folders (pg-train runs with eval/, one recipe): validate each proxy "
                        "against their accuracy drop; the proxies that predict gate")
    p.add_argument("--shape", type=int_list, default=list(d.shape),
                   help="TEXT,VISION rows the prefill saving is predicted for (default: the paper's 88,576)")
    p.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap replicates (default: %(default)s)")
    p.add_argument("--n", type=int, default=d.n, help="proxy questions (default: %(default)s)")
    p.add_argument("--layers", type=int_list, default=None,
                   help="candidate layers, e.g. 0,2,4,8 (default: 0-4, 6, 8, every 4th, N)")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="largest admissible risk, a fraction (default: %(default)s)")
    p.add_argument("--risks", default=",".join(d.risks),
                   help="gating risks without a sweep (or when no proxy predicts), comma-separated, of "
                        f"{', '.join(RISKS)} (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="the proxies' forward passes (default: %(default)s)")
    p.add_argument("--skip-layers", type=int, default=d.skip_layers,
                   help="first layers left out of the attention risk (default: %(default)s)")
    _vlm_run_args(p, d, "runs/recommend", "proxy pairs and distractors",
                  "the proxies' questions: auto (the --vlm run's held-out test split if it is a pg-train run, "
                  "else tuxpaint), held-out, or ")
    return p


def _recommend_main(args: argparse.Namespace) -> int:
    from pg_analysis.recommend import format_table
    from pg_analysis.runinfo import check_writable_parent

    from .choose_layer import RecommendConfig, run_recommend, save_recommendation

    out = Path(args.out)
    check_writable_parent(out)
    none = lambda v: None if v is None or v.lower() == "none" else v  # noqa: E731
    cfg = RecommendConfig(vlm=args.vlm, align=none(args.align), attnmap=none(args.attnmap), probe=args.probe,
                          knockout=not args.no_knockout, sweep=args.sweep, shape=tuple(args.shape),
                          n_boot=args.n_boot,
                          data=args.data, coco_root=args.coco_root, n=args.n, layers=args.layers,
                          tolerance=args.tolerance, risks=tuple(x.strip() for x in args.risks.split(",") if x.strip()),
                          precision=args.precision, skip_layers=args.skip_layers, batch_size=args.batch_size,
                          seed=args.seed, device=args.device, cache_dir=args.cache_dir)
    rec = run_recommend(cfg, progress=not args.quiet)
    save_recommendation(rec, cfg, out)
    print(format_table(rec))
    r = rec["rule"]
    print(f"recommended insert layer: L = {rec['recommended_layer']} (tolerance {r['tolerance']}; risks used: "
          f"{', '.join(r['risks_used'])}{'; missing: ' + ', '.join(r['risks_missing']) if r['risks_missing'] else ''})")
    v = rec.get("validation")
    if v is not None:
        for name, p in v["proxies"].items():
            rho = "-" if p["rho"] is None else f"{p['rho']:.2f} [{p['interval'][0]:.2f}, {p['interval'][1]:.2f}]"
            verdict = "  predicts, gates" if p.get("gates") else "  predicts" if p["predicts"] else ""
            print(f"  {name:>17}: Spearman with the sweep's accuracy drop {rho}{verdict}"
                  f"{'  (' + p['why'] + ')' if p.get('why') else ''}")
        if not v.get("gating", v["predicting"]):
            print("no proxy predicts the sweep's accuracy drop and admits its free layers: the rule falls back on "
                  "--risks, unvalidated")
        f = v["frontier"]
        where = ("not trained in the sweep" if not f["trained"] else "on the measured frontier within its interval"
                 if f["on_frontier"] else f"off the measured frontier (dominated by L = {f['dominated_by']})")
        print(f"L = {f['layer']} is {where}")
    print(f"wrote {out}/: recommend.json run.json recommend.png")
    return 0


def recommend(argv: Sequence[str] | None = None) -> int:
    return run_cli(_recommend_main, recommend_parser(), argv)


recommend_main = entry_point(recommend)


# ----------------------------------------------------------------------------------------------------------------
# pg-sweep


def sweep_parser() -> argparse.ArgumentParser:
    from .choose_layer import PAPER_SHAPE

    p = Parser(prog="pg-sweep",
               description="Collect a trained insert-layer sweep (pg-train runs of one recipe at several L and seeds, "
                           "each with pg-eval's eval/) into one table: MCQ mean per L with a bootstrap interval over "
                           "seeds and questions, controls, ranking, train tokens/s, prefill time; and the Fig. 1-style "
                           "trade-off plot.")
    p.add_argument("roots", nargs="+", help="folders holding the runs (searched one level down)")
    p.add_argument("--out", default="runs/sweep-result", help="output folder (default: %(default)s)")
    p.add_argument("--shape", type=int_list, default=list(PAPER_SHAPE),
                   help="TEXT,VISION rows the prefill saving is predicted for (default: the paper's 88,576)")
    p.add_argument("--bench", default=None,
                   help="a pg-bench result at that shape (bench.json): its measured prefill time per L joins the table")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    return p


def _sweep_main(args: argparse.Namespace) -> int:
    from pg_analysis.errors import InputError
    from pg_analysis.plots import tradeoff_figure
    from pg_analysis.runinfo import atomic_output_dir, atomic_write_json, check_writable_parent
    from pg_analysis.runs import SWEEP_RESULT, write_run_record

    from .sweep import collect, predicted_savings, summarize

    if len(args.shape) != 2 or args.shape[0] < 1 or args.shape[1] < 0:
        raise InputError(f"--shape must be TEXT,VISION with TEXT >= 1 and VISION >= 0, got {args.shape}")
    if args.n_boot < 100:
        raise InputError(f"--n-boot must be >= 100, got {args.n_boot}")
    out = Path(args.out)
    check_writable_parent(out)
    runs, pending = collect(args.roots)
    result = summarize(runs, args.n_boot, args.seed)
    saving = predicted_savings(runs[0].path, [r["layer"] for r in result["table"]], tuple(args.shape))
    bench = None
    if args.bench:
        from pg_analysis.runs import BENCH_RESULT, read_result_json

        bench = read_result_json(Path(args.bench), BENCH_RESULT, "pg-bench", keys=("rows", "config", "n_layers"))
        shape = (bench["config"]["text_tokens"], bench["config"]["vision_tokens"])
        if shape != tuple(args.shape):
            raise InputError(f"{args.bench} was measured at {shape[0]} text + {shape[1]} vision rows, not "
                             f"{args.shape[0]} + {args.shape[1]} (--shape)")
        bench = {r["insert_layer"]: r["prefill_ratio"] for r in bench["rows"] if r["exit_layer"] == bench["n_layers"]}
    for row in result["table"]:
        row["saving"] = saving[row["layer"]]
        row["prefill_ratio_at_shape"] = bench.get(row["layer"]) if bench else None
    result.update(shape={"text": args.shape[0], "vision": args.shape[1]}, pending=pending, bench=args.bench)
    points = [{"layer": r["layer"], "saving": r["saving"], "accuracy": r["accuracy"], "ci95": r["interval"],
               "metric": "MCQ accuracy"} for r in result["table"]]
    with atomic_output_dir(out) as tmp:
        atomic_write_json(tmp / SWEEP_RESULT, result)
        write_run_record(tmp, "pg-sweep", vars(args))
        tradeoff_figure(points, tmp / "tradeoff.png",
                        xlabel=f"predicted prefill saving at {args.shape[0]} text + {args.shape[1]} vision rows (%)")
    print(format_sweep(result))
    if pending:
        print(f"pending (not trained or not evaluated yet): {len(pending)}")
    print(f"wrote {out}/: {SWEEP_RESULT} run.json tradeoff.png")
    return 0


def format_sweep(result: dict) -> str:
    head = (f"{'L':>3} {'runs':>4} {'MCQ':>6} {'interval':>15} {'per seed':>20} {'no-img':>7} {'shuf':>6} "
            f"{'rank4':>6} {'tok/s':>6} {'train s':>8} {'prefill xL0':>11} {'at shape':>8} {'saving':>7}")
    lines = [head]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in result["table"]:
        seeds = " ".join(f"{x:.3f}" for x in r["mcq_per_seed"])
        lines.append(f"{r['layer']:>3} {r['runs']:>4} {r['accuracy']:>6.3f} "
                     f"{'[%.3f, %.3f]' % tuple(r['interval']):>15} {seeds:>20} {f(r['no_image'], '.3f'):>7} "
                     f"{f(r['shuffled'], '.3f'):>6} {f(r['rank4'], '.3f'):>6} {f(r['tokens_per_s'], '.0f'):>6} "
                     f"{f(r['train_seconds'], '.0f'):>8} {f(r['prefill_ratio'], '.2f'):>11} "
                     f"{f(r.get('prefill_ratio_at_shape'), '.2f'):>8} {100 * r['saving']:>6.1f}%")
    shape = result.get("shape")
    if shape:
        trained = result["trained_shape"]
        lines.append(f"prefill xL0: measured at the trained shape (~{trained['text'] or 0:.0f} text + "
                     f"{trained['vision']} vision rows); at shape: pg-bench at {shape['text']} + {shape['vision']}; "
                     f"saving: predicted (FLOPs) at {shape['text']} + {shape['vision']}")
    return "\n".join(lines)


def sweep(argv: Sequence[str] | None = None) -> int:
    return run_cli(_sweep_main, sweep_parser(), argv)


sweep_main = entry_point(sweep)
