import math

import pytest
import torch

from pg_analysis import metrics as M
from pg_analysis.errors import InputError


def test_mutual_knn_hand_computed():
    # 1-D points on a line (cosine needs 2-D: use angles). Points at angles 0, 10, 20, 90, 100 degrees.
    ang_a = torch.tensor([0.0, 10.0, 20.0, 90.0, 100.0]).deg2rad()
    a = torch.stack([ang_a.cos(), ang_a.sin()], 1)
    # b swaps which neighbour is nearest for sample 0: angles 0, 30, 5, 90, 100
    ang_b = torch.tensor([0.0, 30.0, 5.0, 90.0, 100.0]).deg2rad()
    b = torch.stack([ang_b.cos(), ang_b.sin()], 1)
    # k=1 neighbours  a: 0->1, 1->0 or 2 (tie 10° each; both in a), 2->1, 3->4, 4->3
    #                 b: 0->2, 1->2, 2->0, 3->4, 4->3
    # a's 1-NN of sample 1: angles 0 and 20 are both 10° away; topk picks one of them — avoid the tie:
    ang_a[1] = torch.tensor(8.0).deg2rad()
    a = torch.stack([ang_a.cos(), ang_a.sin()], 1)
    # now a: 0->1, 1->0, 2->1, 3->4, 4->3 ; shared with b: samples 3, 4 only → 2/5
    assert M.mutual_knn(a, b, k=1) == pytest.approx(0.4)
    # k=2: a: 0:{1,2} 1:{0,2} 2:{1,0} 3:{4,2} 4:{3,2}; b: 0:{2,1} 1:{2,0} 2:{0,1} 3:{4,1} 4:{3,1}
    # overlaps: 2,2,2,1,1 → 8/10
    assert M.mutual_knn(a, b, k=2) == pytest.approx(0.8)


