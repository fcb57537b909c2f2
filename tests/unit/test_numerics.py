"""Alignment numerics on hand-made cases: the CKA family against float64, degenerate layers, exact duplicates and
deterministic kNN ties, duplicate pairs, and p-values that say when they are a bound."""

import numpy as np
import pytest
import torch

from pg_analysis import metrics as M
from pg_analysis.align import AlignConfig, AlignResult, score_features


def clustered(n: int, d: int, seed: int, shift: float = 4.0) -> torch.Tensor:
    """Eight tight clusters around a large shared offset: mean cosine ≈ 0.93, as real LM features."""
    g = torch.Generator().manual_seed(seed)
    offset, centres = torch.randn(d, generator=g) * shift, torch.randn(8, d, generator=g)
    return offset + centres[torch.randint(0, 8, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def cka64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    ka, kb = a @ a.T, b @ b.T
    return float((ka * kb).sum() / (ka.norm() * kb.norm()))


def hsic_u64(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC, written out in float64 (independent of the library's)."""
    n = k.shape[0]
    k, l = k.double().clone().fill_diagonal_(0), l.double().clone().fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    t = (k * l.T).sum() + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2)) \
        - 2 * (one.T @ k @ l @ one) / (n - 2)
    return t.squeeze() / (n * (n - 3))


def ucka64(a: torch.Tensor, b: torch.Tensor) -> float:
    ka, kb = a.double() @ a.double().T, b.double() @ b.double().T
    return float(hsic_u64(ka, kb) / (hsic_u64(ka, ka) * hsic_u64(kb, kb)).sqrt())


@pytest.mark.parametrize("n", [1024, 4096])
def test_cka_family_within_1e6_of_float64_on_clustered_features(n):
    a, b = clustered(n, 24, seed=1), clustered(n, 40, seed=2)
    b[:, :12] += 0.7 * a[:, :12]  # some shared signal
    grid = {m: float(M.alignment_grid([a], [b], metric=m)[0, 0]) for m in ("cka", "unbiased_cka")}
    assert abs(grid["cka"] - cka64(a, b)) <= 1e-6
    assert abs(grid["unbiased_cka"] - ucka64(a, b)) <= 1e-6
    assert abs(M.cka(a, b) - cka64(a, b)) <= 1e-6  # the pairwise path too
    if n == 1024:  # the unbiased estimator directly (O(N³) reference above: small N only)
        assert abs(M.unbiased_cka(a, b) - ucka64(a, b)) <= 1e-6


def test_cknna_equals_float64_with_the_same_neighbour_sets():
    n, k = 600, 10
    a, b = clustered(n, 16, seed=3), clustered(n, 20, seed=4)
    b[:, :8] += a[:, :8]
    ia, ib = M.knn_indices(a, k), M.knn_indices(b, k)
    ma = torch.zeros(n, n, dtype=torch.float64).scatter_(1, ia, 1.0)
    mb = torch.zeros(n, n, dtype=torch.float64).scatter_(1, ib, 1.0)
    ka, kb = a.double() @ a.double().T, b.double() @ b.double().T
    want = hsic_u64(ma * mb * ka, ma * mb * kb) / (hsic_u64(ma * ka, ma * ka) * hsic_u64(mb * kb, mb * kb)).sqrt()
    assert abs(M.cknna(a, b, k=k) - float(want)) <= 1e-6
    assert M.cknna(a, b, k=None) == pytest.approx(M.unbiased_cka(a, b), abs=1e-9)


def test_centring_leaves_the_cka_family_unchanged_in_float64():
    a, b = torch.randn(64, 7, dtype=torch.float64), torch.randn(64, 9, dtype=torch.float64)
    assert ucka64(a + 5.0, b - 3.0) == pytest.approx(ucka64(a, b), abs=1e-10)  # why centring first is allowed


def test_exact_duplicates_tie_exactly_and_the_lower_index_wins():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g)
    x[17] = x[4]  # identical rows
    sim = M.cosine_similarities(x)
    assert torch.equal(sim[:, 4], sim[:, 17])
    # a sample whose k-th neighbour is the duplicated pair: the boundary tie goes to index 4
    order = torch.sort(sim[0].masked_fill(torch.arange(30) == 0, -2), descending=True).indices.tolist()
    k = order.index(4) + 1 if order.index(4) < order.index(17) else order.index(17) + 1
    assert 4 in M.knn_indices(x, k)[0].tolist() and 17 not in M.knn_indices(x, k)[0].tolist()
    perm = torch.randperm(30, generator=g)
    for _ in range(3):  # the same sets every time
        assert torch.equal(M.knn_indices(x[perm], 5), M.knn_indices(x[perm], 5))


def test_degenerate_layers_are_named():
    x = torch.randn(40, 8)
    assert M.degenerate_reason(x, k=5) is None
    assert "constant rows" in M.degenerate_reason(x[:1].expand(40, 8).clone(), k=5)
    four = torch.randn(4, 8).repeat_interleave(10, 0)  # 4 groups of 10 identical rows
    assert "ties" in M.degenerate_reason(four, k=5)  # 9 copies compete for 5 places: tie-breaking decides
    assert M.degenerate_reason(four, k=9) is None  # exactly the 9 copies: the sets are determined
    assert M.degenerate_reason(four, k=None) is None  # CKA-type metrics are well defined there


def _features(n=60, lv=3, ll=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g)
    vf = torch.stack([base + 0.3 * i * torch.randn(n, 6, generator=g) for i in range(lv)])
    tf = torch.stack([base @ torch.randn(6, 10, generator=g) + 0.5 * torch.randn(n, 10, generator=g)
                      for _ in range(ll)])
    vf[0] = vf[0, :1]  # vision layer 0: one CLS embedding for every image
    return vf, tf


@pytest.mark.parametrize("metric", ["mutual_knn", "cka"])
def test_pg_align_scores_around_a_degenerate_layer(metric):
    vf, tf = _features()
    cfg = AlignConfig(metric=metric, k=5, null=9, seed=0)
    grid, null, info = score_features(vf, tf, cfg, progress=False)
    assert np.isnan(grid[0]).all() and np.isfinite(grid[1:]).all()
    assert np.isnan(null[:, 0]).all() and np.isfinite(null[:, 1:]).all()
    assert "constant rows" in info["degenerate"]["vision"]["0"] and info["degenerate"]["llm"] == {}
    result = AlignResult(cfg, grid, null, "v", "l", vf.shape[1], [str(i) for i in range(vf.shape[1])], info)
    s = result.summary()
    assert s["best"]["vision_layer"] != 0
    assert s["grid"][0] == [None] * 4 and s["vision_layer_profile"][0] is None
    assert s["llm_layer_profile"] == pytest.approx(np.nanmax(grid, 0).tolist())
    assert s["null"]["z"][0] == [None] * 4 and s["null"]["p"][0] == [None] * 4
    assert s["degenerate"]["vision"]["0"].startswith("constant rows")


def test_p_value_is_a_bound_when_no_null_grid_reaches_the_observed():
    cfg = AlignConfig(null=20)
    grid = np.array([[0.9, 0.1]], dtype=np.float32)
    null = np.stack([np.array([[0.2, 0.1 + 0.01 * (i % 3)]], dtype=np.float32) for i in range(20)])
    s = AlignResult(cfg, grid, null, "v", "l", 100, [], {}).summary()["null"]
    assert s["p_is_bound"] == [[True, False]]
    assert s["best_cell_p"] == pytest.approx(1 / 21) and s["best_cell_p_is_bound"]
    assert s["best_cell_p_text"].startswith("p ≤ 0.0476")
    assert s["p"][0][1] == pytest.approx((1 + 20) / 21)  # every null grid reached 0.1


def test_duplicate_pairs_are_counted_and_deduped(tmp_path):
    from PIL import Image

    from pg_analysis.data import dedupe, duplicate_report, load_pairs_file

    rows = []
    for i, (colour, caption) in enumerate([((255, 0, 0), "A frog."), ((0, 255, 0), "A frog."),
                                           ((0, 0, 255), "A lion."), ((255, 0, 0), "A red square."),
                                           ((9, 9, 9), "A wombat.")]):
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{i}.png")
        rows.append(f'{{"id": "p{i}", "image": "{i}.png", "caption": "{caption}"}}')
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    ds = load_pairs_file(tmp_path / "pairs.jsonl")
    report = duplicate_report(ds)
    assert report["captions"] == {"pairs_sharing": 2, "groups": 1, "group_ids": [["p0", "p1"]]}
    assert report["images"]["group_ids"] == [["p0", "p3"]]
    kept, dropped = dedupe(ds)
    assert list(kept["id"]) == ["p0", "p2", "p4"] and dropped == ["p1", "p3"]
