import pytest
import torch

from pg_analysis.errors import InputError
from pg_analysis.preprocess import clamp_outliers, outlier_threshold, preprocess_features


def test_threshold_is_reference_order_statistic():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 7)
    ref = x.reshape(-1).abs().sort().values[int(0.95 * x.numel())]
    assert outlier_threshold(x, 0.95) == pytest.approx(float(ref))


def test_clamp_shares_one_threshold_across_layers_and_normalises():
    x = torch.randn(4, 30, 5)
    x[2] *= 100  # a loud layer sets the shared threshold
    out, t = preprocess_features(x, 0.9, normalize=True)
    assert t == pytest.approx(outlier_threshold(x, 0.9))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 30))
    clamped, _ = clamp_outliers(x, 0.9)
    assert clamped.abs().max() <= t + 1e-6
    assert clamp_outliers(x, None) == (x, None)


def test_bad_quantile():
    with pytest.raises(InputError):
        outlier_threshold(torch.randn(2, 3, 4), 1.5)