def test_mutual_knn_self_is_one_and_invariances():
    torch.manual_seed(0)
    a = torch.randn(100, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert M.mutual_knn(a, a, k=10) == 1.0
    assert M.mutual_knn(a, a @ q, k=10) == pytest.approx(1.0)  # rotation
    assert M.mutual_knn(a, 7.5 * a, k=10) == pytest.approx(1.0)  # scale
    b = torch.randn(100, 8)
    assert M.mutual_knn(a, b, k=10) == pytest.approx(M.mutual_knn(a @ q * 3, b, k=10))


def test_mutual_knn_random_is_chance():
    torch.manual_seed(1)
    n, k = 400, 10
    vals = [M.mutual_knn(torch.randn(n, 64), torch.randn(n, 64), k=k) for _ in range(5)]
    assert sum(vals) / len(vals) == pytest.approx(k / (n - 1), abs=0.006)


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_grid_equals_pairwise(name):
    torch.manual_seed(2)
    xs = [torch.randn(60, 12) for _ in range(3)]
    ys = torch.randn(4, 60, 20)
    kw = {"k": 5} if "k" in M.METRICS[name].params else {}
    grid = M.alignment_grid(xs, ys, metric=name, **kw)
    assert grid.shape == (3, 4)
    naive = torch.tensor([[M.METRICS[name](x, y, **kw) for y in ys] for x in xs])
    torch.testing.assert_close(grid, naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_self_alignment_is_one(name):
    torch.manual_seed(3)
    a = torch.randn(50, 30)
    assert M.METRICS[name](a, a) == pytest.approx(1.0, abs=1e-5)


def test_cka_rotation_and_scale_invariant():
    torch.manual_seed(4)
    a, b = torch.randn(80, 10), torch.randn(80, 6)
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    for f in (M.cka, M.unbiased_cka):
        assert f(a @ q * 2.0, b) == pytest.approx(f(a, b), abs=1e-5)


def test_linear_cka_matches_textbook_formula():
    torch.manual_seed(5)
    a, b = torch.randn(40, 7), torch.randn(40, 9)
    ac, bc = a - a.mean(0), b - b.mean(0)
    expected = (ac.T @ bc).norm() ** 2 / ((ac.T @ ac).norm() * (bc.T @ bc).norm())
    assert M.cka(a, b) == pytest.approx(float(expected), abs=1e-5)


def test_cknna_with_all_neighbours_is_unbiased_cka():
    torch.manual_seed(6)
    a, b = torch.randn(50, 8), torch.randn(50, 8) + 0.5 * torch.randn(50, 1)
    assert M.cknna(a, b, k=None) == pytest.approx(M.unbiased_cka(a, b), abs=1e-5)
    assert M.unbiased_cka(a, b) != pytest.approx(M.cka(a, b), abs=1e-4)  # the estimators differ


def test_unbiased_cka_can_be_negative_and_best_cell_uses_argmax():
    import numpy as np

    from pg_analysis.align import AlignConfig, AlignResult

    torch.manual_seed(7)
    vals = [M.unbiased_cka(torch.randn(30, 5), torch.randn(30, 5)) for _ in range(20)]
    assert min(vals) < 0
    grid = np.array([[-0.3, -0.2], [-0.05, -0.4]])  # all negative: a best score initialised to 0 would find none
    best = AlignResult(AlignConfig(metric="unbiased_cka"), grid, None, "v", "l", 30, []).best
    assert (best["vision_layer"], best["llm_layer"], best["score"]) == (1, 0, -0.05)


def test_svcca_deterministic_and_bounded():
    torch.manual_seed(8)
    a, b = torch.randn(100, 20), torch.randn(100, 30)
    v1, v2 = M.svcca(a, b), M.svcca(a.clone(), b.clone())
    assert v1 == v2
    assert 0.0 <= v1 <= 1.0
    shared = torch.randn(100, 10)
    assert M.svcca(torch.cat([shared, a], 1), torch.cat([shared @ torch.randn(10, 10), b], 1), dim=5) > v1


def test_cycle_knn_self_is_one_and_hand_case():
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert M.cycle_knn(a, a, k=1) == 1.0
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    # b: 0->2, 1->3, 2->0, 3->1. a: 0->1, 1->0, 2->3, 3->2. cycle for i: j=b(i), does a(j) == i?
    # i=0: j=2, a(2)=3 no; i=1: j=3, a(3)=2 no; i=2: j=0, a(0)=1 no; i=3: j=1, a(1)=0 no → 0
    assert M.cycle_knn(a, b, k=1) == 0.0


def test_registry_rejects_unknown_and_duplicate():
    with pytest.raises(InputError, match="unknown metric"):
        M.get_metric("nope")
    with pytest.raises(InputError, match="already registered"):
        M.register_metric(M.METRICS["cka"])
    with pytest.raises(InputError, match="takes"):
        M.alignment_grid(torch.randn(1, 10, 3), torch.randn(1, 10, 3), metric="cka", k=3)


@pytest.mark.parametrize("bad", [
    dict(a=torch.randn(10, 3), b=torch.randn(11, 3), k=2, match="same number of samples"),
    dict(a=torch.randn(10, 3), b=torch.randn(10, 3), k=10, match="1 <= k < N"),
    dict(a=torch.randn(10, 3), b=torch.randn(10, 3), k=0, match="1 <= k < N"),
    dict(a=torch.full((10, 3), math.nan), b=torch.randn(10, 3), k=2, match="NaN/inf"),
    dict(a=torch.randn(10), b=torch.randn(10, 3), k=2, match=r"\[N, D\]"),
])
def test_bad_inputs(bad):
    with pytest.raises(InputError, match=bad["match"]):
        M.mutual_knn(bad["a"], bad["b"], k=bad["k"])


def test_grid_rejects_mismatched_layers():
    with pytest.raises(InputError, match="samples"):
        M.alignment_grid([torch.randn(10, 3), torch.randn(9, 3)], torch.randn(2, 10, 4), k=2)
    with pytest.raises(InputError, match="inf"):
        M.alignment_grid(torch.randn(2, 10, 3), torch.full((2, 10, 4), math.inf), k=2)


def test_svcca_wide_features_use_gram_path_consistently():
    torch.manual_seed(9)
    a, b = torch.randn(20, 50), torch.randn(20, 60)
    ua = torch.linalg.svd(a - a.mean(0), full_matrices=False)[0][:, :5]
    ub = torch.linalg.svd(b - b.mean(0), full_matrices=False)[0][:, :5]
    expected = float(torch.linalg.svdvals(ua.T @ ub).mean())
    assert M.svcca(a, b, dim=5) == pytest.approx(expected, abs=1e-4)
