"""Benchmark: alignment_grid vs recomputing both sides per layer pair, and every metric on random features.

    python benchmarks/bench_metrics.py                  # N=1024, 25×33 layers, dims 1024 × 4096 (the paper's shape)
    python benchmarks/bench_metrics.py --naive-pairs 0  # skip the naive side

The naive side computes ``mutual_knn(xs[i], ys[j])`` from scratch for ``--naive-pairs`` randomly chosen pairs
(default: all 825) and reports the measured time; when fewer pairs are timed, the per-pair time is scaled up and
the table says so.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pg_analysis.metrics import METRICS, alignment_grid, mutual_knn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="samples (default: %(default)s)")
    p.add_argument("--lx", type=int, default=25, help="vision layers (default: %(default)s)")
    p.add_argument("--ly", type=int, default=33, help="LM layers (default: %(default)s)")
    p.add_argument("--dx", type=int, default=1024, help="vision dim (default: %(default)s)")
    p.add_argument("--dy", type=int, default=4096, help="LM dim (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="neighbours (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the grid (default: %(default)s)")
    p.add_argument("--naive-pairs", type=int, default=None, help="pairs timed naively (default: all)")
    p.add_argument("--all-metrics", action="store_true", help="also time every registered metric's grid")
    args = p.parse_args()

    torch.manual_seed(0)
    xs = torch.randn(args.lx, args.n, args.dx)
    ys = torch.randn(args.ly, args.n, args.dy)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={args.n}, "
          f"{args.lx}×{args.ly} layers, dims {args.dx}×{args.dy}, k={args.k}")

    alignment_grid(xs[:2], ys[:2], k=args.k)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        grid = alignment_grid(xs, ys, metric="mutual_knn", k=args.k)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"alignment_grid mutual_knn: best {best:.3f} s, mean {sum(times) / len(times):.3f} s "
          f"over {args.repeats} runs")

    total_pairs = args.lx * args.ly
    n_pairs = total_pairs if args.naive_pairs is None else min(args.naive_pairs, total_pairs)
    if n_pairs > 0:
        pairs = random.Random(0).sample([(i, j) for i in range(args.lx) for j in range(args.ly)], n_pairs)
        t0 = time.perf_counter()
        for i, j in pairs:
            v = mutual_knn(xs[i], ys[j], k=args.k)
            assert abs(v - float(grid[i, j])) < 1e-6
        naive = time.perf_counter() - t0
        naive_total = naive * total_pairs / n_pairs
        how = "measured" if n_pairs == total_pairs else f"scaled from {n_pairs} measured pairs"
        print(f"naive per-pair recompute: {naive_total:.1f} s for {total_pairs} pairs ({how}); "
              f"speed-up {naive_total / best:.1f}×")

    if args.all_metrics:
        for name, m in sorted(METRICS.items()):
            kw = {"k": args.k} if "k" in m.params else {}
            t0 = time.perf_counter()
            alignment_grid(xs, ys, metric=name, **kw)
            print(f"  {name:13s} grid {time.perf_counter() - t0:7.2f} s")


if __name__ == "__main__":
    main()
