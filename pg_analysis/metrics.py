"""Representation-alignment metrics: pure functions over feature matrices, and a layer×layer grid.

Every metric compares two sets of features of the *same* ``N`` samples, ``a: [N, Da]`` and ``b: [N, Db]``, and
returns a Python float. Computation is fp32 on whatever device the inputs live on.

Each metric is defined once, as two halves:

- ``prepare(x) -> state``: the per-layer work (a kNN mask, a centred Gram matrix, an SVD basis);
- ``compare(state_a, state_b) -> float``: the cross-layer work.

``metric(a, b)`` is ``compare(prepare(a), prepare(b))``; :func:`alignment_grid` prepares every layer once and then
compares all pairs — batched as one matrix product where the metric is bilinear in its states (mutual_knn, cka,
unbiased_cka, cycle_knn, svcca), pair by pair otherwise (cknna).

Definitions (following Huh et al. 2024, "The Platonic Representation Hypothesis", with the fixes noted):

- ``mutual_knn``: cosine kNN sets (a sample is never its own neighbour); mean over samples of
  ``|kNN_a(i) ∩ kNN_b(i)| / k``. Random features give ≈ ``k / (N - 1)``.
- ``cycle_knn``: fraction of samples ``i`` for which some ``j`` in ``kNN_b(i)`` has ``i`` in ``kNN_a(j)``.
- ``cka``: linear CKA with the biased HSIC estimator (centred Gram matrices).
- ``unbiased_cka``: linear CKA with the unbiased HSIC estimator (Song et al. 2012); needs ``N >= 4``.
- ``cknna``: CKA restricted to pairs that are mutual k-nearest neighbours in both spaces (unbiased HSIC).
  ``k=None`` means "every other sample", which makes it exactly ``unbiased_cka`` (the reference code crashes).
  Returns NaN when a self-similarity is not positive (the reference adds 1e-6 and returns a large number).
- ``svcca``: keep the top ``dim`` left singular vectors of each centred matrix (deterministic LAPACK SVD);
  the score is the mean canonical correlation between the two subspaces, i.e. the mean singular value of
  ``U_aᵀ U_b``. The reference's result depended on a random initialisation; this one does not.

Every metric here can be negative only where stated (the CKA family); code that looks for a best cell must use
``argmax``, never a best score initialised to 0.

Numerics (fp32 storage, results within 1e-6 of a float64 computation at N ≤ 4096, tested):

- ``cka`` and ``unbiased_cka`` take the Gram matrix of the *centred* features. Both are
  invariant to shifting the features, so this changes nothing in exact arithmetic, and it removes the
  cancellation that features with a large shared component (mean cosine 0.94 between SmolLM2 captions) cause.
  Norms and self-HSIC are reduced in float64, and the layer×layer product over the ``N²`` Gram entries is
  accumulated in float64 over chunks (one fp32 product with a 16.7 M-long inner dimension lost 1e-5 at N=4096).
- ``cknna`` works on the mutual-neighbour pairs only (at most ``N·k`` entries; masking makes it shift-dependent,
  so the raw Gram matrix is kept, as in the reference) and sums them in float64.
- kNN sets: identical rows get exactly equal similarities (computed once per distinct row), and samples tied at
  the k-th similarity are taken in index order (the lower sample index first), so a set never depends on the
  floating-point order of a sort.
- :func:`degenerate_reason` names layers a score means nothing for: constant rows, or k-th-neighbour similarities
  tied for most samples (their kNN sets are an arbitrary block of sample ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError
from .registry import Registry

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------------------------
# validation


def _as_matrix(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:  # noqa: BLE001 - report any conversion failure as bad input
            raise InputError(f"{name}: cannot convert to a tensor ({e})") from None
    if x.ndim != 2:
        raise InputError(f"{name}: expected a [N, D] matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise InputError(f"{name}: need at least 2 samples, got {x.shape[0]}")
    x = x.float()
    if not torch.isfinite(x.sum()):  # cheap screen; the exact count only when something may be off
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise InputError(f"{name}: features contain {bad} NaN/inf values")
    return x


def _check_k(k: int | None, n: int, *, allow_none: bool = False) -> None:
    if k is None and allow_none:
        return
    if k is None or isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an integer, got {k!r}")
    if not 1 <= k < n:
        raise InputError(f"k must satisfy 1 <= k < N (N={n}), got k={k}")


# ----------------------------------------------------------------------------------------------------------------
# shared building blocks


def gram(x: Tensor, block: int = 256) -> Tensor:
    """``x @ x.T`` for ``x: [N, D]``, computing only the upper block triangle (≈ 5/8 of the FLOPs at N=1024)."""
    n = x.shape[0]
    if n <= block:
        return x @ x.T
    g = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a in range(0, n, block):
        rows = x[a:a + block] @ x[a:].T  # [b, n - a]
        g[a:a + block, a:] = rows
        g[a + block:, a:a + block] = rows[:, block:].T
    return g


def cosine_similarities(x: Tensor) -> Tensor:
    """``[N, N]`` cosine similarities of the rows of ``x: [N, D]``; identical rows get exactly equal entries (each
    distinct row is multiplied once), so ties between duplicates are exact, not decided by rounding."""
    xn = F.normalize(x, dim=-1)
    sim = gram(xn)
    near = sim > 1 - 1e-6  # candidate duplicates; the common case has none and costs one comparison
    near.fill_diagonal_(False)
    if not near.any():
        return sim
    distinct, inverse = torch.unique(xn, dim=0, return_inverse=True)
    if distinct.shape[0] == xn.shape[0]:
        return sim
    return gram(distinct)[inverse][:, inverse]


def knn_indices(x: Tensor, k: int) -> Tensor:
    """``[N, k]`` indices of each sample's k nearest neighbours by cosine similarity, the sample itself excluded.

    Deterministic: where several samples tie at the k-th similarity, the lower sample indices are taken."""
    sim = cosine_similarities(x)
    sim.fill_diagonal_(float("-inf"))
    values, idx = sim.topk(k, dim=1)
    tied = (sim >= values[:, -1:]).sum(1) > k  # more candidates at the boundary than places left
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        idx[rows] = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def degenerate_reason(x: Tensor, k: int | None = None, tie_share: float = 0.5) -> str | None:
    """Why layer ``x: [N, D]`` cannot be scored meaningfully, or None.

    - constant rows (every sample has the same features, e.g. a CLS embedding before the first block);
    - with ``k``: the k-th and (k+1)-th neighbour similarities tie (to 1e-6) for more than ``tie_share`` of the
      samples, so most kNN sets are decided by tie-breaking, not by the features.
    """
    x = x.float()
    n = x.shape[0]
    scale = float(x.abs().max())
    if float((x - x[:1]).abs().max()) <= 1e-6 * max(scale, 1e-30):
        return f"constant rows: all {n} samples have the same features"
    if k is not None and k + 1 < n:
        sim = cosine_similarities(x)
        sim.fill_diagonal_(float("-inf"))
        top = sim.topk(k + 1, dim=1).values
        ties = (top[:, k - 1] - top[:, k]).abs() <= 1e-6 * top[:, k - 1].abs().clamp_min(1.0)
        share = float(ties.float().mean())
        if share > tie_share:
            return (f"k-th neighbour ties: for {share:.0%} of the {n} samples the {k}-th and {k + 1}-th most "
                    "similar samples are equally similar, so their kNN sets are decided by tie-breaking")
    return None


def knn_mask(x: Tensor, k: int) -> Tensor:
    """0/1 float mask ``[N, N]``; row i marks the k nearest neighbours of i by cosine similarity, i excluded."""
    idx = knn_indices(x, k)
    return torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0)


def _centred(x: Tensor) -> Tensor:
    """``x`` minus its column means: ``gram(_centred(x)) = H·gram(x)·H`` without the cancellation of centring the
    Gram matrix (a float32 mean suffices: the metrics are shift-invariant, a residual offset of 1e-7 is harmless)."""
    return x - x.mean(0, keepdim=True)


def _unbiased_hsic_operand(kt: Tensor) -> Tensor:
    """``U(K̃)`` such that ``HSIC_u(K, L) = <U(K̃), L̃>_F / (n (n-3))`` for zero-diagonal ``K̃, L̃`` (Song et al.)."""
    n = kt.shape[0]
    r = kt.sum(1, keepdim=True)
    return kt + kt.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * r.expand(n, n)


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC estimator of two ``[N, N]`` kernels (diagonals ignored; need not be symmetric)."""
    n = k.shape[0]
    kt = k.clone().fill_diagonal_(0)
    lt = l.clone().fill_diagonal_(0)
    value = (
        (kt * lt.T).sum()
        + kt.sum() * lt.sum() / ((n - 1) * (n - 2))
        - 2.0 * (kt.sum(0) * lt.sum(1)).sum() / (n - 2)
    )
    return value / (n * (n - 3))


