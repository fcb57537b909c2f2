"""``pg-eval``: multiple-choice accuracy, caption ranking, caption generation, controls and efficiency.

- **MCQ** (the paper's protocol): one forward pass per question; the logits of the option letters at the answer
  position are compared. Reported with a Wilson 95 % interval and the histogram of predicted letters (a model stuck
  on one letter shows at once).
- **Caption ranking**: for each test image, the mean token log-likelihood of candidate captions as the answer to
  "What is this?": among its 4 MCQ options (a record's own ``candidates`` when it has them: a molecule's name among
  three others), and among all test captions (the prompt is run once, its KV cache is repeated over the
  candidates).
- Molecule runs (``--modality molecule``) are read the same way: the MCQ asks for the molecule's class, the ranking
  for its name; the controls drop the molecule or give each question another test molecule's.
- **Caption generation**: greedy ``generate()``; exact match and ROUGE-L F1 against the reference caption.
- **Controls**, beside every accuracy: the same model with no image (the image placeholder removed) and with
  shuffled images (each question gets another test image's features, a derangement). An accuracy that survives
  shuffling is not grounding.
- **Diagnostics** that say which part failed when MCQ accuracy is low: the same MCQ with the caption given as text
  in place of the image (did the LM learn to read and answer?); with the caption's LM representation at L put in
  the vision rows (does the LM read a caption placed where the picture goes?); and 4-way retrieval in the warm-up's
  own space — cosine between an image's mean projected row and each option's LM representation at L (does the
  projector carry the picture to where it is inserted?).
- **Efficiency**: MCQ prefill latency at the model's L and at L=0 with the same weights, beside the
  FLOP-proportional prediction (:class:`~pg_train.bench.FlopModel`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pg_analysis.errors import InputError
from pg_analysis.runs import DATA_DIR, DATA_MANIFEST, TRAIN_SUMMARY, model_folder, read_json, read_run_record

from .conversations import image_instruction, letter_token_ids
from .datasets import (LETTERS, Example, collate, image_features, load_llava_json, manifest_image_root,
                       pad_rows, text_first, tokenize_records, without_image)
from .grounding import CACHE_FIELD, GroundedCache
from .vlm import PRECISIONS, VLM, precision_context, resolve_precision, use_attention
from .warmup import CaptionStates, caption_targets, image_prefix

CONTROLS = ("image", "no_image", "shuffled")


# ----------------------------------------------------------------------------------------------------------------
# pure metrics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95 % for ``z = 1.96``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (centre - half, centre + half)


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words (longest common subsequence)."""
    a, b = _words(prediction), _words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def exact_match(prediction: str, reference: str) -> bool:
    return _words(prediction) == _words(reference)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (n ≥ 2): a random cyclic shift of a random order."""
    if n < 2:
        raise InputError("the shuffled-image control needs at least 2 images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shift = int(rng.integers(1, n))
    out = np.empty(n, dtype=np.int64)
    out[order] = order[(np.arange(n) + shift) % n]
    return out


def accuracy_record(correct: list[bool], predicted: list[str] | None = None) -> dict[str, Any]:
    k, n = int(sum(correct)), len(correct)
    rec: dict[str, Any] = {"accuracy": k / n if n else float("nan"), "ci95": wilson_interval(k, n), "n": n,
                           "correct": [int(c) for c in correct]}  # per question, for bootstraps across runs
    if predicted is not None:
        rec["letters"] = {letter: predicted.count(letter) for letter in LETTERS}
    return rec


def caption_rows(targets: torch.Tensor, n_rows: int, norm: float) -> torch.Tensor:
    """Stand-in vision rows made from text: each caption representation ``[N, d]`` rescaled to ``norm`` and
    repeated over ``n_rows`` rows → ``[N, n_rows, d]``."""
    return (torch.nn.functional.normalize(targets.float(), dim=-1) * norm)[:, None].expand(-1, n_rows, -1)


def cosine_choices(queries: torch.Tensor, candidates: torch.Tensor, options: torch.Tensor) -> torch.Tensor:
    """For each question ``i``, the index (0..K-1) of the option whose candidate row is most cosine-similar to
    ``queries[i]``. ``queries [n, d]``, ``candidates [m, d]``, ``options [n, K]`` (indices into ``candidates``)."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    c = torch.nn.functional.normalize(candidates.float(), dim=-1)
    return torch.einsum("nd,nkd->nk", q, c[options]).argmax(1)


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class EvalConfig:
    """Options of one evaluation. Validates itself; no I/O."""

    run: str  # a pg-train output folder (model/ + config.json + data/) or a model folder with --data-dir
    data_dir: str | None = None  # instruction JSON folder (default: <run>/data)
    split: str = "test"
    batch_size: int = 16
    rank_all: bool = True
    generate: bool = True
    max_new_tokens: int = 12
    precision: str = "auto"
    seed: int = 0
    bench_repeats: int = 3
    progress: bool = True
    modality: str | None = None  # the inputs the run's model must read (None: whatever it reads)

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise InputError(f"split must be train, val or test, got {self.split!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.bench_repeats < 0:
            raise InputError("batch_size and max_new_tokens must be >= 1, bench_repeats >= 0")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# ----------------------------------------------------------------------------------------------------------------
# the evaluator


class Evaluator:
    """Holds a loaded VLM, its prompt format, and the test images' cached features."""

    def __init__(self, vlm: VLM, template: str, system: str | None, records: dict[str, list[dict[str, Any]]],
                 cfg: EvalConfig, cache_dir: Path | None, centred: bool = False):
        self.vlm, self.template, self.system, self.cfg = vlm, template, system, cfg
        self.model = vlm.model
        self.device = self.model.device
        self.attention = use_attention(self.model, "auto")
        self.records = records
        paths = sorted({r["image_path"] for rs in records.values() for r in rs if r.get("image_path")})
        self.image_index = {p: i for i, p in enumerate(paths)}
        self.features = image_features(vlm, paths, cache_dir, progress=cfg.progress)
        self.seq2seq = vlm.is_encoder_decoder
        self.perm = derangement(len(paths), cfg.seed)
        self.letter_ids = letter_token_ids(vlm.tokenizer, template)
        self._option_targets: tuple[dict[str, int], CaptionStates] | None = None
        self.centred = centred

    def prompts(self, records: list[dict[str, Any]], control: str) -> list[Example]:
        recs = [without_image(r) for r in records] if control == "no_image" else records
        exs = tokenize_records(recs, self.vlm.tokenizer, self.template, self.model.config.image_token_index,
                               self.model.num_image_tokens, self.image_index, generation=True, system=self.system)
        if control == "shuffled":
            exs = [Example(e.input_ids, e.labels, int(self.perm[e.image]) if e.image >= 0 else -1, e.record)
                   for e in exs]
        return exs

    def _batch(self, exs: list[Example]) -> dict[str, torch.Tensor]:
        batch = collate(exs, self.vlm.tokenizer.pad_token_id, self.features, padding_side="left")
        batch.pop("labels")
        batch.update(self.vlm.qformer_inputs([image_instruction(e.record["conversations"]) for e in exs
                                              if e.image >= 0]))  # InstructBLIP's Q-Former reads the question
        return {k: v.to(self.device) for k, v in batch.items()}

    def _decoder_start(self, n: int) -> torch.Tensor:
        """``[n, 1]``: an encoder–decoder LM's decoder input before its first answer token."""
        return torch.full((n, 1), self.model.config.text_config.decoder_start_token_id, device=self.device)

    @torch.no_grad()
    def last_logits(self, exs: list[Example], rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, V]`` logits at the answer position of each prompt (left-padded batches, one forward each; an
        encoder–decoder LM: its decoder's first step). ``rows [n, P, d]``: vision rows to put in place of the
        projected images (every prompt has one image; decoder-only LMs)."""
        out = []
        for start in range(0, len(exs), self.cfg.batch_size):
            batch = self._batch(exs[start:start + self.cfg.batch_size])
            with precision_context(self.cfg.precision, self.device):
                if self.seq2seq:
                    logits = self.model(**batch, decoder_input_ids=self._decoder_start(len(batch["input_ids"]))).logits
                elif rows is None:
                    logits = self.model(**batch, logits_to_keep=1).logits
                else:
                    batch.pop("vision_features")
                    embeds, vmask = self.model.embed(batch["input_ids"],
                                                     rows[start:start + self.cfg.batch_size].to(self.device))
                    logits = self.model(inputs_embeds=embeds, vision_mask=vmask,
                                        attention_mask=batch["attention_mask"], logits_to_keep=1).logits
            out.append(logits[:, -1].float().cpu())
        return torch.cat(out)

    def mcq(self, control: str) -> dict[str, Any]:
        records = self.records["mcq"]
        return self._letter_accuracy(self.last_logits(self.prompts(records, control)), records)

    def text_mcq(self) -> dict[str, Any]:
        """MCQ with the caption as text in place of the image (``Picture: <caption>.``, the text-first format)."""
        pairs = [(r, t) for r in self.records["mcq"] if (t := text_first(r)) is not None]
        records = [r for r, _ in pairs]
        exs = tokenize_records([t for _, t in pairs], self.vlm.tokenizer, self.template,
                               self.model.config.image_token_index, self.model.num_image_tokens, {}, generation=True,
                               system=self.system)
        return self._letter_accuracy(self.last_logits(exs), records)

    def _letter_accuracy(self, logits: torch.Tensor, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy and letter histogram of the option letter with the highest logit (``logits [n, V]``)."""
        pred = [LETTERS[i] for i in logits[:, self.letter_ids].argmax(1).tolist()]
        return accuracy_record([p == r["answer"] for p, r in zip(pred, records)], pred)

    def _image_questions(self) -> list[dict[str, Any]]:
        return [r for r in self.records["mcq"] if r.get("image_path") in self.image_index]

    @torch.no_grad()
    def option_targets(self) -> tuple[dict[str, int], CaptionStates]:
        """Every option's LM states at the insertion point, after the prompt text that precedes the image
        (:func:`~pg_train.warmup.caption_targets`): ``(index by caption, CaptionStates)``.
        Computed once; the slot MCQ and the warm-up retrieval share it."""
        if self._option_targets is None:
            records = self._image_questions()
            captions = sorted({o for r in records for o in r["options"]})
            prefix = image_prefix(self.prompts(records[:1], "image"), self.model.config.image_token_index)
            states = caption_targets(self.vlm, captions, self.model.insert_layer, prefix)
            self._option_targets = ({c: i for i, c in enumerate(captions)}, states)
        return self._option_targets

    @torch.no_grad()
    def slot_mcq(self) -> dict[str, Any]:
        """MCQ with each image's rows replaced by its caption's mean LM state at L (:func:`caption_rows`, at the
        median token norm there): does the LM read a caption put where the vision rows go?"""
        records = self._image_questions()
        index, states = self.option_targets()
        rows = caption_rows(states.means[[index[r["caption"]] for r in records]], self.model.num_image_tokens,
                            states.median_norm)
        return self._letter_accuracy(self.last_logits(self.prompts(records, "image"), rows), records)

    @torch.no_grad()
    def warmup_retrieval(self) -> dict[str, Any]:
        """4-way MCQ answered by cosine between the image's mean projected row and each option's mean LM state at
        the insertion point (:func:`~pg_train.warmup.caption_targets`): the stage-0 objective, on held-out images.
        For a run trained with ``match_mean`` (and ``scale_match``) both sides are centred by the options' mean
        token state, as in its training objective."""
        records = self._image_questions()
        index, states = self.option_targets()
        with precision_context(self.cfg.precision, self.device):
            pooled = self.model.project(self.features[:, 0].to(self.device)).float().mean(1).cpu()
        targets = states.means
        if self.centred:
            pooled, targets = pooled - states.token_mean, targets - states.token_mean
        images = torch.tensor([self.image_index[r["image_path"]] for r in records])
        options = torch.tensor([[index[o] for o in r["options"]] for r in records])
        pred = cosine_choices(pooled[images], targets, options).tolist()
        return accuracy_record([LETTERS[i] == r["answer"] for i, r in zip(pred, records)])

    @torch.no_grad()
    def _candidate_scores(self, prompt: Example, candidates: list[list[int]]) -> torch.Tensor:
        """Mean token log-probability of each candidate continuation of one prompt (prefill once, cache repeated;
        an encoder–decoder LM: each candidate as the decoder's target)."""
        batch = self._batch([prompt])
        if self.seq2seq:
            k = len(candidates)
            labels, _ = pad_rows(candidates, -100)
            labels = labels.to(self.device)
            inputs = {key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in batch.items()}
            with precision_context(self.cfg.precision, self.device):
                logits = self.model(**inputs, labels=labels).logits
            logp = torch.log_softmax(logits.float(), -1).gather(2, labels.clamp_min(0)[..., None])[..., 0]
            keep = labels != -100
            return ((logp * keep).sum(1) / keep.sum(1)).cpu()
        with precision_context(self.cfg.precision, self.device):
            out = self.model(**batch, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        cache: GroundedCache = getattr(out, CACHE_FIELD)
        k = len(candidates)
        cache.repeat_rows(k)
        ids, mask = (x.to(self.device) for x in pad_rows(candidates, self.vlm.tokenizer.pad_token_id))
        t = ids.shape[1]
        with precision_context(self.cfg.precision, self.device):
            logits = self.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), -1)  # row j predicts token j+1
        scores = first[ids[:, 0]].clone()
        if t > 1:
            nxt = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
            scores = scores + (nxt * mask[:, 1:]).sum(1)
        return (scores / mask.sum(1)).cpu()

    def ranking(self, control: str, pool: str) -> dict[str, Any]:
        """``pool``: ``options`` (its 4 MCQ options) or ``all`` (every test caption)."""
        what = self.records["what"]
        prompts = self.prompts(what, control)
        options = {}
        for r in self.records["mcq"]:
            options.setdefault(r["image_id"], r["options"])
        all_captions = sorted({r["caption"] for r in what})
        tok = self.vlm.tokenizer
        encode = lambda c: tok(c, add_special_tokens=False)["input_ids"]  # noqa: E731
        encoded = {c: encode(c) for c in set(all_captions) | {o for os in options.values() for o in os}
                   | {c for r in what for c in r.get("candidates") or ()}}
        correct = []
        for ex, r in tqdm(list(zip(prompts, what)), desc=f"ranking {pool} ({control})", disable=not self.cfg.progress):
            # a record's own 4 candidates (a molecule's name among three others), else its image's MCQ options
            cands = (r.get("candidates") or options.get(r["image_id"])) if pool == "options" else all_captions
            if not cands:
                continue
            scores = self._candidate_scores(ex, [encoded[c] for c in cands])
            correct.append(cands[int(scores.argmax())] == r["caption"])
        rec = accuracy_record(correct)
        rec["candidates"] = 4 if pool == "options" else len(all_captions)
        return rec

    @torch.no_grad()
    def generation(self) -> dict[str, Any]:
        what = self.records["what"]
        exs = self.prompts(what, "image")
        tok = self.vlm.tokenizer
        preds = []
        for start in tqdm(range(0, len(exs), self.cfg.batch_size), desc="generate", disable=not self.cfg.progress):
            batch = self._batch(exs[start:start + self.cfg.batch_size])
            with precision_context(self.cfg.precision, self.device):
                out = self.model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          suppress_tokens=[self.model.config.image_token_index])
            new = out if self.seq2seq else out[:, batch["input_ids"].shape[1]:]  # an encoder-decoder's are all new
            preds += tok.batch_decode(new, skip_special_tokens=True)
        preds = [p.strip() for p in preds]
        refs = [r["caption"] for r in what]
        return {"exact_match": float(np.mean([exact_match(p, r) for p, r in zip(preds, refs)])),
                "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs)])), "n": len(preds),
                "examples": [{"image_id": r["image_id"], "reference": r["caption"], "generated": p}
                             for p, r in list(zip(preds, what))[:10]]}

    @torch.no_grad()
    def efficiency(self) -> dict[str, Any]:
        """MCQ prefill latency (one batch) at the model's window (L, K) and as the ordinary model (0, N), with the
        FLOP prediction."""
        from .bench import FlopModel

        exs = self.prompts(self.records["mcq"][:self.cfg.batch_size], "image")
        batch = self._batch(exs)
        if self.seq2seq:
            return self._bypass_efficiency(batch)
        layer, exit_layer = self.model.insert_layer, self.model.config.exit_layer
        v = self.model.num_image_tokens
        t = float(batch["attention_mask"].sum(1).float().mean()) - v
        flops = FlopModel.of(self.model.decoder_parts())
        timings = {}
        try:
            for window in dict.fromkeys([(0, None), (layer, exit_layer)]):
                self.model.set_exit_layer(None)  # widen first, so any L is allowed, then narrow
                self.model.set_insert_layer(window[0])
                self.model.set_exit_layer(window[1])
                timings[window] = self._best_time(lambda: self.model(**batch, logits_to_keep=1))
        finally:
            self.model.set_exit_layer(None)
            self.model.set_insert_layer(layer)
            self.model.set_exit_layer(exit_layer)
        predicted = flops.prefill_ratio(t, v, layer, exit_layer)
        measured = timings[(layer, exit_layer)] / timings[(0, None)]
        return {"insert_layer": layer, "exit_layer": self.model.exit_layer, "batch": len(exs), "text_tokens": t,
                "vision_tokens": v, "prefill_s": timings[(layer, exit_layer)], "prefill_s_L0": timings[(0, None)],
                "measured_ratio": measured, "predicted_ratio": predicted}

    def _best_time(self, call: Any) -> float:
        """The fastest of ``bench_repeats`` (at least one) timed calls, under the evaluation's precision."""
        from .bench import timed_call

        best = float("inf")
        for _ in range(max(1, self.cfg.bench_repeats)):
            with precision_context(self.cfg.precision, self.device):
                best = min(best, timed_call(call, self.device))
        return best

    def _bypass_efficiency(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """An encoder–decoder LM: prefill (encoder + first decoder step) with the vision rows bypassing the
        encoder and going through it (measured; no FLOP model for T5 here)."""
        config, timings = self.model.config, {}
        bypass = config.bypass_encoder
        start = self._decoder_start(len(batch["input_ids"]))
        try:
            for mode in dict.fromkeys([False, bypass]):
                config.bypass_encoder = mode
                timings[mode] = self._best_time(lambda: self.model(**batch, decoder_input_ids=start))
        finally:
            config.bypass_encoder = bypass
        v = self.model.num_image_tokens
        return {"bypass_encoder": bypass, "batch": len(start), "vision_tokens": v,
                "text_tokens": float(batch["attention_mask"].sum(1).float().mean()) - v,
                "prefill_s": timings[bypass], "prefill_s_through_encoder": timings[False],
                "measured_ratio": timings[bypass] / timings[False], "predicted_ratio": None}


def _run_files(run: Path, data_dir: str | None) -> tuple[Path, dict[str, Any], Path]:
    model_dir = model_folder(run)
    if model_dir is None:
        raise InputError(f"{run}: no model (expected a pg-train folder with model/ or a model folder)")
    run_cfg = (read_run_record(run) or {}) if model_dir != run else {}
    data = Path(data_dir) if data_dir else run / DATA_DIR
    if not (data / DATA_MANIFEST).is_file():
        raise InputError(f"no instruction data at {data} ({DATA_MANIFEST}); pass --data-dir")
    return model_dir, run_cfg, data


def split_records(data: Path, split: str, tasks: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """The records of one split of a run's instruction data folder (``<run>/data``: its manifest names a file per
    split and task, and the image root), per task."""
    manifest = read_json(data / DATA_MANIFEST, "the instruction data manifest", keys=("files",))
    needed = [f"{split}_{task}" for task in tasks]
    if not isinstance(manifest["files"], dict) or set(needed) - set(manifest["files"]):
        raise InputError(f"the instruction data manifest {data / DATA_MANIFEST} names no {' / '.join(needed)} files")
    root = manifest_image_root(manifest, data)
    return {task: load_llava_json(data / manifest["files"][f"{split}_{task}"], root) for task in tasks}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate one trained model (see module docstring); returns the result dict."""
    from pg_analysis.assets import feature_cache_dir
    from pg_analysis.models import pick_runtime

    from .probe import load_prompt_model

    run = Path(cfg.run)
    model_dir, run_cfg, data = _run_files(run, cfg.data_dir)
    pm = load_prompt_model(run, runtime=pick_runtime(None, "float32"))
    vlm, template, system = pm.vlm, pm.template, pm.system
    if cfg.modality is not None and vlm.modality != cfg.modality:
        raise InputError(f"{run}: its model reads {vlm.modality} inputs, not --modality {cfg.modality}")
    train_cfg = run_cfg.get("config", {})
    records = split_records(data, cfg.split, ("mcq", "what"))
    cache_dir = feature_cache_dir(train_cfg.get("cache_dir"))
    # TrainConfig.centred, read from the saved options; a run from before --match-mean existed was not centred
    ev = Evaluator(vlm, template, system, records, cfg, cache_dir,
                   centred=bool(train_cfg.get("scale_match", True) and train_cfg.get("match_mean", False)))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"model": str(model_dir), "insert_layer": getattr(vlm.model, "insert_layer", None),
                              "modality": vlm.modality, "split": cfg.split, "template": template,
                              "attention": ev.attention,
                              "precision": resolve_precision(cfg.precision, ev.device),
                              "n_images": len(records["what"]), "mcq": {}, "rank4": {}}
    if vlm.is_encoder_decoder:
        result["bypass_encoder"] = vlm.model.config.bypass_encoder
    for control in CONTROLS:
        result["mcq"][control] = ev.mcq(control)
        result["rank4"][control] = ev.ranking(control, "options")
    # the slot MCQ and the warm-up retrieval read the LM's states at the insertion layer: decoder-only LMs
    result["diagnostics"] = {"text_mcq": ev.text_mcq()} if vlm.is_encoder_decoder else {
        "text_mcq": ev.text_mcq(), "slot_mcq": ev.slot_mcq(), "warmup_rank4": ev.warmup_retrieval()}
    if cfg.rank_all:
        result["rank_all"] = {"image": ev.ranking("image", "all")}
    if cfg.generate:
        result["generation"] = ev.generation()
    if cfg.bench_repeats:
        result["efficiency"] = ev.efficiency()
    result["eval_seconds"] = time.perf_counter() - t0
    summary = run / TRAIN_SUMMARY
    if summary.is_file():
        s = json.loads(summary.read_text())
        result["training"] = {"throughput": s.get("throughput"), "run_seconds": s.get("run_seconds"),
                              "peak_rss_mib": s.get("peak_rss_mib")}
    return result


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """One row per model: MCQ (with controls), 4-way and all-caption ranking, generation, efficiency, training."""
    head = ("model", "L", "MCQ [95% CI]", "no-img", "shuffled", "letters A/B/C/D", "rank4", "r4 no-img",
            "r4 shuf", "text MCQ", "slot MCQ", "warm-up r4", "rank-all", "ROUGE-L", "prefill ×L0 (pred)", "train s",
            "RSS MiB")
    rows = [head]
    for name, r in results.items():
        m = r["mcq"]
        lo, hi = m["image"]["ci95"]
        letters = "/".join(str(m["image"]["letters"][x]) for x in LETTERS)
        eff = r.get("efficiency")
        tr = r.get("training") or {}
        where = "bypass" if r.get("bypass_encoder") else str(r["insert_layer"])  # encoder-decoder: bypass or None
        rows.append((name, where, f"{m['image']['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]",
                     f"{m['no_image']['accuracy']:.3f}", f"{m['shuffled']['accuracy']:.3f}", letters,
                     f"{r['rank4']['image']['accuracy']:.3f}", f"{r['rank4']['no_image']['accuracy']:.3f}",
                     f"{r['rank4']['shuffled']['accuracy']:.3f}",
                     *(f"{r['diagnostics'][k]['accuracy']:.3f}" if k in r.get("diagnostics", {}) else "-"
                       for k in ("text_mcq", "slot_mcq", "warmup_rank4")),
                     f"{r['rank_all']['image']['accuracy']:.3f}" if "rank_all" in r else "-",
                     f"{r['generation']['rouge_l']:.3f}" if "generation" in r else "-",
                     f"{eff['measured_ratio']:.2f} ({eff['predicted_ratio']:.2f})" if eff and eff["predicted_ratio"]
                     is not None else f"{eff['measured_ratio']:.2f}" if eff else "-",
                     f"{tr['run_seconds']:.0f}" if tr.get("run_seconds") else "-",
                     f"{tr['peak_rss_mib']:.0f}" if tr.get("peak_rss_mib") else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
