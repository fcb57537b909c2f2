"""The pg-align pipeline: features → preprocessing → grid → shuffled-pairs null → saved result.

>>> cfg = AlignConfig(n=64, null=5)             # doctest: +SKIP
>>> result = run_align(cfg)                      # doctest: +SKIP
>>> save_align_result(result, Path("runs/align"))  # doctest: +SKIP

Degenerate layers (:func:`pg_analysis.metrics.degenerate_reason`: constant rows, or kNN sets decided by
tie-breaking) are not scored: their cells are NaN (``null`` in JSON), left out of the best cell, the profiles and
the null, and named in ``alignment.json``. p-values are permutation p-values ``(1 + #{null ≥ observed}) / (P + 1)``;
where no null grid reaches the observed value that is an upper bound, ``p ≤ 1/(P + 1)``, and is marked as one.

Output folder (written under a temp name, renamed when complete):

- ``grid.npy`` — ``[Lv, Ll]`` float32, rows = vision layers, columns = LM layers, index 0 = embeddings output;
- ``null.npy`` — ``[P, Lv, Ll]`` grids under P random re-pairings (absent when ``null=0``);
- ``alignment.json`` — best cell, per-LM-layer profile, null mean/std, z-scores and p-values per cell, the
  degenerate layers (which, and why) and the duplicate captions and images among the pairs;
- ``heatmap.png`` — the grid in the paper's orientation (LM layers vertical) and the z-score panel, degenerate
  layers and undefined z hatched;
- ``run.json`` — every option, runtime, package versions, git commit, feature-cache files.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError
from .metrics import degenerate_reason, get_metric, grid_from_states, prepare_layers
from .features import n_samples
from .preprocess import preprocess_features
from .registry import DEFAULT_LM
from .runinfo import atomic_output_dir, atomic_write_bytes, atomic_write_json
from .runs import ALIGN_RESULT, read_result_json, write_run_record

log = logging.getLogger(__name__)


@dataclass
class AlignConfig:
    """All options of one pg-align run. Validates itself; does no I/O."""

    vision: str | None = None  # the encoder (of any modality); None: the modality's default (DINOv2-S for images)
    llm: str = DEFAULT_LM
    data: str | None = None  # None: the modality's default pairs (tuxpaint for images, molecules for molecules)
    coco_root: str | None = None
    n: int | None = None  # None: every pair of the source
    seed: int = 0
    metric: str = "mutual_knn"
    k: int = 10
    vision_pooling: str | None = None  # None: the modality's (cls; mean for audio)
    text_pooling: str = "mean"
    outlier_q: float | None = 0.95
    normalize: bool = True
    null: int = 20
    batch_size: int = 16
    max_length: int = 128
    device: str | None = None
    dtype: str | None = "float32"
    cache_dir: str | None = None
    dedupe: bool = False  # keep one pair of each identical caption / identical image (off: as Huh et al. score)
    modality: str = "image"

    def __post_init__(self) -> None:
        from .features import TEXT_POOLING, VISION_POOLING
        from .modalities import get_modality

        modality = get_modality(self.modality)
        self.vision = self.vision or modality.default_encoder
        self.data = self.data or modality.default_data
        self.vision_pooling = self.vision_pooling or modality.default_pooling
        get_metric(self.metric)
        if self.vision_pooling not in VISION_POOLING:
            raise InputError(f"encoder pooling must be one of {VISION_POOLING}, got {self.vision_pooling!r}")
        if self.text_pooling not in TEXT_POOLING:
            raise InputError(f"text pooling must be one of {TEXT_POOLING}, got {self.text_pooling!r}")
        if self.n is not None and self.n < 2:
            raise InputError(f"n must be >= 2, got {self.n}")
        if self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")
        if self.n is not None and self.k >= self.n:
            raise InputError(f"k must be < n (k={self.k}, n={self.n})")
        if self.null < 0:
            raise InputError(f"null must be >= 0, got {self.null}")
        if self.outlier_q is not None and not 0 < self.outlier_q <= 1:
            raise InputError(f"outlier quantile must be in (0, 1], got {self.outlier_q}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AlignConfig":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def metric_kwargs(self) -> dict[str, Any]:
        return {"k": self.k} if "k" in get_metric(self.metric).params else {}


@dataclass
class AlignResult:
    """A finished alignment: ``grid [Lv, Ll]``, optional ``null [P, Lv, Ll]``, and provenance."""

    config: AlignConfig
    grid: np.ndarray
    null: np.ndarray | None
    vision_label: str
    llm_label: str
    n_samples: int
    sample_ids: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def degenerate(self) -> dict[str, dict[str, str]]:
        """``{"vision": {layer: reason}, "llm": {layer: reason}}`` for the layers left unscored."""
        return self.info.get("degenerate", {"vision": {}, "llm": {}})

    @property
    def best(self) -> dict[str, Any]:
        i, j = np.unravel_index(int(np.nanargmax(self.grid)), self.grid.shape)
        return {"vision_layer": int(i), "llm_layer": int(j), "score": float(self.grid[i, j])}

    def null_stats(self) -> dict[str, Any] | None:
        if self.null is None or len(self.null) == 0:
            return None
        p_count = len(self.null)
        mean = self.null.mean(0)
        std = self.null.std(0, ddof=1) if p_count > 1 else np.zeros_like(self.grid)
        scored = np.isfinite(self.grid)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(scored & (std > 0), (self.grid - mean) / std, np.nan)
        reached = (self.null >= self.grid[None]).sum(0)
        p = np.where(scored, (1 + reached) / (p_count + 1), np.nan)
        return {"permutations": p_count, "mean": float(np.nanmean(self.null)), "std": float(np.nanstd(self.null)),
                "cell_mean": mean, "cell_std": std, "z": z, "p": p, "p_is_bound": scored & (reached == 0)}

    def summary(self) -> dict[str, Any]:
        best = self.best
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a degenerate layer's profile entry
            llm_profile, vision_profile = np.nanmax(self.grid, 0), np.nanmax(self.grid, 1)
        out: dict[str, Any] = {
            "vision": self.vision_label, "llm": self.llm_label, "metric": self.config.metric, "k": self.config.k,
            "modality": self.config.modality, "n_samples": self.n_samples, "shape": list(self.grid.shape),
            "axes": {"rows": f"{self.config.modality} encoder layer (0 = embeddings)",
                     "cols": "LM layer (0 = embeddings)"},
            "best": best, "chance_mutual_knn": self.config.k / (self.n_samples - 1),
            "llm_layer_profile": _json_floats(llm_profile), "vision_layer_profile": _json_floats(vision_profile),
            "grid": _json_floats(self.grid), "degenerate": self.degenerate,
            "duplicates": self.info.get("duplicates"),
        }
        stats = self.null_stats()
        if stats is not None:
            i, j = best["vision_layer"], best["llm_layer"]
            bound = bool(stats["p_is_bound"][i, j])
            out["null"] = {"permutations": stats["permutations"], "mean": stats["mean"], "std": stats["std"],
                           "best_cell_z": _json_float(stats["z"][i, j]), "best_cell_p": float(stats["p"][i, j]),
                           "best_cell_p_is_bound": bound,
                           "best_cell_p_text": p_text(float(stats["p"][i, j]), bound, stats["permutations"]),
                           "z": _json_floats(stats["z"]), "p": _json_floats(stats["p"]),
                           "p_is_bound": stats["p_is_bound"].tolist()}
        return out


def p_text(p: float, bound: bool, permutations: int) -> str:
    """``"p = 0.14"``, or ``"p ≤ 0.048"`` when no null grid reached the observed value (``1/(P+1)`` is a bound)."""
    return f"p ≤ {p:.3g} (none of {permutations} null grids reached it)" if bound else f"p = {p:.3g}"


def _json_float(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _json_floats(a: np.ndarray) -> list:
    """Nested lists with NaN (undefined: a degenerate layer, a null without spread) as None (JSON null)."""
    if np.ndim(a) > 1:
        return [_json_floats(row) for row in a]
    return [_json_float(v) for v in a]


def _feature_fields(cfg: AlignConfig, ids: list[str], captions: list[str], model_ident: dict, side: str,
                    runtime: Any) -> dict[str, Any]:
    from .features import FEATURES_VERSION

    fields: dict[str, Any] = {
        "side": side, "model": model_ident, "data": cfg.data, "coco_root": cfg.coco_root, "modality": cfg.modality,
        "samples": hashlib_of([*ids, *captions]), "n": len(ids),
        "pooling": cfg.vision_pooling if side == "vision" else cfg.text_pooling,
        "dtype": str(runtime.dtype), "device_type": runtime.device.type, "version": FEATURES_VERSION,
    }
    if side == "text":
        fields["max_length"] = cfg.max_length
    return fields


def hashlib_of(items: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def compute_features(cfg: AlignConfig, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Vision ``[Lv, N, Dv]`` and LM ``[Ll, N, Dl]`` features for the configured pairs (from cache when possible)."""
    from . import data as data_mod
    from .assets import feature_cache_dir
    from .features import FeatureCache, extract_text, extract_vision
    from .modalities import get_modality, item_key, load_pairs
    from .models import load_encoder, load_lm, model_identity, pick_runtime
    from .registry import resolve_model

    modality = get_modality(cfg.modality)
    vision_entry = resolve_model(cfg.vision, modality.kind)
    llm_entry = resolve_model(cfg.llm, "lm")
    runtime = pick_runtime(cfg.device, cfg.dtype)
    ds = data_mod.select(load_pairs(modality, cfg.data, cfg.coco_root), cfg.n, cfg.seed)
    image_keys = [item_key(modality, v) for v in ds[modality.column]]
    duplicates = data_mod.duplicate_report(ds, image_keys)
    if cfg.dedupe:
        before = list(ds["id"])
        ds, duplicates["dropped_ids"] = data_mod.dedupe(ds, image_keys)
        dropped = set(duplicates["dropped_ids"])
        image_keys = [key for key, pid in zip(image_keys, before) if pid not in dropped]
    if cfg.k >= len(ds):
        raise InputError(f"k must be < number of samples (k={cfg.k}, N={len(ds)})")
    ids, captions = list(ds["id"]), list(ds["caption"])
    cache = FeatureCache(feature_cache_dir(cfg.cache_dir))

    v_fields = _feature_fields(cfg, ids, captions, model_identity(vision_entry), "vision", runtime)
    v_fields["images"] = hashlib_of(image_keys)  # the inputs' content: a file replaced in place is re-encoded
    t_fields = _feature_fields(cfg, ids, captions, model_identity(llm_entry), "text", runtime)

    def vision() -> torch.Tensor:
        adapter = load_encoder(vision_entry, runtime, modality.name)
        return extract_vision(adapter, list(ds[modality.column]), ids, cfg.vision_pooling, cfg.batch_size, progress)

    def text() -> torch.Tensor:
        adapter = load_lm(llm_entry, runtime)
        return extract_text(adapter, captions, cfg.text_pooling, cfg.batch_size, cfg.max_length, progress)

    vf, v_cached = cache.get_or_compute("vision", v_fields, vision)
    tf, t_cached = cache.get_or_compute("text", t_fields, text)
    info = {"runtime": runtime.to_dict(), "sample_ids": ids, "vision_label": vision_entry.display,
            "duplicates": duplicates,
            "llm_label": llm_entry.display,
            "feature_cache": {"vision": str(cache.paths("vision", v_fields)[0]), "vision_hit": v_cached,
                              "text": str(cache.paths("text", t_fields)[0]), "text_hit": t_cached}}
    return vf, tf, info