# ----------------------------------------------------------------------------------------------------------------
# metric definitions: prepare / compare (and an optional batched grid over prepared states)


def _mknn_prepare(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    idx = knn_indices(x, k)
    mask = torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0)
    return idx, mask  # [N, k], [N, N]


def _mknn_compare(sa: tuple[Tensor, Tensor], sb: tuple[Tensor, Tensor], k: int) -> float:
    idx_a, _ = sa
    _, mask_b = sb
    rows = torch.arange(idx_a.shape[0], device=idx_a.device)[:, None]
    return float(mask_b[rows, idx_a].sum() / (idx_a.numel()))


def _mknn_grid(sx: list, sy: list, k: int) -> Tensor:
    # |kNN_a(i) ∩ kNN_b(i)| = sum over a's k neighbour indices of b's mask row: a gather of N·k values per pair.
    return torch.tensor([[_mknn_compare(a, b, k) for b in sy] for a in sx], dtype=torch.float32)


def _cycle_compare(sa: tuple[Tensor, Tensor], sb: tuple[Tensor, Tensor], k: int) -> float:
    # sample i returns iff some j in kNN_b(i) has i in kNN_a(j): mask_a[j, i] for j in idx_b[i]
    _, mask_a = sa
    idx_b, _ = sb
    rows = torch.arange(idx_b.shape[0], device=idx_b.device)[:, None]
    return float((mask_a.T[rows, idx_b].sum(1) > 0).float().mean())


