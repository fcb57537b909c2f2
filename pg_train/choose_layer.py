"""Choosing L with a VLM: ``pg-recommend`` and ``pg-train --layer auto``.

Gathers the evidence that :func:`pg_analysis.recommend.recommend` (the pure rule, documented there) turns into a
recommendation: the saved ``pg-align`` and ``pg-attnmap`` results, the predicted prefill saving at a prompt shape,
the training-free proxies measured on the trained baseline (L = 0) — the entry and exit knockouts, and with
``--probe`` the insertion probe — and, given a trained sweep (``--sweep``), each proxy's validation against it,
which decides the gating risks. Writes ``recommend.json``, ``run.json`` and ``recommend.png``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pg_analysis.align import load_align_result
from pg_analysis.assets import feature_cache_dir
from pg_analysis.attention import load_attnmap
from pg_analysis.data import load_pairs, select
from pg_analysis.errors import InputError
from pg_analysis.models import pick_runtime
from pg_analysis.plots import recommendation_figure
from pg_analysis.recommend import (DEFAULT_RISKS, RISKS, answer_shift, default_candidates, frontier_check,
                                   load_recommendation, recommend, validate_proxies)
from pg_analysis.runinfo import atomic_output_dir, atomic_write_json
from pg_analysis.runs import (ALIGN_RESULT, ATTNMAP_RESULT, DATA_DIR, DATA_MANIFEST, RECOMMEND_RESULT, has_result,
                              model_folder, write_run_record)

from .datasets import LETTERS
from .probe import knockout_shift, letter_logits, load_prompt_model, mcq_prompts, mcq_records
from .vlm import PRECISIONS

#: the paper's prompt: 88 text rows (LLaVA-1.5's mean on its benchmarks) and CLIP-L/336's 576 vision rows
PAPER_SHAPE = (88, 576)
#: the proxies validated against a sweep: the per-L risks of the rule
PROXIES = ("attention_lost", "alignment_deficit", "entry_changed", "entry_kl", "answers_changed")


@dataclass
class RecommendConfig:
    """Options of ``pg-recommend``. Validates itself; no I/O."""

    vlm: str = "runs/train-L0"  # the baseline (L = 0) VLM the probe runs grounded at each L
    align: str | None = "runs/align"  # a pg-align result folder (None: not used)
    attnmap: str | None = "runs/attnmap"  # a pg-attnmap result folder (None: not used)
    probe: bool = False  # the insertion probe (answers_changed); ranks but over-warns against the sweep
    knockout: bool = True  # the entry and exit knockouts
    sweep: list[str] | None = None  # trained sweep folders (pg-train runs with eval/): validate the proxies
    shape: tuple[int, int] = PAPER_SHAPE  # text, vision rows the saving is predicted for
    n_boot: int = 2000
    data: str = "auto"  # proxy questions: auto (the baseline run's held-out split, else tuxpaint), held-out, pairs
    coco_root: str | None = None
    n: int = 100  # proxy questions
    layers: list[int] | None = None  # candidates (default: default_candidates(N))
    tolerance: float = 0.25
    risks: tuple[str, ...] = DEFAULT_RISKS
    precision: str = "auto"  # the proxies' forward passes
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
        self.shape = tuple(self.shape)
        if len(self.shape) != 2 or self.shape[0] < 1 or self.shape[1] < 0:
            raise InputError(f"shape must be TEXT,VISION rows with TEXT >= 1 and VISION >= 0, got {self.shape}")
        if self.n_boot < 100:
            raise InputError(f"n_boot must be >= 100, got {self.n_boot}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def proxy_records(cfg: RecommendConfig) -> tuple[list[dict[str, Any]], str]:
    """The proxies' questions and where they come from. ``held-out`` (``auto`` when ``cfg.vlm`` is a pg-train run
    with its data folder): the run's held-out test questions, one per image, the correct letter rotating over A-D
    with the image's rank — pictures the baseline never trained on, asked as pg-eval asks them. Otherwise (a model
    folder, an HF id, or named pairs): ``cfg.n`` pairs of ``cfg.data`` made into questions (:func:`mcq_records`)."""
    from .evaluate import split_records

    data_dir = Path(cfg.vlm) / DATA_DIR
    if cfg.data in ("auto", "held-out"):
        if (data_dir / DATA_MANIFEST).is_file():
            by_image: dict[str, dict[str, dict[str, Any]]] = {}
            for r in split_records(data_dir, "test", ("mcq",))["mcq"]:
                by_image.setdefault(r["image_path"], {})[r["answer"]] = r
            records = [qs.get(LETTERS[i % len(LETTERS)]) or next(iter(qs.values()))
                       for i, (_, qs) in enumerate(sorted(by_image.items()))]
            return records[:cfg.n], f"held-out test split of {cfg.vlm}"
        if cfg.data == "held-out":
            raise InputError(f"--data held-out: {cfg.vlm} is not a pg-train run with its data folder "
                             f"({DATA_DIR}/{DATA_MANIFEST})")
    data = "tuxpaint" if cfg.data == "auto" else cfg.data
    pairs = load_pairs(data, cfg.coco_root)
    return mcq_records(select(pairs, min(cfg.n, len(pairs)), cfg.seed), cfg.seed), data


def run_recommend(cfg: RecommendConfig, progress: bool = True) -> dict[str, Any]:
    """Gather the evidence (saved alignment and attention results, the proxies, a sweep's validation) and apply
    :func:`recommend`."""
    from .bench import FlopModel

    t0 = time.perf_counter()
    measured = {"attention_lost": cfg.attnmap is not None, "alignment_deficit": cfg.align is not None,
                "entry_changed": cfg.knockout, "entry_kl": cfg.knockout, "answers_changed": cfg.probe}
    if not any(measured[r] for r in cfg.risks):  # known before any forward pass; --sweep may gate others instead
        raise InputError(f"none of the gating risks {list(cfg.risks)} is measured with these options "
                         f"(pass the inputs they need, or choose --risks among "
                         f"{[r for r in RISKS if measured[r]]})")
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
    sweep = None
    if cfg.sweep:
        from .sweep import collect, correct_by_layer

        sweep, pending = collect(cfg.sweep)
        sources["sweep"] = {"paths": cfg.sweep, "runs": len(sweep), "pending": pending}
    pm = load_prompt_model(cfg.vlm, runtime=pick_runtime(cfg.device, "float32"))
    if pm.model.insert_layer != 0:
        raise InputError(f"{cfg.vlm} has insert_layer={pm.model.insert_layer}; the proxies need the baseline (L=0)")
    n_layers = pm.model.config.text_config.num_hidden_layers
    for name, prof, expect in (("attention map", attn_profile, n_layers), ("alignment profile", align_profile,
                                                                            n_layers + 1)):
        if prof is not None and len(prof) != expect:
            raise InputError(f"mismatched layer counts: the {name} has {len(prof)} entries, the VLM's LM has "
                             f"{n_layers} layers (expected {expect})")
    layers = sorted(set(cfg.layers or default_candidates(n_layers)) | {0})
    if sweep:
        layers = sorted(set(layers) | {r.layer for r in sweep})  # every trained layer gets its proxies
    if layers[-1] > n_layers:
        raise InputError(f"layer {layers[-1]} exceeds the LM's {n_layers} layers")
    flops = FlopModel.of(pm.model.decoder_parts())
    saving = {layer: 1.0 - flops.prefill_ratio(cfg.shape[0], cfg.shape[1], layer) for layer in layers}
    proxies: dict[int, dict[str, Any]] = {layer: {} for layer in layers}
    exit_table = None
    if cfg.probe or cfg.knockout:
        records, data = proxy_records(cfg)
        prompts = mcq_prompts(pm, records, feature_cache_dir(cfg.cache_dir), progress=progress)
        sources["proxies"] = {"vlm": cfg.vlm, "data": data, "n_questions": len(records), "seconds": {}}
        seconds = sources["proxies"]["seconds"]
        tick = time.perf_counter()
        # the unchanged baseline's answers, once: every knockout and the probe are measured against them
        base = letter_logits(pm, prompts, batch_size=cfg.batch_size, precision=cfg.precision)
        if cfg.knockout:
            entry = knockout_shift(pm, prompts, sorted(set(layers) | {n_layers}), "entry", cfg.batch_size,
                                   cfg.precision, progress, base)
            full_kl = entry[n_layers]["kl"]
            for layer in layers:
                e = entry[layer]
                proxies[layer].update(entry_changed=e["answers_changed"], entry_kl_raw=e["kl"],
                                      entry_kl=min(1.0, e["kl"] / full_kl) if full_kl > 0 else 0.0,
                                      entry_accuracy=e["accuracy"])
            seconds["entry_knockout"], tick = time.perf_counter() - tick, time.perf_counter()
            exits = knockout_shift(pm, prompts, layers, "exit", cfg.batch_size, cfg.precision, progress, base)
            exit_table = [{"exit_layer": k, **v} for k, v in sorted(exits.items())]
            seconds["exit_knockout"], tick = time.perf_counter() - tick, time.perf_counter()
        if cfg.probe:
            for layer in tqdm(layers, desc="insertion probe L", disable=not progress):
                logits = base if layer == 0 else letter_logits(pm, prompts, insert_layer=layer,
                                                               batch_size=cfg.batch_size, precision=cfg.precision)
                changed, kl = answer_shift(base, logits)
                proxies[layer].update(answers_changed=changed, kl=kl,
                                      accuracy=float((logits.argmax(1).numpy() == prompts.answers).mean()))
            seconds["insertion_probe"] = time.perf_counter() - tick
    if not sources:
        raise InputError("no evidence: pass --align and/or --attnmap results, or keep the proxies on")
    risks, validation = tuple(cfg.risks), None
    if sweep:
        rec0 = recommend(saving, attn_profile, align_profile, proxies if any(proxies.values()) else None,
                         cfg.tolerance, cfg.skip_layers, cfg.risks)  # every measured risk, per layer
        per_proxy = {k: {r["layer"]: r[k] for r in rec0["table"] if r.get(k) is not None}
                     for k in PROXIES if any(r.get(k) is not None for r in rec0["table"])}
        validation = validate_proxies(per_proxy, correct_by_layer(sweep), cfg.n_boot, cfg.seed,
                                      tolerance=cfg.tolerance)
        gating = tuple(k for k, v in validation["proxies"].items() if v["gates"])
        validation["predicting"] = [k for k, v in validation["proxies"].items() if v["predicts"]]
        validation["gating"] = list(gating)
        risks = gating or risks
    rec = recommend(saving, attn_profile, align_profile, proxies if any(proxies.values()) else None,
                    cfg.tolerance, cfg.skip_layers, risks)
    rec["rule"]["validated"] = bool(validation and validation["gating"])
    if validation is not None:
        validation["frontier"] = frontier_check(rec["recommended_layer"], saving, validation["table"])
        rec["validation"] = validation
    if exit_table is not None:
        rec["exit_knockout"] = exit_table
    rec["evidence"] = sources
    rec["shape"] = {"text": cfg.shape[0], "vision": cfg.shape[1]}
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
