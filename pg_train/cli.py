"""pg-bench entry point (pg-train and pg-eval join here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pg_analysis.cli import _entry, run_cli


def _int_list(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def bench_parser() -> argparse.ArgumentParser:
    from .bench import SHAPES, BenchConfig

    d = BenchConfig()
    p = argparse.ArgumentParser(prog="pg-bench",
                                description="Efficiency sweep over the insert layer L of the grounded forward pass.")
    p.add_argument("--model", default=d.model, help="causal LM: alias, local folder or hub id (default: %(default)s)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="benchmark random weights of this shape instead of --model (e.g. llama-7b on a GPU)")
    p.add_argument("--text-tokens", type=int, default=d.text_tokens, help="text rows T (default: %(default)s)")
    p.add_argument("--vision-tokens", type=int, default=d.vision_tokens, help="vision rows V (default: %(default)s)")
    p.add_argument("--layers", type=_int_list, default=None, help="insert layers, e.g. 0,2,4,8 (default: 0, N/8 … N)")
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
    from pg_analysis.runinfo import atomic_output_dir, atomic_write_json, check_writable_parent, run_metadata

    from .bench import BenchConfig, format_table, run_bench

    out = Path(args.out)
    check_writable_parent(out)
    cfg = BenchConfig(model=args.model, shape=args.shape, text_tokens=args.text_tokens,
                      vision_tokens=args.vision_tokens, layers=args.layers, batch_size=args.batch_size,
                      repeats=args.repeats, decode_tokens=args.decode_tokens, train=not args.no_train,
                      device=args.device, dtype=args.dtype)
    result = run_bench(cfg, progress=not args.quiet)
    with atomic_output_dir(out) as tmp:
        atomic_write_json(tmp / "bench.json", result)
        atomic_write_json(tmp / "config.json", {"command": "pg-bench", "config": cfg.to_dict(), **run_metadata()})
        efficiency_figure(result, tmp / "efficiency.png")
    print(format_table(result))
    print(f"wrote {out}/: bench.json config.json efficiency.png")
    return 0


def bench(argv: Sequence[str] | None = None) -> int:
    return run_cli(_bench_main, bench_parser(), argv)


bench_main = _entry(bench)