def _cycle_grid(sx: list, sy: list, k: int) -> Tensor:
    a = torch.stack([s[1] for s in sx]).permute(2, 1, 0)  # [i, j, Lx]: ma_x[j, i]
    b = torch.stack([s[1] for s in sy]).permute(1, 0, 2)  # [i, Ly, j]: mb_y[i, j]
    counts = torch.bmm(b, a)  # [i, Ly, Lx]
    return (counts > 0).float().mean(0).T


def _cka_prepare(x: Tensor) -> Tensor:
    kc = gram(_centred(x))  # = H K H
    norm = float(torch.linalg.vector_norm(kc, dtype=torch.float64))
    if norm <= 0:
        raise InputError("cka: features have zero variance (all samples identical)")
    return kc.div_(norm)


def _dot64(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum(dtype=torch.float64))


def _cka_compare(sa: Tensor, sb: Tensor) -> float:
    return _dot64(sa, sb)


def _flat_dot_grid(sx: list[Tensor], sy: list[Tensor], chunk: int = 1 << 20) -> Tensor:
    """``[Lx, Ly]`` inner products of flattened states: fp32 products over chunks of ``chunk`` entries, summed in
    float64 (one product over all ``N²`` entries loses ~1e-5 at N = 4096)."""
    a = torch.stack(sx).reshape(len(sx), -1)
    b = torch.stack(sy).reshape(len(sy), -1)
    out = torch.zeros(len(sx), len(sy), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], chunk):
        out += (a[:, start:start + chunk] @ b[:, start:start + chunk].T).double()
    return out


