"""Benchmark: the CKA family against a float64 computation, and its grid time, on clustered features.

    python benchmarks/bench_numerics.py                       # N = 1024, 2048, 4096; dims 384 × 576
    python benchmarks/bench_numerics.py --n 1024 --layers 4   # time a 4 × 4 grid too

Clustered features (eight clusters around a large shared offset, mean cosine ≈ 0.93) are where fp32 loses digits:
the Gram matrix carries the offset, the HSIC terms cancel it. Each row prints |fp32 result − float64 result| per
metric; ``cknna`` is compared with the same neighbour sets (which samples are neighbours may legitimately differ
between fp32 and float64 features at near-ties).
"""

from __future__ import annotations

import argparse
import time

import torch

from pg_analysis import metrics as M


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    offset, centres = torch.randn(d, generator=g) * 4.0, torch.randn(8, d, generator=g)
    return offset + centres[torch.randint(0, 8, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def reference(a: torch.Tensor, b: torch.Tensor, k: int) -> dict[str, float]:
    """float64 values of cka, unbiased_cka and cknna (with the library's fp32 neighbour sets)."""
    a64, b64 = a.double(), b.double()
    ac, bc = a64 - a64.mean(0), b64 - b64.mean(0)
    kca, kcb = ac @ ac.T, bc @ bc.T
    ka, kb = a64 @ a64.T, b64 @ b64.T
    n = a.shape[0]
    ma = torch.zeros(n, n, dtype=torch.float64).scatter_(1, M.knn_indices(a, k), 1.0)
    mb = torch.zeros(n, n, dtype=torch.float64).scatter_(1, M.knn_indices(b, k), 1.0)
    h = M.hsic_unbiased
    return {"cka": float((kca * kcb).sum() / (kca.norm() * kcb.norm())),
            "unbiased_cka": float(h(ka, kb) / (h(ka, ka) * h(kb, kb)).sqrt()),
            "cknna": float(h(ma * mb * ka, ma * mb * kb) / (h(ma * ka, ma * ka) * h(mb * kb, mb * kb)).sqrt())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096], help="sample counts (default: %(default)s)")
    p.add_argument("--dims", type=int, nargs=2, default=[384, 576], help="feature dims (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="neighbours for cknna (default: %(default)s)")
    p.add_argument("--layers", type=int, default=1, help="layers per side in the timed grid (default: %(default)s)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dims {args.dims[0]} × {args.dims[1]}, "
          f"k={args.k}, {args.layers}×{args.layers} grid")
    for n in args.n:
        a, b = clustered(n, args.dims[0], 1), clustered(n, args.dims[1], 2)
        b[:, :100] += 0.5 * a[:, :100]
        ref = reference(a, b, args.k)
        cells = []
        for name in ("cka", "unbiased_cka", "cknna"):
            kw = {"k": args.k} if name == "cknna" else {}
            t0 = time.perf_counter()
            got = M.alignment_grid([a] * args.layers, [b] * args.layers, metric=name, **kw)
            seconds = time.perf_counter() - t0
            cells.append(f"{name} |Δ| {abs(float(got[0, 0]) - ref[name]):.1e} ({seconds:.2f} s)")
        print(f"N={n}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
