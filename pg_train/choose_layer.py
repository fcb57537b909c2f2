"""Choosing L with a VLM: ``pg-recommend`` and ``pg-train --layer auto``.

Gathers the evidence that :func:`pg_analysis.recommend.recommend` (the pure rule, documented there) turns into a
recommendation: the saved ``pg-align`` and ``pg-attnmap`` results, the predicted prefill saving of the probe
prompts, and the training-free probe (the baseline L = 0 VLM run grounded at each candidate L, its weights
unchanged). Writes ``recommend.json``, ``run.json`` and ``recommend.png``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pg_analysis.align import load_align_result
from pg_analysis.assets import feature_cache_dir
from pg_analysis.attention import load_attnmap
from pg_analysis.data import load_pairs, select
from pg_analysis.errors import InputError
from pg_analysis.models import pick_runtime
from pg_analysis.plots import recommendation_figure
from pg_analysis.recommend import (DEFAULT_RISKS, RISKS, answer_shift, default_candidates, load_recommendation,
                                   recommend)
from pg_analysis.runinfo import atomic_output_dir, atomic_write_json
from pg_analysis.runs import (ALIGN_RESULT, ATTNMAP_RESULT, RECOMMEND_RESULT, has_result, model_folder,
                              write_run_record)

from .probe import letter_logits, load_prompt_model, mcq_prompts, mcq_records, prefill_saving


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


def run_recommend(cfg: RecommendConfig, progress: bool = True) -> dict[str, Any]:
    """Gather the evidence (saved alignment and attention results, the probe) and apply :func:`recommend`."""
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
    cache = feature_cache_dir(cfg.cache_dir)
    prompts = mcq_prompts(pm, records, cache, progress=progress)
    saving = dict(zip(layers, prefill_saving(pm, prompts, layers)))
    probe = None
    if cfg.probe:
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
    """``recommend.json`` (the recommendation, rule and table), ``run.json``, ``recommend.png``; atomically."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        atomic_write_json(tmp / RECOMMEND_RESULT, rec)
        write_run_record(tmp, "pg-recommend", cfg.to_dict())
        recommendation_figure(rec, tmp / "recommend.png")
    return out_dir


def auto_layer(recommendation: str | None, cfg: RecommendConfig, out_dir: Path | None = None,
               progress: bool = True) -> dict[str, Any]:
    """``pg-train --layer auto``: read a saved recommendation, or compute one from the saved alignment and
    attention results and the baseline VLM (saved under ``out_dir``). Clear error when neither is possible."""
    if has_result(recommendation, RECOMMEND_RESULT):
        rec = load_recommendation(Path(recommendation))
        rec["source"] = str(recommendation)
        return rec
    missing = []
    if model_folder(cfg.vlm) is None:
        missing.append(f"the baseline VLM {cfg.vlm} (pg-train --layer 0 --out {cfg.vlm})")
    have_align = has_result(cfg.align, ALIGN_RESULT)
    have_attn = has_result(cfg.attnmap, ATTNMAP_RESULT)
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
