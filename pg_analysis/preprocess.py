"""Feature preprocessing before scoring, as Huh et al.: clamp outliers, then L2-normalise each layer.

A separate, switchable step (``pg-align --outlier-q none --no-normalize`` turns it off):

1. one threshold per model: the ``q``-quantile of ``|x|`` over all of that model's layers, samples and dims
   (the reference's ``sort().values[int(q * numel)]``, i.e. a lower order statistic, not an interpolated quantile);
   every value is clamped to ``[-t, t]``;
2. each layer's sample vectors are scaled to unit L2 norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def outlier_threshold(layers: torch.Tensor | list[torch.Tensor], q: float) -> float:
    """``q``-quantile of ``|layers|`` for ``layers: [L, N, D]`` or a list of ``[N, D_l]`` (order statistic at index
    ``int(q * numel)``)."""
    if not 0.0 < q <= 1.0:
        raise InputError(f"outlier quantile must be in (0, 1], got {q}")
    parts = layers if isinstance(layers, list) else [layers]
    flat = torch.cat([x.detach().reshape(-1) for x in parts]).abs().float()
    idx = min(int(q * flat.numel()), flat.numel() - 1)
    return float(flat.kthvalue(idx + 1).values)


def clamp_outliers(layers: torch.Tensor, q: float | None = 0.95) -> tuple[torch.Tensor, float | None]:
    """Clamp ``layers: [L, N, D]`` at its ``q`` threshold; returns the clamped copy and the threshold used."""
    if q is None or q >= 1.0:
        return layers, None
    t = outlier_threshold(layers, q)
    return layers.clamp(-t, t), t


def preprocess_features(layers: torch.Tensor | list[torch.Tensor], q: float | None = 0.95, normalize: bool = True
                        ) -> tuple[torch.Tensor | list[torch.Tensor], float | None]:
    """Clamp (optional) then L2-normalise (optional) ``layers: [L, N, D]`` of one model, or a list of ``[N, D_l]``
    (widths differing by layer: one threshold over all of them, as for a stacked model)."""
    if isinstance(layers, list):
        t = outlier_threshold(layers, q) if q is not None and q < 1.0 else None
        out = [x.float() if t is None else x.float().clamp(-t, t) for x in layers]
        return ([F.normalize(x, dim=-1) for x in out] if normalize else out), t
    out, t = clamp_outliers(layers.float(), q)
    if normalize:
        out = F.normalize(out, dim=-1)
    return out, t