def _ucka_prepare(x: Tensor) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    if n < 4:
        raise InputError(f"unbiased_cka needs N >= 4 samples, got {n}")
    kt = gram(_centred(x)).fill_diagonal_(0)  # unbiased HSIC of a linear kernel is shift-invariant
    u = _unbiased_hsic_operand(kt)
    self_hsic = float((u * kt).sum(dtype=torch.float64))
    if self_hsic <= 0:
        raise InputError("unbiased_cka: non-positive self-HSIC (degenerate features)")
    scale = self_hsic ** -0.5
    return u.mul_(scale), kt.mul_(scale)


def _ucka_compare(sa: tuple[Tensor, Tensor], sb: tuple[Tensor, Tensor]) -> float:
    return _dot64(sa[0], sb[1])


def _ucka_grid(sx: list, sy: list) -> Tensor:
    return _flat_dot_grid([s[0] for s in sx], [s[1] for s in sy])


def _hsic_unbiased_pairs(rows: Tensor, cols: Tensor, v: Tensor, w: Tensor, n: int) -> float:
    """:func:`hsic_unbiased` of two ``[n, n]`` kernels that are zero except at the off-diagonal entries
    ``(rows, cols)`` (unique), where they hold ``v`` and ``w``; in float64, in ``O(nnz log nnz)``."""
    v, w = v.double(), w.double()
    key, back = rows * n + cols, cols * n + rows
    order = torch.argsort(key)
    pos = torch.searchsorted(key[order], back).clamp(max=max(len(key) - 1, 0))
    hit = key[order][pos] == back if len(key) else torch.zeros(0, dtype=torch.bool)
    w_t = torch.zeros_like(w)  # l[j, i] at each stored (i, j): the transpose term of hsic_unbiased
    w_t[hit] = w[order[pos[hit]]]
    col_k = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, cols, v)
    row_l = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, rows, w)
    value = ((v * w_t).sum() + v.sum() * w.sum() / ((n - 1) * (n - 2))
             - 2.0 * (col_k * row_l).sum() / (n - 2))
    return float(value / (n * (n - 3)))


def _cknna_prepare(x: Tensor, k: int | None) -> tuple:
    n = x.shape[0]
    if n < 4:
        raise InputError(f"cknna needs N >= 4 samples, got {n}")
    if k is None:  # every other sample: exactly unbiased CKA
        return ("all", _ucka_prepare(x))
    g = gram(x)
    idx = knn_indices(x, k)
    rows = torch.arange(n, device=x.device)[:, None].expand(n, k).reshape(-1)
    cols = idx.reshape(-1)
    vals = g[rows, cols]
    return ("knn", g, idx, _hsic_unbiased_pairs(rows, cols, vals, vals, n))


def _cknna_compare(sa: tuple, sb: tuple, k: int | None) -> float:
    if sa[0] == "all":
        return _ucka_compare(sa[1], sb[1])
    _, ka, idx_a, kk = sa
    _, lb, idx_b, ll = sb
    denom = kk * ll
    if denom <= 0:
        return float("nan")
    n, kn = idx_a.shape
    mutual = (idx_a[:, :, None] == idx_b[:, None, :]).any(-1)  # j in kNN_a(i) and in kNN_b(i)
    rows = torch.arange(n, device=idx_a.device)[:, None].expand(n, kn)[mutual]
    cols = idx_a[mutual]
    return _hsic_unbiased_pairs(rows, cols, ka[rows, cols], lb[rows, cols], n) / denom ** 0.5


def _svcca_prepare(x: Tensor, dim: int) -> Tensor:
    if dim < 1:
        raise InputError(f"svcca: dim must be >= 1, got {dim}")
    xc = x - x.mean(0, keepdim=True)
    if xc.shape[1] >= xc.shape[0]:
        # wide features: the left singular vectors are the eigenvectors of the N×N Gram matrix (much cheaper)
        evals, evecs = torch.linalg.eigh(gram(xc))
        s2, u = evals.flip(0).clamp_min(0), evecs.flip(1)
        s = s2.sqrt()
    else:
        u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    rank = int((s > s.max() * max(xc.shape) * 1e-6).sum())
    if rank < dim:
        raise InputError(f"svcca: features have rank {rank} < dim={dim}")
    return u[:, :dim]


