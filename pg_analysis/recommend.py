"""Which insert layer L? The rule, its evidence, and ``pg-recommend`` / ``pg-train --layer auto``.

Evidence per candidate L (LM with N blocks; L = 0 … N):

- **saving(L)** — the predicted prefill-FLOP saving ``1 − FLOPs(L) / FLOPs(0)`` for the probe prompts' lengths;
- **attention_lost(L)** — from ``pg-attnmap``: the share of language→vision attention (per-layer totals, the
  first ``skip_layers`` blocks left out as in the paper's Fig. 3) that falls in blocks ``skip_layers … L−1``,
  which a grounded model removes;
- **answers_changed(L)** — the training-free probe the paper lacks: the baseline VLM run grounded at L with its
  weights unchanged; the share of MCQ answers (argmax over A–D) that differ from its answers at L = 0. Its
  accuracy and the mean KL(p₀ ‖ p_L) of the answer distributions are reported beside it;
- **alignment_deficit(L)** — from ``pg-align`` (the per-LM-layer profile, max over vision layers; index L is the
  input of block L, exactly where the vision rows enter): ``max(0, a(0) − a(L)) / (max a − min a)``, how much
  less the LM's layer-L space is aligned with the vision encoder than its input space (the Platonic argument
  says deeper is at least as aligned, so this is usually 0).

**The rule.** Each risk is a fraction in [0, 1]. L is *admissible* when every gating risk that was measured is
≤ ``tolerance``. The recommendation is the largest L such that every L' ≤ L is admissible (the saving grows with
L, so this is the cheapest model whose whole path from L = 0 stays within tolerance). Missing evidence is left out
and named in the output; with none at all, it is an error.

Gating risks by default: ``attention_lost`` and ``alignment_deficit`` — the paper's two observations. The probe
is always measured and reported, and gates when ``risks`` includes ``answers_changed``. Why not by default: on the
offline pair (DINOv2-S × SmolLM2-135M) the untrained probe changes ~60 % of answers at *every* L ≥ 1 (accuracy at
chance, with or without rescaling the vision rows to layer L's norm), so it measures that the model must be
retrained, not which L retrains well (README, "Choosing L").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

RISKS = ("attention_lost", "answers_changed", "alignment_deficit")
DEFAULT_RISKS = ("attention_lost", "alignment_deficit")


def default_candidates(n_layers: int) -> list[int]:
    """0–4, 6, 8, then every 4th layer, and N: dense where the choice is usually made, sparse above."""
    return sorted({x for x in [0, 1, 2, 3, 4, 6, 8, *range(12, n_layers, 4), n_layers] if x <= n_layers})


# ----------------------------------------------------------------------------------------------------------------
# pure pieces


def attention_lost(profile: Any, skip_layers: int = 2) -> np.ndarray:
    """``[N+1]``: share of the per-layer vision attention ``profile [N]`` (blocks ≥ ``skip_layers``) in blocks
    ``skip_layers … L−1``, for L = 0 … N."""
    p = np.clip(np.asarray(profile, dtype=float), 0, None)
    n = len(p)
    if not 0 <= skip_layers < n:
        raise InputError(f"skip_layers must be in [0, {n - 1}] for {n} layers, got {skip_layers}")
    kept = p.copy()
    kept[:skip_layers] = 0
    total = kept.sum()
    if total <= 0:
        raise InputError("the attention profile has no attention to vision rows after the skipped layers")
    return np.concatenate([[0.0], np.cumsum(kept) / total])


def alignment_deficit(profile: Any) -> np.ndarray:
    """``[N+1]``: ``max(0, a(0) − a(L)) / (max a − min a)`` of the per-LM-layer alignment profile ``a``."""
    a = np.asarray(profile, dtype=float)
    span = float(a.max() - a.min())
    if span <= 0:
        return np.zeros_like(a)
    return np.clip(a[0] - a, 0, None) / span


def answer_shift(logits0: Any, logits: Any) -> tuple[float, float]:
    """``(share of argmax answers that differ, mean KL(p₀ ‖ p))`` between two ``[n, options]`` logit tables."""
    import torch

    a = torch.as_tensor(logits0, dtype=torch.float64)
    b = torch.as_tensor(logits, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"answer logits must be two equal [n, options] tables, got {tuple(a.shape)}, {tuple(b.shape)}")
    la, lb = a.log_softmax(1), b.log_softmax(1)
    kl = (la.exp() * (la - lb)).sum(1).mean()
    return float((a.argmax(1) != b.argmax(1)).double().mean()), float(kl)


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (≥ in both coordinates, > in one), by first coordinate."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: points[i][0])


def recommend(saving: dict[int, float], attention_profile: Any = None, alignment_profile: Any = None,
              probe: dict[int, dict[str, float]] | None = None, tolerance: float = 0.25,
              skip_layers: int = 2, risks: tuple[str, ...] = DEFAULT_RISKS) -> dict[str, Any]:
    """Apply the rule (module docstring) to the evidence; returns ``recommended_layer``, ``rule``, ``table``.

    ``saving``: L → predicted saving, for the candidate layers (L = 0 among them). ``attention_profile [N]``,
    ``alignment_profile [N+1]``, ``probe``: L → ``{"answers_changed", "accuracy", "kl"}`` — each optional.
    """
    if not 0 <= tolerance <= 1:
        raise InputError(f"tolerance must be in [0, 1], got {tolerance}")
    unknown = set(risks) - set(RISKS)
    if unknown or not risks:
        raise InputError(f"risks must be a non-empty subset of {RISKS}, got {list(risks)}")
    layers = sorted(saving)
    if not layers or layers[0] != 0:
        raise InputError("the candidate layers must include L = 0 (the baseline)")
    if attention_profile is None and alignment_profile is None and not probe:
        raise InputError("no evidence: give an attention profile, an alignment profile and/or a probe")
    n = None
    lost = deficit = None
    if attention_profile is not None:
        n = len(attention_profile)
        lost = attention_lost(attention_profile, skip_layers)
    if alignment_profile is not None:
        if n is not None and len(alignment_profile) != n + 1:
            raise InputError(f"mismatched layer counts: the attention map has {n} LM layers but the alignment "
                             f"profile has {len(alignment_profile)} entries (expected {n + 1}: embeddings + "
                             "one per layer) — were they measured on the same LM?")
        n = len(alignment_profile) - 1
        deficit = alignment_deficit(alignment_profile)
    if n is not None and layers[-1] > n:
        raise InputError(f"candidate layer {layers[-1]} exceeds the LM's {n} layers")
    if probe is not None and set(probe) != set(layers):
        raise InputError(f"the probe covers layers {sorted(probe)}, the candidates are {layers}")
    table, admissible_prefix, recommended = [], True, 0
    for layer in layers:
        row: dict[str, Any] = {"layer": layer, "saving": float(saving[layer])}
        if lost is not None:
            row["attention_lost"] = float(lost[layer])
        if probe is not None:
            row.update({k: float(v) for k, v in probe[layer].items()})
        if deficit is not None:
            row["alignment_deficit"] = float(deficit[layer])
        gating = [row[k] for k in risks if k in row]
        row["admissible"] = all(r <= tolerance + 1e-12 for r in gating)
        admissible_prefix = admissible_prefix and row["admissible"]
        if admissible_prefix:
            recommended = layer
        table.append(row)
    used = [k for k in risks if k in table[0]]
    if not used:
        raise InputError(f"none of the gating risks {list(risks)} was measured")
    return {"recommended_layer": recommended,
            "rule": {"tolerance": tolerance, "skip_layers": skip_layers, "risks_used": used,
                     "risks_missing": [k for k in risks if k not in used],
                     "text": "largest L such that every L' <= L has all risks <= tolerance"},
            "table": table}


def format_table(rec: dict[str, Any]) -> str:
    cols = ["layer", "saving", "attention_lost", "answers_changed", "accuracy", "kl", "alignment_deficit"]
    cols = [c for c in cols if c in rec["table"][0]]
    lines = ["  ".join(f"{c:>17}" for c in cols + ["admissible"])]
    for r in rec["table"]:
        cells = [f"{r[c]:>17d}" if c == "layer" else f"{r[c]:>17.3f}" for c in cols]
        mark = "yes" if r["admissible"] else "no"
        if r["layer"] == rec["recommended_layer"]:
            mark += "  <- recommended"
        lines.append("  ".join(cells + [f"{mark:>17}"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# pipeline (runs the baseline VLM through pg_train.probe)


@dataclass
class RecommendConfig:
    """Options of ``pg-recommend``. Validates itself; no I/O."""

    vlm: str = "runs/train-L0"  # the baseline (L = 0) VLM the probe runs grounded at each L
    align: str | None = "runs/align"  # a pg-align result folder (None: not used)
    attnmap: str | None = "runs/attnmap"  # a pg-attnmap result folder (None: not used)
    probe: bool = True
    data: str = "tuxpaint"
    coco_root: str | None = None
    n: int = 100  # probe questions
    layers: list[int] | None = None  # candidates (default: default_candidates(N))
    tolerance: float = 0.25
    risks: tuple[str, ...] = DEFAULT_RISKS
    precision: str = "bf16"  # the probe's forward passes
    skip_layers: int = 2
    batch_size: int = 16
    seed: int = 0
    device: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1:
            raise InputError("n and batch_size must be >= 1")
        if not 0 <= self.tolerance <= 1:
            raise InputError(f"tolerance must be in [0, 1], got {self.tolerance}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise InputError(f"layers must be non-negative integers, got {self.layers}")
        self.risks = tuple(self.risks)
        if not self.risks or set(self.risks) - set(RISKS):
            raise InputError(f"risks must be a non-empty subset of {RISKS}, got {list(self.risks)}")
        if self.precision not in ("bf16", "fp32"):
            raise InputError(f"precision must be bf16 or fp32, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _present(folder: str | None, marker: str) -> bool:
    return bool(folder) and (Path(folder) / marker).is_file()


def run_recommend(cfg: RecommendConfig, progress: bool = True) -> dict[str, Any]:
    """Gather the evidence (saved alignment and attention results, the probe) and apply :func:`recommend`."""
    from pg_train.probe import letter_logits, load_prompt_model, mcq_prompts, mcq_records, prefill_saving

    from .align import load_align_result
    from .assets import cache_root
    from .attention import load_attnmap
    from .data import load_pairs, select
    from .models import pick_runtime

    t0 = time.perf_counter()
    sources: dict[str, Any] = {}
    align_profile = attn_profile = None
    if cfg.align:
        a = load_align_result(Path(cfg.align))
        align_profile = a["llm_layer_profile"]
        sources["alignment"] = {"path": cfg.align, "vision": a["vision"], "llm": a["llm"], "metric": a["metric"],
                                "n_samples": a["n_samples"]}
    if cfg.attnmap:
        m = load_attnmap(Path(cfg.attnmap))
        attn_profile = m["profile"]
        sources["attention"] = {"path": cfg.attnmap, "vlm": m["vlm"], "n_prompts": m["n_prompts"],
                                "query": m["query"]}
    pm = load_prompt_model(cfg.vlm, runtime=pick_runtime(cfg.device, "float32"))
    if pm.model.insert_layer != 0:
        raise InputError(f"{cfg.vlm} has insert_layer={pm.model.insert_layer}; the probe needs the baseline (L=0)")
    n_layers = pm.model.config.text_config.num_hidden_layers
    for name, prof, expect in (("attention map", attn_profile, n_layers), ("alignment profile", align_profile,
                                                                            n_layers + 1)):
        if prof is not None and len(prof) != expect:
            raise InputError(f"mismatched layer counts: the {name} has {len(prof)} entries, the VLM's LM has "
                             f"{n_layers} layers (expected {expect})")
    layers = sorted(set(cfg.layers or default_candidates(n_layers)) | {0})
    if layers[-1] > n_layers:
        raise InputError(f"layer {layers[-1]} exceeds the LM's {n_layers} layers")
    pairs = load_pairs(cfg.data, cfg.coco_root)
    records = mcq_records(select(pairs, min(cfg.n, len(pairs)), cfg.seed), cfg.seed)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "features"
    prompts = mcq_prompts(pm, records, cache, progress=progress)
    saving = dict(zip(layers, prefill_saving(pm, prompts, layers)))
    probe = None
    if cfg.probe:
        from tqdm.auto import tqdm

        answers = np.array(["ABCD".index(r["answer"]) for r in records])
        probe, base = {}, None
        for layer in tqdm(layers, desc="probe L", disable=not progress):
            logits = letter_logits(pm, prompts, insert_layer=layer, batch_size=cfg.batch_size,
                                   precision=cfg.precision)
            base = logits if base is None else base
            changed, kl = answer_shift(base, logits)
            probe[layer] = {"answers_changed": changed, "kl": kl,
                            "accuracy": float((logits.argmax(1).numpy() == answers).mean())}
        sources["probe"] = {"vlm": cfg.vlm, "data": cfg.data, "n_questions": len(records)}
    if not sources:
        raise InputError("no evidence: pass --align and/or --attnmap results, or keep the probe on")
    rec = recommend(saving, attn_profile, align_profile, probe, cfg.tolerance, cfg.skip_layers, cfg.risks)
    rec["evidence"] = sources
    rec["prompt_tokens"] = {"text": float(np.mean([len(e.input_ids) for e in prompts.examples]))
                            - pm.model.num_image_tokens, "vision": pm.model.num_image_tokens}
    rec["seconds"] = time.perf_counter() - t0
    return rec


def save_recommendation(rec: dict[str, Any], cfg: RecommendConfig, out_dir: Path) -> Path:
    """``recommend.json`` (the recommendation, rule and table), ``config.json``, ``recommend.png``; atomically."""
    from .plots import recommendation_figure
    from .runinfo import atomic_output_dir, atomic_write_json, run_metadata

    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        atomic_write_json(tmp / "recommend.json", rec)
        atomic_write_json(tmp / "config.json", {"command": "pg-recommend", "config": cfg.to_dict(),
                                                **run_metadata()})
        recommendation_figure(rec, tmp / "recommend.png")
    return out_dir


def load_recommendation(out_dir: Path) -> dict[str, Any]:
    from .runinfo import read_result_json

    rec = read_result_json(out_dir, "recommend.json", "pg-recommend")
    if not isinstance(rec.get("recommended_layer"), int):
        raise InputError(f"{out_dir}/recommend.json: no recommended_layer")
    return rec


def auto_layer(recommendation: str | None, cfg: RecommendConfig, out_dir: Path | None = None,
               progress: bool = True) -> dict[str, Any]:
    """``pg-train --layer auto``: read a saved recommendation, or compute one from the saved alignment and
    attention results and the baseline VLM (saved under ``out_dir``). Clear error when neither is possible."""
    if recommendation and _present(recommendation, "recommend.json"):
        rec = load_recommendation(Path(recommendation))
        rec["source"] = str(recommendation)
        return rec
    missing = []
    if not _present(cfg.vlm, "model/config.json") and not _present(cfg.vlm, "config.json"):
        missing.append(f"the baseline VLM {cfg.vlm} (pg-train --layer 0 --out {cfg.vlm})")
    have_align = _present(cfg.align, "alignment.json")
    have_attn = _present(cfg.attnmap, "attnmap.json")
    if missing or not (have_align or have_attn):
        if not have_align:
            missing.append(f"an alignment result {cfg.align} (pg-align --out {cfg.align})")
        if not have_attn:
            missing.append(f"an attention result {cfg.attnmap} (pg-attnmap --out {cfg.attnmap})")
        where = f"no saved recommendation at {recommendation}" if recommendation else "no --recommendation given"
        raise InputError(f"--layer auto: {where}, and it cannot be computed: missing " + "; ".join(missing))
    cfg = RecommendConfig(**{**cfg.to_dict(), "align": cfg.align if have_align else None,
                             "attnmap": cfg.attnmap if have_attn else None})
    rec = run_recommend(cfg, progress=progress)
    if out_dir is not None:
        save_recommendation(rec, cfg, out_dir)
        rec["source"] = str(out_dir)
    return rec
