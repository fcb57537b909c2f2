"""Running a VLM on multiple-choice prompts: attention maps (``pg-attnmap``) and the training-free insert-layer
probe (``pg-recommend``). ``pg_analysis`` never loads a VLM; what it measures on one it receives from here.

- :func:`load_prompt_model`: a LLaVA-format VLM with its prompt format — a ``pg-train`` run folder (``model/`` +
  its run record: template and system prompt as trained), a model folder, or an HF LLaVA checkpoint (alias or hub
  id; the tokenizer's chat template, else Vicuna v1).
- :func:`mcq_prompts`: multiple-choice questions built from image–caption pairs (one per pair, the correct letter
  rotated over A–D, three distractor captions from the other pairs), tokenised in the model's format, with the
  frozen encoder's features of their images.
- :func:`letter_logits`: the option letters' logits at the answer position (one forward per batch) at any L.
- :func:`run_attnmap`: ``pg-attnmap``'s pipeline (pairs → prompts → :func:`pg_analysis.attention.attention_map`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pg_analysis.assets import feature_cache_dir
from pg_analysis.attention import AttnmapConfig, AttnmapResult, attention_map, sample_tokens
from pg_analysis.data import load_pairs, select
from pg_analysis.errors import InputError
from pg_analysis.models import pick_runtime
from pg_analysis.runs import model_folder, read_run_record

from .conversations import default_template, letter_token_ids
from .datasets import LETTERS, Example, collate, image_features, mcq_record, tokenize_records
from .vlm import VLM, load_vlm, precision_context


@dataclass
class PromptModel:
    """A loaded VLM and the prompt format it was trained with."""

    vlm: VLM
    template: str
    system: str | None
    source: str

    @property
    def model(self) -> Any:
        return self.vlm.model


def load_prompt_model(source: str | Path, insert_layer: int | None = None, runtime: Any = None) -> PromptModel:
    """Load ``source`` (see module docstring); ``insert_layer`` overrides the saved L."""
    run = Path(source)
    found = model_folder(run)
    if found is None and run.exists():
        raise InputError(f"{source}: neither a pg-train run (model/config.json) nor a model folder (config.json)")
    model_src: str | Path = found if found is not None else source
    run_cfg = (read_run_record(run) or {}) if found is not None and found != run else {}
    vlm = load_vlm(model_src, insert_layer=insert_layer, runtime=runtime)
    try:
        token = vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    except (IndexError, OverflowError, TypeError):
        token = None
    if token is None or vlm.tokenizer.convert_tokens_to_ids(token) != vlm.image_token_id:
        raise InputError(f"{source}: the tokenizer has no image token (id {vlm.image_token_id}); "
                         "a LLaVA-format VLM marks its vision rows with one")
    template = run_cfg.get("template") or default_template(vlm.tokenizer)
    system = run_cfg.get("config", {}).get("system_prompt") if run_cfg else None
    return PromptModel(vlm, template, system, str(source))


def mcq_records(pairs: Any, seed: int = 0) -> list[dict[str, Any]]:
    """One 4-way MCQ per pair of ``pairs`` (rows with ``id``, ``image`` (a file path), ``caption``): the correct
    letter of pair ``i`` is ``LETTERS[i % 4]``, distractors are other pairs' captions. Deterministic in ``seed``."""
    rows = [dict(r) for r in pairs]
    captions = sorted({r["caption"].strip() for r in rows})
    if len(captions) < 4:
        raise InputError(f"multiple-choice prompts need at least 4 distinct captions, got {len(captions)}")
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r["image"], str) or not Path(r["image"]).is_file():
            raise InputError(f"pair {r['id']}: image must be an existing file path, got {str(r['image'])[:80]!r}")
        cap = r["caption"].strip()
        pool = [c for c in captions if c.lower() != cap.lower()]
        base = {"image": r["image"], "image_path": r["image"], "caption": cap, "image_id": str(r["id"])}
        out.append(mcq_record(base, pool, i % len(LETTERS), rng))
    return out