def _svcca_compare(ua: Tensor, ub: Tensor, dim: int) -> float:
    return float(torch.linalg.svdvals(ua.T @ ub).clamp(max=1.0).mean())


def _svcca_grid(sx: list[Tensor], sy: list[Tensor], dim: int) -> Tensor:
    m = torch.einsum("and,bne->abde", torch.stack(sx), torch.stack(sy))
    return torch.linalg.svdvals(m).clamp(max=1.0).mean(-1)


# ----------------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Metric:
    """A registered metric: ``prepare`` per layer, ``compare`` per pair, ``grid`` batched over prepared layers."""

    name: str
    prepare: Callable[..., Any]
    compare: Callable[..., float]
    grid: Callable[..., Tensor] | None
    params: tuple[str, ...]  # keyword parameters it takes, e.g. ("k",)
    defaults: dict[str, Any]
    doc: str

    def kwargs(self, **given: Any) -> dict[str, Any]:
        unknown = set(given) - set(self.params)
        if unknown:
            raise InputError(f"metric {self.name!r} takes {list(self.params)}, not {sorted(unknown)}")
        return {**self.defaults, **given}

    def __call__(self, a: Any, b: Any, **kw: Any) -> float:
        a = _as_matrix(a, "a")
        b = _as_matrix(b, "b")
        if a.shape[0] != b.shape[0]:
            raise InputError(f"a and b must have the same number of samples, got {a.shape[0]} and {b.shape[0]}")
        kw = self.kwargs(**kw)
        _validate_params(self, kw, a.shape[0])
        return self.compare(self.prepare(a, **kw), self.prepare(b, **kw), **_compare_kw(self, kw))


def _compare_kw(metric: Metric, kw: dict[str, Any]) -> dict[str, Any]:
    return {p: kw[p] for p in metric.params}


def _validate_params(metric: Metric, kw: dict[str, Any], n: int) -> None:
    if "k" in metric.params:
        _check_k(kw["k"], n, allow_none=metric.name == "cknna")


METRICS: Registry[Metric] = Registry("metric")


def register_metric(metric: Metric) -> Metric:
    return METRICS.register(metric.name, metric)


def get_metric(name: str) -> Metric:
    return METRICS.lookup(name)