def degenerate_layers(layers: torch.Tensor, k: int | None) -> dict[int, str]:
    """``{layer: reason}`` for the layers of ``[L, N, D]`` that :func:`~pg_analysis.metrics.degenerate_reason`
    rejects (``k``: check kNN ties too, for the kNN-based metrics)."""
    return {i: reason for i, x in enumerate(layers) if (reason := degenerate_reason(x, k)) is not None}


def score_features(vf: torch.Tensor, tf: torch.Tensor, cfg: AlignConfig, progress: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess both feature stacks, score the grid, and the null grids under ``cfg.null`` re-pairings.

    Degenerate layers are not scored: their rows / columns are NaN in the grid and in every null grid."""
    if n_samples(vf) != n_samples(tf):
        raise InputError(f"vision and text features have different sample counts ({n_samples(vf)} vs "
                         f"{n_samples(tf)})")
    for name, f in (("vision", vf), ("text", tf)):
        if not all(torch.isfinite(x).all() for x in f):
            raise InputError(f"{name} features contain NaN/inf values")
    # one list of [N, D_l] per model from here on (a CNN's widths differ by layer)
    xs, tv = preprocess_features(vf, cfg.outlier_q, cfg.normalize)
    ys, tt = preprocess_features(tf, cfg.outlier_q, cfg.normalize)
    xs, ys = list(xs), list(ys)
    kw = cfg.metric_kwargs()
    tie_k = kw.get("k")
    bad = {"vision": degenerate_layers(xs, tie_k), "llm": degenerate_layers(ys, tie_k)}
    keep_x = [i for i in range(len(xs)) if i not in bad["vision"]]
    keep_y = [j for j in range(len(ys)) if j not in bad["llm"]]
    for side, key, keep in (("vision", "vision", keep_x), ("LM", "llm", keep_y)):
        if not keep:
            raise InputError(f"every {side} layer is degenerate ({next(iter(bad[key].values()))}); "
                             "nothing can be scored")
    xs, ys = [xs[i] for i in keep_x], [ys[j] for j in keep_y]
    cells = np.ix_(keep_x, keep_y)

    def full(sub: torch.Tensor) -> np.ndarray:
        out = np.full((len(keep_x) + len(bad["vision"]), len(keep_y) + len(bad["llm"])), np.nan, dtype=np.float32)
        out[cells] = sub.numpy()
        return out

    sx, sy = prepare_layers(xs, cfg.metric, **kw), prepare_layers(ys, cfg.metric, **kw)
    grid = full(grid_from_states(sx, sy, cfg.metric, **kw))
    null = None
    if cfg.null > 0:
        # Re-pair by permuting the side with fewer layers; the other side's states are reused.
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        n = n_samples(xs)
        permute_x = len(xs) <= len(ys)
        grids = []
        for _ in tqdm(range(cfg.null), desc="null re-pairings", disable=not progress):
            perm = torch.randperm(n, generator=gen)
            if permute_x:
                g = grid_from_states(prepare_layers([x[perm] for x in xs], cfg.metric, **kw), sy, cfg.metric, **kw)
            else:
                g = grid_from_states(sx, prepare_layers([y[perm] for y in ys], cfg.metric, **kw), cfg.metric, **kw)
            grids.append(full(g))
        null = np.stack(grids)
    degenerate = {side: {str(i): reason for i, reason in layers.items()} for side, layers in bad.items()}
    for side, layers in degenerate.items():
        for i, reason in layers.items():
            log.info("%s layer %s is not scored: %s", side, i, reason)
    return grid, null, {"outlier_threshold": {"vision": tv, "text": tt}, "degenerate": degenerate}


def run_align(cfg: AlignConfig, progress: bool = True) -> AlignResult:
    t0 = time.perf_counter()
    vf, tf, info = compute_features(cfg, progress)
    t1 = time.perf_counter()
    grid, null, pinfo = score_features(vf, tf, cfg, progress)
    t2 = time.perf_counter()
    info.update(pinfo)
    info["timing_s"] = {"features": round(t1 - t0, 3), "scoring": round(t2 - t1, 3)}
    return AlignResult(cfg, grid, null, info.pop("vision_label"), info.pop("llm_label"), n_samples(vf),
                       info.pop("sample_ids"), info)


def save_align_result(result: AlignResult, out_dir: Path) -> Path:
    """Write the result folder atomically (see module docstring). Returns ``out_dir``."""
    from .plots import alignment_heatmap

    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        buf = io.BytesIO()
        np.save(buf, result.grid.astype(np.float32))
        atomic_write_bytes(tmp / "grid.npy", buf.getvalue())
        if result.null is not None:
            buf = io.BytesIO()
            np.save(buf, result.null.astype(np.float32))
            atomic_write_bytes(tmp / "null.npy", buf.getvalue())
        summary = result.summary()
        atomic_write_json(tmp / ALIGN_RESULT, summary)
        write_run_record(tmp, "pg-align", result.config.to_dict(), sample_ids=result.sample_ids, **result.info)
        alignment_heatmap(summary, tmp / "heatmap.png")
    return out_dir


def load_align_result(out_dir: Path) -> dict[str, Any]:
    """Read a saved result's ``alignment.json`` (figures and recommend use this; no model is loaded)."""
    return read_result_json(out_dir, ALIGN_RESULT, "pg-align")