@dataclass
class Prompts:
    """Tokenised prompts (generation prefix, answer excluded) and the feature table of their images."""

    examples: list[Example]
    features: torch.Tensor  # [n_images, 1, P, D_v]

    def batches(self, pm: PromptModel, batch_size: int) -> Iterator[tuple[list[Example], dict[str, torch.Tensor]]]:
        """Left-padded batches on the model's device, without labels."""
        device = pm.model.device
        for start in range(0, len(self.examples), batch_size):
            exs = self.examples[start:start + batch_size]
            batch = collate(exs, pm.vlm.tokenizer.pad_token_id, self.features, padding_side="left")
            batch.pop("labels")
            yield exs, {k: v.to(device) for k, v in batch.items()}


def mcq_prompts(pm: PromptModel, records: list[dict[str, Any]], cache_dir: Path | None = None,
                progress: bool = True) -> Prompts:
    """Tokenise MCQ ``records`` in ``pm``'s format and encode their images once (no mirror)."""
    paths = sorted({r["image_path"] for r in records})
    index = {p: i for i, p in enumerate(paths)}
    model = pm.model
    exs = tokenize_records(records, pm.vlm.tokenizer, pm.template, model.config.image_token_index,
                           model.num_image_tokens, index, generation=True, system=pm.system)
    feats = image_features(pm.vlm, paths, cache_dir, progress=progress, mirror=False)
    return Prompts(exs, feats)


@torch.no_grad()
def letter_logits(pm: PromptModel, prompts: Prompts, insert_layer: int | None = None, batch_size: int = 16,
                  precision: str = "fp32") -> torch.Tensor:
    """``[n, 4]`` logits of the letters A–D at the answer position, with the model run at ``insert_layer``
    (default: its own L; the weights are not changed, only the layer the vision rows enter)."""
    model = pm.model
    own = model.insert_layer
    ids = letter_token_ids(pm.vlm.tokenizer, pm.template)
    out = []
    try:
        if insert_layer is not None:
            model.set_insert_layer(insert_layer)
        for _, batch in prompts.batches(pm, batch_size):
            with precision_context(precision, model.device):
                logits = model(**batch, logits_to_keep=1).logits
            out.append(logits[:, -1, ids].float().cpu())
    finally:
        model.set_insert_layer(own)
    return torch.cat(out)


def prefill_saving(pm: PromptModel, prompts: Prompts, layers: list[int]) -> list[float]:
    """Predicted prefill-FLOP saving ``1 − FLOPs(L) / FLOPs(0)`` for the prompts' mean text and vision lengths."""
    from .bench import FlopModel

    v = pm.model.num_image_tokens
    t = float(np.mean([len(e.input_ids) for e in prompts.examples])) - v
    flops = FlopModel.of(pm.model.decoder_parts())
    return [1.0 - flops.prefill_ratio(t, v, layer) for layer in layers]


def run_attnmap(cfg: AttnmapConfig, progress: bool = True) -> AttnmapResult:
    """Load the VLM and the pairs, build the MCQ prompts, measure, return the result (nothing written)."""
    pm = load_prompt_model(cfg.vlm, runtime=pick_runtime(cfg.device, "float32"))
    pairs = load_pairs(cfg.data, cfg.coco_root)
    n = min(cfg.n, len(pairs))
    records = mcq_records(select(pairs, n, cfg.seed), cfg.seed)
    cache = feature_cache_dir(cfg.cache_dir)
    prompts = mcq_prompts(pm, records, cache, progress=progress)
    t0 = time.perf_counter()
    attention = attention_map(pm, prompts, cfg.query, cfg.backend, cfg.batch_size, progress)
    info = {"seconds": time.perf_counter() - t0, "template": pm.template, "requested_n": cfg.n,
            "vision_tokens": int(attention.shape[1]), "layers": int(attention.shape[0]),
            "mean_prompt_tokens": float(np.mean([len(e.input_ids) for e in prompts.examples]))}
    return AttnmapResult(cfg, attention, sample_tokens(attention.shape[1], cfg.show_tokens, cfg.seed), len(records),
                         pm.model.insert_layer, info)