def _no_kw(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args, **_: fn(*args)


register_metric(Metric("mutual_knn", _mknn_prepare, _mknn_compare, _mknn_grid, ("k",), {"k": 10},
                       "mean fraction of shared cosine k-nearest neighbours"))
register_metric(Metric("cycle_knn", _mknn_prepare, _cycle_compare, _cycle_grid, ("k",), {"k": 10},
                       "fraction of samples whose b-neighbours have them as a-neighbours"))
register_metric(Metric("cka", _no_kw(_cka_prepare), _no_kw(_cka_compare), _no_kw(_flat_dot_grid), (), {},
                       "linear CKA, biased HSIC"))
register_metric(Metric("unbiased_cka", _no_kw(_ucka_prepare), _no_kw(_ucka_compare), _no_kw(_ucka_grid), (), {},
                       "linear CKA, unbiased HSIC"))
register_metric(Metric("cknna", _cknna_prepare, _cknna_compare, None, ("k",), {"k": 10},
                       "CKA restricted to mutual kNN pairs (k=None: all pairs = unbiased_cka)"))
register_metric(Metric("svcca", _svcca_prepare, _svcca_compare, _svcca_grid, ("dim",), {"dim": 10},
                       "mean canonical correlation of the top-dim SVD subspaces"))


def mutual_knn(a: Any, b: Any, k: int = 10) -> float:
    """Mutual k-NN alignment of ``a: [N, Da]`` and ``b: [N, Db]``: mean of ``|kNN_a(i) ∩ kNN_b(i)| / k``.

    >>> import torch
    >>> x = torch.randn(50, 8)
    >>> mutual_knn(x, 3 * x, k=5)
    1.0
    """
    return METRICS["mutual_knn"](a, b, k=k)


def cycle_knn(a: Any, b: Any, k: int = 10) -> float:
    """Cycle k-NN of ``a: [N, Da]``, ``b: [N, Db]`` (see module docstring)."""
    return METRICS["cycle_knn"](a, b, k=k)


def cka(a: Any, b: Any) -> float:
    """Linear CKA (biased HSIC) of ``a: [N, Da]`` and ``b: [N, Db]``."""
    return METRICS["cka"](a, b)


def unbiased_cka(a: Any, b: Any) -> float:
    """Linear CKA with the unbiased HSIC estimator of ``a: [N, Da]`` and ``b: [N, Db]``."""
    return METRICS["unbiased_cka"](a, b)


def cknna(a: Any, b: Any, k: int | None = 10) -> float:
    """CKNNA of ``a: [N, Da]``, ``b: [N, Db]``; ``k=None`` uses all pairs and equals :func:`unbiased_cka`."""
    return METRICS["cknna"](a, b, k=k)


def svcca(a: Any, b: Any, dim: int = 10) -> float:
    """SVCCA of ``a: [N, Da]``, ``b: [N, Db]`` over the top-``dim`` singular subspaces (deterministic)."""
    return METRICS["svcca"](a, b, dim=dim)


# ----------------------------------------------------------------------------------------------------------------
# the grid


def _as_layers(xs: Any, name: str) -> list[Tensor]:
    if isinstance(xs, Tensor):
        if xs.ndim != 3:
            raise InputError(f"{name}: expected [L, N, D] or a list of [N, D], got shape {tuple(xs.shape)}")
        xs = list(xs.unbind(0))
    if not isinstance(xs, Sequence) or len(xs) == 0:
        raise InputError(f"{name}: expected a non-empty [L, N, D] tensor or list of [N, D] matrices")
    return [_as_matrix(x, f"{name}[{i}]") for i, x in enumerate(xs)]


def prepare_layers(xs: Any, metric: str = "mutual_knn", **kw: Any) -> list[Any]:
    """Per-layer states of ``xs: [L, N, D]`` for ``metric`` (the work :func:`alignment_grid` does once per layer)."""
    return _prepare(get_metric(metric), _as_layers(xs, "xs"), kw)


def _prepare(m: Metric, layers: list[Tensor], kw: dict[str, Any]) -> list[Any]:
    kw = m.kwargs(**kw)
    _validate_params(m, kw, layers[0].shape[0])
    with torch.no_grad():
        return [m.prepare(x, **kw) for x in layers]


def grid_from_states(sx: list[Any], sy: list[Any], metric: str = "mutual_knn", **kw: Any) -> Tensor:
    """``[Lx, Ly]`` scores of prepared layer states (see :func:`prepare_layers`)."""
    m = get_metric(metric)
    ckw = _compare_kw(m, m.kwargs(**kw))
    with torch.no_grad():
        if m.grid is not None:
            return m.grid(sx, sy, **ckw).float()
        return torch.tensor([[m.compare(a, b, **ckw) for b in sy] for a in sx], dtype=torch.float32)


def alignment_grid(xs: Any, ys: Any, metric: str = "mutual_knn", **kw: Any) -> Tensor:
    """Score every layer of ``xs: [Lx, N, Dx]`` against every layer of ``ys: [Ly, N, Dy]`` → ``[Lx, Ly]`` fp32.

    Per-layer work (kNN sets, Gram matrices, SVD bases) is done once per layer, not once per pair.
    ``xs`` / ``ys`` may be 3-D tensors or lists of ``[N, D]`` matrices (dims may differ between lists).

    >>> import torch
    >>> g = alignment_grid(torch.randn(3, 40, 8), torch.randn(2, 40, 16), metric="mutual_knn", k=5)
    >>> tuple(g.shape)
    (3, 2)
    """
    m = get_metric(metric)
    lx = _as_layers(xs, "xs")
    ly = _as_layers(ys, "ys")
    n = lx[0].shape[0]
    for name, layers in (("xs", lx), ("ys", ly)):
        for i, x in enumerate(layers):
            if x.shape[0] != n:
                raise InputError(f"{name}[{i}] has {x.shape[0]} samples, expected N={n} like xs[0]")
    return grid_from_states(_prepare(m, lx, kw), _prepare(m, ly, kw), metric, **kw)
