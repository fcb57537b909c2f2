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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

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
    answers: np.ndarray | None = None  # [n] the correct letter's index (A = 0), when the records have one

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
    answers = (np.array([LETTERS.index(r["answer"]) for r in records])
               if all(r.get("answer") in LETTERS for r in records) else None)
    return Prompts(exs, feats, answers)


def knockout_mask(mask: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """The additive attention mask ``mask [B, 1, T, T]`` of a full-sequence layer with every text query barred
    from every vision key (``vision_mask [B, T]``, True at vision rows). Vision queries keep what they had."""
    barred = (~vision_mask)[:, None, :, None] & vision_mask[:, None, None, :]
    return mask.masked_fill(barred, torch.finfo(mask.dtype).min)


@contextmanager
def text_blind_to_vision(layers: Any, vision_mask: torch.Tensor) -> Iterator[None]:
    """While inside, the decoder ``layers`` given run with :func:`knockout_mask`: the text rows cannot read the
    vision rows there, which are still computed (a knockout; the weights are unchanged). The layers must see the
    whole sequence (a model at L = 0, K = N, without a cache)."""
    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        mask = kwargs.get("attention_mask")
        if mask is None or mask.shape[-2:] != (vision_mask.shape[1],) * 2:
            raise InputError("a knockout needs every layer to see the whole sequence (the model at L = 0)")
        return args, {**kwargs, "attention_mask": knockout_mask(mask, vision_mask)}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def letter_logits(pm: PromptModel, prompts: Prompts, insert_layer: int | None = None, batch_size: int = 16,
                  precision: str = "fp32", blind: range | None = None) -> torch.Tensor:
    """``[n, 4]`` logits of the letters A–D at the answer position, with the model run at ``insert_layer``
    (default: its own L; the weights are not changed, only the layer the vision rows enter). ``blind``: the
    decoder layers where the text rows cannot read the vision rows (:func:`text_blind_to_vision`)."""
    model = pm.model
    own = model.insert_layer
    ids = letter_token_ids(pm.vlm.tokenizer, pm.template)
    layers = model.decoder_parts().model.layers
    picked = [layers[i] for i in blind] if blind is not None else []
    out = []
    try:
        if insert_layer is not None:
            model.set_insert_layer(insert_layer)
        for _, batch in prompts.batches(pm, batch_size):
            vision = batch["input_ids"] == model.config.image_token_index
            with precision_context(precision, model.device), text_blind_to_vision(picked, vision):
                logits = model(**batch, logits_to_keep=1).logits
            out.append(logits[:, -1, ids].float().cpu())
    finally:
        model.set_insert_layer(own)
    return torch.cat(out)


def knockout_shift(pm: PromptModel, prompts: Prompts, layers: list[int], kind: str, batch_size: int = 16,
                   precision: str = "fp32", progress: bool = False,
                   base: torch.Tensor | None = None) -> dict[int, dict[str, float]]:
    """The training-free proxies, from the baseline (L = 0) model: for each ``layer`` in ``layers``, the shift of
    the answer distribution (:func:`~pg_analysis.recommend.answer_shift` against the unchanged model) when the text
    rows cannot read the vision rows in layers ``0 … layer−1`` (``kind="entry"``: what the text path loses when
    the vision rows enter at ``layer``) or ``layer … N−1`` (``kind="exit"``, VTW's rule: what it loses when they
    leave there). Returns ``{layer: {"kl", "answers_changed", "accuracy"}}`` (accuracy: None without answers).
    ``base``: the unchanged model's :func:`letter_logits` on ``prompts``, when the caller has them already."""
    from pg_analysis.recommend import answer_shift

    model = pm.model
    n = model.decoder_parts().config.num_hidden_layers
    if kind not in ("entry", "exit"):
        raise InputError(f"knockout kind must be entry or exit, got {kind!r}")
    if model.insert_layer != 0 or model.exit_layer != n:
        raise InputError(f"the knockout proxies run on the baseline (L = 0, K = N); this model has L = "
                         f"{model.insert_layer}, K = {model.exit_layer}")
    bad = [x for x in layers if not 0 <= x <= n]
    if bad:
        raise InputError(f"knockout layers must be in [0, {n}] for this {n}-layer LM, got {bad}")
    if not any(model.config.image_token_index in e.input_ids for e in prompts.examples):
        raise InputError("the prompts have no vision rows: nothing to knock out")
    answers = prompts.answers
    if base is None:
        base = letter_logits(pm, prompts, batch_size=batch_size, precision=precision)
    out = {}
    for layer in tqdm(layers, desc=f"{kind} knockout", disable=not progress):
        blind = range(0, layer) if kind == "entry" else range(layer, n)
        logits = (letter_logits(pm, prompts, batch_size=batch_size, precision=precision, blind=blind) if blind
                  else base)  # blind nowhere: the unchanged model
        changed, kl = answer_shift(base, logits)
        acc = float((logits.argmax(1).numpy() == answers).mean()) if answers is not None else None
        out[layer] = {"kl": kl, "answers_changed": changed, "accuracy": acc}
    return out


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
