"""``pg-train``: grounded frozen-encoder VLM training — stage 0 (Platonic warm-up), stage 1, stage 2.

A thin loop over ``accelerate``; the recipe and why each default: ``docs/recipe.md``:

- **scale matching** — before training, the projector's ``gain`` is set so the median norm of its output tokens
  equals the median norm of the LM's hidden states at the insertion point (input embeddings for L=0, the input of
  layer L otherwise), measured on the training captions;
- **stage 0** (optional, the paper has none) — the projector alone, with a symmetric InfoNCE loss (τ = 0.07, the
  whole training set as one batch) between the mean of its output tokens and the mean of the LM's hidden states of
  the paired caption at the insertion point: exactly the space the vision rows enter;
- **stage 1** — the projector on captioning (``plain`` template);
- **stage 2** — projector (its own lr) + LM decoder layers ≥ L and the final norm (full finetune) or LoRA on those
  layers; embeddings, head and vision tower stay frozen. The first ``text_first_steps`` steps and a fraction of the
  later ones give the caption as text instead of the image, so the answer format is learnt first;
- an auxiliary InfoNCE term (``aux_weight``) can keep the warm-up objective during stages 1–2.

Everything that varies per step is a function of ``(seed, stage, step)`` — batch order, mirror augmentation,
text-first choice — so a checkpoint (HF weights + optimizer + scheduler + RNG + position) resumes onto the same
loss curve (tested). The frozen encoder's features are computed once and cached on disk.

Outputs (``out_dir``): ``config.json``, ``data/`` (the instruction JSON), ``log.jsonl`` (one line per step: stage,
step, loss, lr, samples/s, tokens/s), ``checkpoints/`` (the latest kept), ``model/`` (final HF folder, written
atomically), ``loss.png``, ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from pg_analysis.errors import InputError
from pg_analysis.interp import capture_outputs
from pg_analysis.options import option
from pg_analysis.runinfo import atomic_write_json
from pg_analysis.runs import (CHECKPOINTS_DIR, DATA_DIR, MODEL_DIR, TRAIN_LOG, TRAIN_SUMMARY,
                             write_run_record)

from .conversations import TEMPLATES, default_template
from .datasets import (Example, build_tuxpaint_instructions, collate, image_features, load_llava_json, pad_rows,
                       text_first, tokenize_records)
from .vlm import ATTENTION, VLM, build_vlm, load_vlm, use_attention

log = logging.getLogger(__name__)

STAGES = (0, 1, 2)
#: fields that may differ between a run and the checkpoint it resumes from
RESUME_FREE = ("out_dir", "resume", "checkpoint_every", "stop_after", "progress", "cache_dir")


@dataclass
class TrainConfig:
    """All options of one ``pg-train`` run, each with its flag's help (``pg-train --help``). Validates itself in
    ``__post_init__``; no I/O. Why each default is what it is: ``docs/recipe.md``."""

    out_dir: str = option("runs/train", "output folder (default: %(default)s)")
    vision: str = option("dinov2-small-imgfocus", "frozen vision encoder: alias, folder or hub id (default: "
                                                  "%(default)s)")
    llm: str = option("smollm2-135m", "language model: alias, folder or hub id (default: %(default)s)")
    init_from: str | None = option(None, "start from a pg-train model folder or an HF LLaVA checkpoint (e.g. llava) "
                                         "instead of --vision/--llm")
    layer: int = option(0, "insert layer L: vision rows enter the LM at layer L (0 = ordinary LLaVA), or auto: the "
                           "layer pg-recommend names (read from --recommendation, else computed there from "
                           "--baseline, --align-result and --attnmap) (default: %(default)s)")
    exit_layer: int | None = option(None, "exit layer K (L <= K <= N): from LM layer K on the vision rows are gone "
                                          "again (default: N, they stay to the end)")
    vision_feature_layer: int = option(-2, "encoder hidden state used, as LLaVA (default: %(default)s)")
    vision_pool: int = option(4, "average-pool the patch grid with this kernel: 4 turns 16x16 patches into 16 tokens"
                                 " (default: %(default)s)")
    projector: str = option("mlp", "projector: mlp (LLaVA's 2-layer GELU) or linear (default: %(default)s)")
    data: str = option("tuxpaint", "image-caption pairs the instruction data is built from (tuxpaint, a "
                                   ".jsonl/.csv), or llava to train on --stage1-data/--stage2-data (default: "
                                   "%(default)s)")
    extra_train: str | None = option("auto", "more image-caption pairs for the training split only (a pairs source "
                                             "or .jsonl/.csv); pairs sharing a val/test caption are left out; auto: "
                                             "tuxpaint-cartoon (108 drawings) when --data is tuxpaint, else none; "
                                             "none: off (default: %(default)s)")
    stage1_data: str | None = option(None, "LLaVA JSON for stage 1 (captioning)")
    stage2_data: str | None = option(None, "LLaVA JSON for stage 2 (instructions)")
    image_root: str | None = option(None, "folder the JSON's image paths are relative to (default: the JSON's "
                                          "folder)")
    template: str = option("auto", "stage-2 conversation template: auto, chat, vicuna_v1, plain (default: "
                                   "%(default)s)")
    system_prompt: str | None = option("Answer about the image.", "system prompt for chat/vicuna templates; "
                                                                  "'default' keeps the template's own; '' gives none"
                                                                  " with vicuna_v1 (default: %(default)s)")
    max_length: int = option(256, "max tokens per example; longer ones are cut with a warning (default: %(default)s)")
    scale_match: bool = option(True, "set the projector gain to the LM's hidden-state norm at L before training "
                                     "(default: %(default)s)")
    match_mean: bool = option(True, "with --scale-match, also set the projector offset so the rows have the mean of "
                                    "the LM's token states at L, and match the norm around it (default: %(default)s)")
    stage0_steps: int = option(50, "Platonic warm-up steps (InfoNCE, projector only); 0 skips stage 0 (default: "
                                   "%(default)s)")
    stage0_lr: float = option(1e-3, "stage-0 learning rate (default: %(default)s)")
    tau: float = option(0.07, "InfoNCE temperature (default: %(default)s)")
    stage1_steps: int | None = option(None, "stage-1 steps (projector on captions, LLaVA's stage 1); default: 100 "
                                            "with --stage1-data, else 0 (after the warm-up it undoes the alignment; "
                                            "docs/recipe.md)")
    stage1_lr: float = option(1e-3, "stage-1 learning rate (default: %(default)s)")
    stage2_steps: int = option(220, "stage-2 steps (projector + LM layers >= L) (default: %(default)s)")
    stage2_lr: float = option(2e-4, "stage-2 learning rate of the LM (or LoRA) parameters (default: %(default)s)")
    stage2_projector_lr: float = option(1e-3, "stage-2 learning rate of the projector (default: %(default)s)")
    text_first_steps: int = option(60, "first stage-2 steps that give the caption as text instead of the image "
                                       "(default: %(default)s)")
    text_first_frac: float = option(0.3, "fraction of later stage-2 steps that do so (default: %(default)s)")
    aux_weight: float = option(0.1, "weight of the InfoNCE term kept in stages 1-2; 0 disables (default: "
                                    "%(default)s)")
    distill_weight: float = option(1.0, "weight of the text-twin distillation term in stage 2: image examples' LM "
                                        "states after the image pulled towards those with the caption as text in its"
                                        " place; 0 disables (default: %(default)s)")
    distill_layers: int = option(4, "layers >= L (evenly spaced, the last included) that the distillation term "
                                    "matches (default: %(default)s)")
    lora: bool = option(False, "stage 2 trains LoRA adapters (peft) on layers >= L instead of the full layers "
                               "(default: %(default)s)")
    lora_r: int = option(16, "LoRA rank (default: %(default)s)")
    lora_alpha: int = option(32, "LoRA alpha (default: %(default)s)")
    batch_size: int = option(16, "examples per optimizer step (per micro-batch) (default: %(default)s)")
    grad_accum: int = option(1, "micro-batches per optimizer step (default: %(default)s)")
    warmup_frac: float = option(0.03, "fraction of each stage's steps with linear warm-up before the cosine decay "
                                      "(default: %(default)s)")
    weight_decay: float = option(0.0, "AdamW weight decay (default: %(default)s)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables (default: %(default)s)")
    precision: str = option("bf16", "bf16 (autocast) or fp32 (default: %(default)s)")
    attention: str = option("auto", "LM attention kernel: auto (eager on CPU, measured faster there; sdpa "
                                    "elsewhere), eager or sdpa (default: %(default)s)")
    gradient_checkpointing: bool = option(False, "recompute decoder layers in the backward pass to save memory "
                                                 "(default: %(default)s)")
    checkpoint_every: int = option(100, "save a checkpoint every N steps (and at each stage end) (default: "
                                        "%(default)s)")
    seed: int = option(0, "seed of data order, augmentation and initialisation (default: %(default)s)")
    device: str | None = option(None, "cpu or cuda (default: cuda if available)")
    cache_dir: str | None = option(None, "encoder-feature cache folder (default: <asset cache>/features)")
    resume: bool = option(False, "continue from the latest checkpoint in --out-dir (default: %(default)s)")
    stop_after: int | None = option(None, "stop after N optimizer steps in this process, leaving a checkpoint (to "
                                          "test resuming)")
    progress: bool = option(True, "progress bars (the CLI's --quiet turns them off)")

    def __post_init__(self) -> None:
        if self.stage1_steps is None:
            self.stage1_steps = 100 if self.stage1_data else 0
        for name in ("stage0_steps", "stage1_steps", "stage2_steps", "text_first_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_length", "checkpoint_every", "vision_pool", "lora_r"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InputError(f"layer must be an integer >= 0, got {self.layer!r}")
        if self.template not in ("auto", *TEMPLATES):
            raise InputError(f"template must be auto or one of {TEMPLATES}, got {self.template!r}")
        if self.data == "llava" and self.extra_pairs() is not None:
            raise InputError("--extra-train adds pairs to the built instruction data; it does not apply to --data llava")
        if self.attention not in ATTENTION:
            raise InputError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.precision not in ("bf16", "fp32"):
            raise InputError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if not 0 <= self.text_first_frac <= 1 or not 0 <= self.warmup_frac < 1:
            raise InputError("text_first_frac must be in [0, 1] and warmup_frac in [0, 1)")
        if self.tau <= 0 or self.aux_weight < 0:
            raise InputError("tau must be > 0 and aux_weight >= 0")
        if self.distill_weight < 0 or self.distill_layers < 1:
            raise InputError("distill_weight must be >= 0 and distill_layers >= 1")
        if self.data == "llava" and not (self.stage1_data or self.stage2_data):
            raise InputError("--data llava needs --stage1-data and/or --stage2-data (LLaVA JSON)")
        if self.projector not in ("mlp", "linear"):
            raise InputError(f"projector must be mlp or linear, got {self.projector!r}")

    @property
    def centred(self) -> bool:
        """Rows carry the LM's mean token state at L (``scale_match`` and ``match_mean``), so the InfoNCE terms
        compare both sides with that mean taken off."""
        return self.scale_match and self.match_mean

    def extra_pairs(self) -> str | None:
        """The pairs source ``extra_train`` resolves to (None: no extra training pairs)."""
        if self.extra_train in (None, "", "none"):
            return None
        if self.extra_train == "auto":
            return "tuxpaint-cartoon" if self.data == "tuxpaint" else None
        return self.extra_train

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------------------------
# pure pieces: schedule, batch order, losses, parameter policy


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(n: int, batch: int, step: int, seed: int, stage: int) -> list[int]:
    """Sample indices of optimizer step ``step``: epochs of seeded permutations, consumed in order."""
    out, pos = [], step * batch
    for p in range(pos, pos + batch):
        epoch, i = divmod(p, n)
        out.append(int(np.random.default_rng([seed, stage, epoch]).permutation(n)[i]))
    return out


def grouped_batch_indices(lengths: list[int], batch: int, step: int, seed: int, stage: int,
                          group: int = 8) -> list[int]:
    """Like :func:`batch_indices`, but the samples of ``group`` consecutive steps are sorted by length and dealt
    out in that order, so a batch pads less (HF's ``group_by_length``). Still a pure function of ``step``."""
    first = step - step % group
    pool = batch_indices(len(lengths), batch * group, first // group, seed, stage)
    pool = sorted(pool, key=lambda i: (lengths[i], i))
    j = step % group
    order = np.random.default_rng([seed, stage, first, 3]).permutation(group)  # shuffle batch order in a group
    k = int(order[j])
    return pool[k * batch:(k + 1) * batch]


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step, 7])


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a [N, d]`` and ``b [N, d]`` (cosine similarity / ``tau``)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    logits = a @ b.T / tau
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.T, target))


def common_suffix_length(a: list[int], b: list[int]) -> int:
    """Number of trailing tokens ``a`` and ``b`` share (the tokens after the image in an image example and its
    text twin)."""
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def suffix_rows(hidden: torch.Tensor, lengths: list[int], suffix: list[int]) -> torch.Tensor:
    """The last ``suffix[i]`` of the first ``lengths[i]`` rows of each sample of right-padded ``hidden [B, T, d]``,
    stacked: ``[sum(suffix), d]``."""
    idx = [(i, t) for i, (n, s) in enumerate(zip(lengths, suffix)) for t in range(n - s, n)]
    b = torch.tensor([i for i, _ in idx], device=hidden.device)
    t = torch.tensor([t for _, t in idx], device=hidden.device)
    return hidden[b, t]


def state_match_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error of ``student [n, d]`` to ``teacher [n, d]`` relative to the teacher rows' spread around their
    mean: 0 when they match, ~2 for unrelated rows of the same spread. The shared component of the states (large
    in a small LM's middle layers) cancels in both the error and the spread."""
    teacher = teacher.float()
    err = (student.float() - teacher).pow(2).sum(-1).mean()
    spread = (teacher - teacher.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-6)
    return err / spread


def distill_layer_indices(insert_layer: int, n_layers: int, count: int) -> list[int]:
    """``count`` decoder layers evenly spaced over ``[insert_layer, n_layers)``, the last one included."""
    span = n_layers - insert_layer
    if span <= 0:
        return []
    picks = {insert_layer + max(1, round(span * k / count)) - 1 for k in range(1, count + 1)}
    return sorted(picks)


def grad_norms(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """L2 norm of the gradients of each named optimizer group (``{"projector": …, "lm": …}``)."""
    out = {}
    for g in param_groups:
        gs = [p.grad.detach().float().norm() for p in g["params"] if p.grad is not None]
        out[g["name"]] = float(torch.stack(gs).norm()) if gs else 0.0
    return out


def set_trainable(model: Any, stage: int, insert_layer: int, lora: bool = False) -> dict[str, list[torch.nn.Parameter]]:
    """Freeze everything, then unfreeze what ``stage`` trains. Returns the parameter groups
    ``{"projector": [...], "lm": [...]}``.

    Stage 0/1: the projector. Stage 2: + LM decoder layers ``≥ insert_layer`` and the final norm (full) — or only
    the LoRA adapters (``lora=True``, already added by :func:`add_lora`). Layers below L never see a vision row, so
    they stay frozen; embeddings, LM head and vision tower always stay frozen.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[str, list[torch.nn.Parameter]] = {"projector": list(model.model.multi_modal_projector.parameters()),
                                                   "lm": []}
    if stage == 2:
        lm = model.model.language_model
        if lora:
            groups["lm"] = [p for n, p in lm.named_parameters() if "lora_" in n]
        else:
            for layer in lm.layers[insert_layer:]:
                groups["lm"] += list(layer.parameters())
            groups["lm"] += list(lm.norm.parameters())
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    return groups


def add_lora(model: Any, insert_layer: int, r: int, alpha: int) -> None:
    """Add LoRA adapters (peft) to the attention and MLP projections of LM layers ``≥ insert_layer``."""
    from peft import LoraConfig, inject_adapter_in_model

    lm = model.model.language_model
    n = len(lm.layers)
    if insert_layer >= n:
        raise InputError(f"LoRA needs at least one layer at or above L={insert_layer} (the LM has {n})")
    targets = [name for name, _ in lm.named_modules()
               if name.startswith("layers.") and int(name.split(".")[1]) >= insert_layer
               and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")]
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), lm)


def merge_lora(model: Any) -> None:
    """Fold LoRA weights into the base linears so the saved model is a plain HF model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.get_base_layer())


# ----------------------------------------------------------------------------------------------------------------
# data preparation


@dataclass
class Prepared:
    """Everything a run trains on, built once."""

    vlm: VLM
    features: torch.Tensor  # [n_images, 2, P, D_v]
    image_index: dict[str, int]
    stage1: list[Example]
    stage2: list[Example]
    stage2_text: list[Example | None]  # text-first variant of each stage-2 example
    caption_targets: torch.Tensor  # [n_images, d] the InfoNCE targets: states.means, centred when cfg.centred
    states: "CaptionStates"  # the LM's caption states at the insertion point
    data_manifest: dict[str, Any]


def _stage_template(cfg: TrainConfig, tokenizer: Any) -> str:
    if cfg.template != "auto":
        return cfg.template
    return default_template(tokenizer)


class CaptionStates(NamedTuple):
    """The LM's hidden states of captions at the input of one layer."""

    means: torch.Tensor  # [N, d] each caption's mean over its tokens
    median_norm: float  # median token-state norm
    token_mean: torch.Tensor  # [d] mean over all caption tokens: the component every token state shares
    centred_median_norm: float  # median norm of (token state - token_mean)


@torch.no_grad()
def caption_targets(vlm: VLM, captions: list[str], layer: int, prefix: list[int] | None = None,
                    batch_size: int = 64) -> CaptionStates:
    """Each caption's mean hidden state at the input of layer ``layer``, and the statistics of its token states
    there (:class:`CaptionStates`): the norm and mean the vision rows should have where they are inserted.
    Above layer 0 the shared mean is most of a token state (SmolLM2-135M, layer 4: median norm 86, mean 78).

    ``prefix``: token ids run before each caption — the prompt text that precedes the image — so the caption is
    seen where the vision rows sit, not at position 0, whose state is an attention sink with an outsized norm.
    Only the caption's own positions are averaged.
    """
    lm = vlm.model.model.language_model
    tok = vlm.tokenizer
    prefix = list(prefix or [])
    means, tokens = [], []
    for start in range(0, len(captions), batch_size):
        rows = [prefix + tok(c, add_special_tokens=False)["input_ids"] for c in captions[start:start + batch_size]]
        ids, mask = (t.to(lm.device) for t in pad_rows(rows, tok.pad_token_id))
        if layer == 0:
            h = lm.embed_tokens(ids)
        else:
            h = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        caption = mask.clone()
        caption[:, :len(prefix)] = 0
        m = caption[..., None].to(h.dtype)
        means.append(((h * m).sum(1) / m.sum(1)).float().cpu())
        tokens.append(h[caption.bool()].float().cpu())
    states = torch.cat(tokens)
    token_mean = states.mean(0)
    return CaptionStates(torch.cat(means), float(states.norm(dim=-1).median()), token_mean,
                         float((states - token_mean).norm(dim=-1).median()))


def image_prefix(examples: list[Example], image_token_id: int) -> list[int]:
    """The token ids before the first image token of the first example that has one."""
    for e in examples:
        if image_token_id in e.input_ids:
            return e.input_ids[:e.input_ids.index(image_token_id)]
    return []


def prepare(cfg: TrainConfig, out_dir: Path) -> Prepared:
    from pg_analysis.assets import feature_cache_dir
    from pg_analysis.models import pick_runtime

    runtime = pick_runtime(cfg.device, "float32")
    if cfg.init_from:
        vlm = load_vlm(cfg.init_from, insert_layer=cfg.layer, runtime=runtime)
    else:
        vlm = build_vlm(cfg.vision, cfg.llm, insert_layer=0, vision_feature_layer=cfg.vision_feature_layer,
                        vision_pool=cfg.vision_pool, projector_type=cfg.projector, runtime=runtime, seed=cfg.seed)
        n_lm = vlm.model.config.text_config.num_hidden_layers
        if cfg.layer > n_lm:
            raise InputError(f"--layer must be in [0, {n_lm}] for this {n_lm}-layer LM, got {cfg.layer}")
        vlm.model.set_insert_layer(cfg.layer)
    if cfg.exit_layer is not None:
        vlm.model.set_exit_layer(cfg.exit_layer)  # a GroundingError (one line) unless L <= K <= N
    n_layers = vlm.model.config.text_config.num_hidden_layers
    if cfg.lora and cfg.layer >= n_layers:  # before any data or features are prepared
        raise InputError(f"--lora adapts the LM layers >= L, and L = {cfg.layer} leaves none of the {n_layers}")
    # data
    data_dir = out_dir / DATA_DIR
    if cfg.data != "llava":
        from pg_analysis.data import load_pairs

        extra = cfg.extra_pairs()
        manifest = build_tuxpaint_instructions(data_dir, seed=cfg.seed, pairs=load_pairs(cfg.data),
                                               extra_train=load_pairs(extra) if extra else None)
        root = manifest["image_root"]
        s1 = load_llava_json(data_dir / manifest["files"]["train_caption"], root)
        s2 = (load_llava_json(data_dir / manifest["files"]["train_mcq"], root)
              + load_llava_json(data_dir / manifest["files"]["train_what"], root))
    else:
        manifest = {"stage1_data": cfg.stage1_data, "stage2_data": cfg.stage2_data, "image_root": cfg.image_root}
        s1 = load_llava_json(cfg.stage1_data, cfg.image_root) if cfg.stage1_data else []
        s2 = load_llava_json(cfg.stage2_data, cfg.image_root) if cfg.stage2_data else []
    paths = sorted({r["image_path"] for r in s1 + s2 if r.get("image_path")})
    if not paths:
        raise InputError("the training data has no images")
    image_index = {p: i for i, p in enumerate(paths)}
    cache_dir = feature_cache_dir(cfg.cache_dir)
    features = image_features(vlm, paths, cache_dir, progress=cfg.progress)
    model = vlm.model
    tok = vlm.tokenizer
    common = dict(tokenizer=tok, image_token_id=model.config.image_token_index,
                  n_image_tokens=model.num_image_tokens, image_index=image_index, max_length=cfg.max_length)
    template = _stage_template(cfg, tok)
    ex1 = tokenize_records(s1, template="plain", **common)
    ex2 = tokenize_records(s2, template=template, system=cfg.system_prompt, **common)
    ex2_text = []
    for r in s2:
        tf = text_first(r)
        ex2_text.append(tokenize_records([tf], template=template, system=cfg.system_prompt, **common)[0]
                        if tf else None)
    # captions per image, for scale matching and the contrastive targets
    caption_of: dict[str, str] = {}
    for r in s1 + s2:
        if r.get("image_path") and r.get("caption"):
            caption_of.setdefault(r["image_path"], r["caption"])
        elif r.get("image_path") and r["conversations"][-1]["from"] == "gpt":
            caption_of.setdefault(r["image_path"], r["conversations"][-1]["value"])
    captions = [caption_of.get(p, "") or "image" for p in paths]
    prefix = image_prefix(ex2 or ex1, model.config.image_token_index)
    states = caption_targets(vlm, captions, cfg.layer, prefix)
    targets = states.means - states.token_mean if cfg.centred else states.means
    return Prepared(vlm, features, image_index, ex1, ex2, ex2_text, targets, states, manifest)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


_CHECKPOINT_NAME = re.compile(r"^stage(\d+)-step(\d{6})$")
_CHECKPOINT_FILES = ("state.json", "trainer_state.pt", "model/model.safetensors")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest *complete* checkpoint: a ``stage{s}-step{k}`` folder (never a ``.tmp`` one being written) holding
    every file and a readable ``state.json``. Torn ones are reported and passed over."""
    found = []
    for path in (Path(out_dir) / CHECKPOINTS_DIR).glob("stage*-step*"):
        m = _CHECKPOINT_NAME.match(path.name)
        if m is None:
            continue
        missing = [f for f in _CHECKPOINT_FILES if not (path / f).is_file()]
        try:
            json.loads((path / "state.json").read_text()) if not missing else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            missing.append("a readable state.json")
        if missing:
            log.warning("checkpoint %s is incomplete (no %s): skipped", path, ", ".join(missing))
            continue
        found.append(((int(m.group(1)), int(m.group(2))), path))
    return max(found)[1] if found else None


def _training_fields(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}


def save_checkpoint(out_dir: Path, vlm: VLM, optimizer: Any, scheduler: Any, cfg: TrainConfig, stage: int,
                    next_step: int, extra: dict[str, Any]) -> Path:
    """``checkpoints/stage{s}-step{k}``: HF weights (``model/``), ``trainer_state.pt`` (optimizer, scheduler, RNG)
    and ``state.json`` (stage, next step, config). Written under a temp name, then renamed; older ones removed."""
    final = out_dir / CHECKPOINTS_DIR / f"stage{stage}-step{next_step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(vlm, tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "trainer_state.pt")
        atomic_write_json(tmp / "state.json", {"stage": stage, "next_step": next_step,
                                               "config": _training_fields(cfg), **extra})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:  # a kill or a full disk mid-write: no half checkpoint left under any name
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in (out_dir / CHECKPOINTS_DIR).glob("stage*-step*"):
        if old != final and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(vlm: VLM, folder: Path) -> None:
    """An HF folder (config, tokenizer, image processor, ``model.safetensors``) holding the model's own
    ``state_dict`` names — LoRA adapters included, no key conversion — so :func:`load_weights` restores it exactly."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vlm.model.config.save_pretrained(folder)
    vlm.tokenizer.save_pretrained(folder)
    vlm.image_processor.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in vlm.model.state_dict().items()}
    if vlm.model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_weights(model: Any, folder: Path) -> None:
    """Load weights written by :func:`save_weights` into ``model`` (built with the same config)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise InputError(f"checkpoint weights in {folder} do not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()


def read_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"checkpoint {path} is unreadable ({e})") from None
    saved, now = state.get("config", {}), _training_fields(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise InputError(f"checkpoint {path} is incompatible with this run: options differ ({', '.join(diff)})")
    return state


# ----------------------------------------------------------------------------------------------------------------
# the loop


class _Log:
    """Appends JSON lines to ``log.jsonl``; on resume, drops lines past the checkpoint's position."""

    def __init__(self, path: Path, keep_until: tuple[int, int] | None):
        self.path = path
        lines = []
        if keep_until is not None and path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    rec = json.loads(line)
                    position = (rec["stage"], rec["step"])
                except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by the kill: past the checkpoint
                    log.warning("%s line %d is torn; dropped", path, number)
                    continue
                if position < keep_until:
                    lines.append(line)
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def precision_context(precision: str, device: torch.device):
    """bf16 autocast on ``device`` for ``"bf16"``, nothing for ``"fp32"`` (training and evaluation alike)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _stage_steps(cfg: TrainConfig, prepared: Prepared) -> dict[int, int]:
    return {0: cfg.stage0_steps, 1: cfg.stage1_steps if prepared.stage1 else 0,
            2: cfg.stage2_steps if prepared.stage2 else 0}


def stage_batches(cfg: TrainConfig, prepared: Prepared, stage: int, step: int, n_proc: int,
                   rank: int) -> Iterator[tuple[list[Example], list[bool], list[Example | None] | None]]:
    """The micro-batches of one optimizer step for this process: ``(examples, flips, twins)``; ``twins`` holds
    each image example's text twin (caption in place of the image; None without a caption), or is None on text
    steps and in stages 0–1."""
    pool = prepared.stage1 if stage == 1 else prepared.stage2
    if cfg.batch_size % n_proc:
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by {n_proc} processes")
    rng = step_rng(cfg.seed, stage, step)
    idx = grouped_batch_indices([len(e.input_ids) for e in pool], cfg.batch_size * cfg.grad_accum, step, cfg.seed,
                                stage)
    flips = (rng.random(len(idx)) < 0.5).tolist()
    use_text = stage == 2 and (step < cfg.text_first_steps or rng.random() < cfg.text_first_frac)
    for m in range(cfg.grad_accum):
        sl = slice(m * cfg.batch_size, (m + 1) * cfg.batch_size)
        mine = list(range(len(idx)))[sl][rank::n_proc]
        exs = []
        for i in mine:
            ex = pool[idx[i]]
            if use_text and prepared.stage2_text[idx[i]] is not None:
                ex = prepared.stage2_text[idx[i]]
            exs.append(ex)
        twins = [prepared.stage2_text[idx[i]] for i in mine] if stage == 2 and not use_text else None
        yield exs, [flips[i] for i in mine], twins


def train(cfg: TrainConfig, layer_evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary (also written to ``summary.json``).

    ``layer_evidence``: the pg-recommend result behind ``--layer auto``, recorded in ``run.json``."""
    out_dir = Path(cfg.out_dir)
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise InputError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    if not cfg.resume and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"output folder {out_dir} is not empty; pass --resume to continue it or choose another")
    state = read_checkpoint(ckpt, cfg) if ckpt is not None else None
    created = not out_dir.exists()
    try:
        return _train(cfg, layer_evidence, out_dir, ckpt, state)
    except BaseException:
        # A fresh run that fails or is interrupted before its first checkpoint has nothing to resume from: leave
        # nothing behind, so the same command can simply be run again.
        if created and latest_checkpoint(out_dir) is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, layer_evidence: dict[str, Any] | None, out_dir: Path, ckpt: Path | None,
           state: dict[str, Any] | None) -> dict[str, Any]:
    from accelerate import Accelerator

    from pg_analysis.plots import loss_curve_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    prepared = prepare(cfg, out_dir)
    vlm = prepared.vlm
    model = vlm.model.to(accelerator.device)
    device = accelerator.device
    attention = use_attention(model, cfg.attention)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    steps = _stage_steps(cfg, prepared)
    scale = {"target_median_norm": prepared.states.median_norm,
             "target_centred_median_norm": prepared.states.centred_median_norm,
             "target_mean_norm": float(prepared.states.token_mean.norm())}
    if ckpt is not None:
        if cfg.lora and state["stage"] == 2:
            add_lora(model, cfg.layer, cfg.lora_r, cfg.lora_alpha)
        load_weights(model, ckpt / "model")
        start_stage, start_step = state["stage"], state["next_step"]
        scale = state.get("scale", scale)
    else:
        start_stage, start_step = 0, 0
        if cfg.scale_match and not cfg.init_from:
            scale.update(match_scale(model, prepared.features[:, 0], prepared.states, cfg.match_mean))
    config_record = {"data": prepared.data_manifest, "num_image_tokens": model.num_image_tokens,
                     "template": _stage_template(cfg, vlm.tokenizer), "attention": attention}
    if layer_evidence is not None:
        config_record["layer_auto"] = layer_evidence
    write_run_record(out_dir, "pg-train", cfg.to_dict(), **config_record)
    logger = _Log(out_dir / TRAIN_LOG, (start_stage, start_step) if ckpt is not None else None)
    done_steps = 0
    stage_time: dict[int, float] = {}
    t_run = time.perf_counter()
    before = float(state.get("run_seconds", 0.0)) if state is not None else 0.0  # earlier processes of this run

    def elapsed() -> float:
        return before + time.perf_counter() - t_run
    stopped = False
    for stage in STAGES:
        if stage < start_stage or steps[stage] == 0:
            continue
        if stage == 2 and cfg.lora and not any("lora_" in n for n, _ in model.named_parameters()):
            add_lora(model, cfg.layer, cfg.lora_r, cfg.lora_alpha)
        groups = set_trainable(model, stage, cfg.layer, cfg.lora)
        lrs = {0: {"projector": cfg.stage0_lr}, 1: {"projector": cfg.stage1_lr},
               2: {"projector": cfg.stage2_projector_lr, "lm": cfg.stage2_lr}}[stage]
        param_groups = [{"params": groups[g], "lr": lr, "name": g} for g, lr in lrs.items() if groups[g]]
        optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_frac * steps[stage])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s, total=steps[stage], w=warmup: lr_factor(s, total, w))
        first = start_step if stage == start_stage else 0
        if ckpt is not None and stage == start_stage:
            ts = torch.load(ckpt / "trainer_state.pt", weights_only=False)
            optimizer.load_state_dict(ts["optimizer"])
            scheduler.load_state_dict(ts["scheduler"])
            _set_rng_state(ts["rng"])
        trained = model if stage > 0 else model.model.multi_modal_projector
        trained, optimizer = accelerator.prepare(trained, optimizer)
        model.train()
        bar = tqdm(range(first, steps[stage]), desc=f"stage {stage}", disable=not cfg.progress, initial=first,
                   total=steps[stage])
        t_stage = time.perf_counter()
        layers = model.model.language_model.layers
        # inside the window [L, K) only: there every row is present (layers >= K run on the text rows alone)
        picks = distill_layer_indices(cfg.layer, model.exit_layer, cfg.distill_layers) if stage == 2 else []
        picked = [layers[i] for i in picks]
        for step in bar:
            t0 = time.perf_counter()
            n_samples = n_tokens = 0
            if stage == 0:
                loss = _stage0_step(cfg, prepared, model, step, device, accelerator)
                n_samples = len(prepared.features)
                aux = None
            else:
                loss = aux = distill = None
                for exs, flips, twins in stage_batches(cfg, prepared, stage, step, accelerator.num_processes,
                                                        accelerator.process_index):
                    batch = {k: v.to(device) for k, v in
                             collate(exs, vlm.tokenizer.pad_token_id, prepared.features, flips).items()}
                    pairs = [(k, tw) for k, (e, tw) in enumerate(zip(exs, twins or [])) if e.image >= 0 and tw]
                    distill_on = bool(cfg.distill_weight and pairs and picks)
                    with precision_context(cfg.precision, device), capture_outputs(picked, active=distill_on) as cap:
                        out = trained(**batch, return_logits=False)
                    micro = out.loss / cfg.grad_accum
                    if distill_on:
                        d = _distill_loss(cfg, trained, picked, cap, exs, pairs, vlm.tokenizer, device)
                        micro = micro + cfg.distill_weight * d / cfg.grad_accum
                        distill = float(d.detach()) + (distill or 0.0)
                    if cfg.aux_weight and "vision_features" in batch:
                        a = aux_loss(cfg, prepared, model, exs, batch["vision_features"], device)
                        micro = micro + cfg.aux_weight * a / cfg.grad_accum
                        aux = float(a.detach()) if aux is None else aux + float(a.detach())
                    accelerator.backward(micro)
                    loss = float(out.loss.detach()) / cfg.grad_accum + (loss or 0.0)
                    n_samples += len(exs)
                    n_tokens += int(batch["attention_mask"].sum())
                norms = grad_norms(param_groups)  # before clipping: which group drives the clip shows here
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            lr_now = {g["name"]: g["lr"] for g in optimizer.param_groups}
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rec = {"stage": stage, "step": step, "loss": loss, "lr": lr_now, "samples_per_s": n_samples / dt,
                   "tokens_per_s": n_tokens / dt if n_tokens else None, "step_s": dt}
            if aux is not None:
                rec["aux_infonce"] = aux
            if stage > 0 and distill is not None:
                rec["distill"] = distill
            if stage > 0:
                rec["grad_norm"] = norms
            if accelerator.is_main_process:
                logger.write(rec)
            bar.set_postfix(loss=f"{loss:.3f}")
            done_steps += 1
            last = step + 1 == steps[stage]
            if accelerator.is_main_process and ((step + 1) % cfg.checkpoint_every == 0 or last):
                save_checkpoint(out_dir, vlm, optimizer, scheduler, cfg, stage if not last else stage + 1,
                                step + 1 if not last else 0, {"scale": scale, "run_seconds": elapsed()})
            if cfg.stop_after is not None and done_steps >= cfg.stop_after and not last:
                if accelerator.is_main_process and (step + 1) % cfg.checkpoint_every:
                    save_checkpoint(out_dir, vlm, optimizer, scheduler, cfg, stage, step + 1,
                                    {"scale": scale, "run_seconds": elapsed()})
                stopped = True
                break
        stage_time[stage] = time.perf_counter() - t_stage
        model = accelerator.unwrap_model(trained) if stage > 0 else model
        if stopped:
            break
    model.eval()
    summary: dict[str, Any] = {"stopped_early": stopped, "stage_seconds": stage_time,
                               "run_seconds": elapsed(), "run_seconds_this_process": time.perf_counter() - t_run,
                               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "scale": scale, "num_image_tokens": model.num_image_tokens,
                               "insert_layer": model.insert_layer, "steps": steps}
    if stopped or not accelerator.is_main_process:
        return summary
    if cfg.lora:
        merge_lora(model)
    tmp = out_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vlm.save(tmp)
        shutil.rmtree(out_dir / MODEL_DIR, ignore_errors=True)
        tmp.rename(out_dir / MODEL_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    records = [json.loads(line) for line in (out_dir / TRAIN_LOG).read_text().splitlines()]
    summary["throughput"] = _throughput(records)
    loss_curve_figure({f"L={cfg.layer}": records}, out_dir / "loss.png")
    atomic_write_json(out_dir / TRAIN_SUMMARY, summary)
    return summary


def _throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for stage in STAGES:
        rs = [r for r in records if r["stage"] == stage]
        if rs:
            t = sum(r["step_s"] for r in rs)
            out[f"stage{stage}"] = {"steps": len(rs), "seconds": t, "s_per_step": t / len(rs),
                                    "samples_per_s": float(np.median([r["samples_per_s"] for r in rs])),
                                    "tokens_per_s": (float(np.median([r["tokens_per_s"] for r in rs]))
                                                     if rs[0].get("tokens_per_s") else None)}
    return out


@torch.no_grad()
def match_scale(model: Any, features: torch.Tensor, states: CaptionStates, match_mean: bool) -> dict[str, float]:
    """Set the projector's ``gain`` (and, with ``match_mean``, its ``offset``) from ``features [N, P, D_v]``:

    - ``match_mean=False``: median output-row norm = the LM's median token norm at L; offset 0;
    - ``match_mean=True``: the rows' mean = the LM's mean token state at L (``offset``), and the median norm of the
      rows minus their mean = that of the token states minus theirs (``gain``). Above layer 0 most of a token
      state is a component all tokens share; rows without it are unlike any token the layers above have seen.
    """
    proj = model.model.multi_modal_projector
    proj.gain.fill_(1.0)
    proj.offset.zero_()
    out = model.project(features.to(proj.gain.device)).float().flatten(0, 1)
    if not match_mean:
        before = float(out.norm(dim=-1).median())
        proj.gain.fill_(states.median_norm / before)
        return {"projector_median_norm_before": before, "gain": float(proj.gain)}
    mean = out.mean(0)
    before = float((out - mean).norm(dim=-1).median())
    gain = states.centred_median_norm / before
    proj.gain.fill_(gain)
    proj.offset.copy_(states.token_mean.to(proj.offset) - gain * mean.to(proj.offset))
    return {"projector_centred_median_norm_before": before, "gain": gain, "offset_norm": float(proj.offset.norm())}


def _stage0_step(cfg: TrainConfig, prepared: Prepared, model: Any, step: int, device: torch.device,
                 accelerator: Any) -> float:
    """One InfoNCE step over the whole training set (each image or its mirror, seeded per step)."""
    n = len(prepared.features)
    flips = torch.from_numpy(step_rng(cfg.seed, 0, step).random(n) < 0.5).long()
    feats = prepared.features[torch.arange(n), flips].to(device)
    loss = info_nce(_pooled(cfg, prepared, model, feats), prepared.caption_targets.to(device), cfg.tau)
    accelerator.backward(loss)
    return float(loss.detach())


def _distill_loss(cfg: TrainConfig, trained: Any, picked: list[Any], student: dict[int, torch.Tensor],
                  exs: list[Example], pairs: list[tuple[int, Example]], tokenizer: Any,
                  device: torch.device) -> torch.Tensor:
    """Text-twin distillation: the image examples' states on the tokens after the image (question, options,
    answer) pulled towards those of the same model reading the caption as text in place of the image (no
    gradient through that side), averaged over the decoder layers ``picked`` (:func:`state_match_loss`).

    The LM answers from text almost perfectly; this gives each image example a dense target — every row after
    the image at several depths — where the answer letter alone gives about two bits."""
    twins = [tw for _, tw in pairs]
    tbatch = {k: v.to(device) for k, v in collate(twins, tokenizer.pad_token_id, None).items()}
    with torch.no_grad(), precision_context(cfg.precision, device), capture_outputs(picked) as cap:
        trained(**tbatch, return_logits=False)
    rows = torch.tensor([k for k, _ in pairs], device=device)
    suffix = [common_suffix_length(exs[k].input_ids, tw.input_ids) for k, tw in pairs]
    s_len = [len(exs[k].input_ids) for k, _ in pairs]
    t_len = [len(tw.input_ids) for tw in twins]
    losses = [state_match_loss(suffix_rows(student[j][rows], s_len, suffix),
                               suffix_rows(cap[j], t_len, suffix)) for j in range(len(picked))]
    return torch.stack(losses).mean()


def aux_loss(cfg: TrainConfig, prepared: Prepared, model: Any, exs: list[Example], vision_features: torch.Tensor,
             device: torch.device) -> torch.Tensor:
    """InfoNCE of the batch's projected images against their captions' targets (the warm-up kept as a term).

    Each image counts once: a batch can hold two questions about one picture (~0.3 of 16 rows on the Tux Paint
    data), and a repeated image would be its own negative."""
    imgs = [e.image for e in exs if e.image >= 0]
    first = {img: row for row, img in reversed(list(enumerate(imgs)))}  # image -> its first row in the batch
    if len(first) < 2:
        return torch.zeros((), device=device)
    rows = sorted(first.values())
    return info_nce(_pooled(cfg, prepared, model, vision_features[rows]),
                    prepared.caption_targets[[imgs[r] for r in rows]].to(device), cfg.tau)


def _pooled(cfg: TrainConfig, prepared: Prepared, model: Any, features: torch.Tensor) -> torch.Tensor:
    """Each image's mean projected row, centred like the InfoNCE targets (by the LM's mean token state at L when
    ``cfg.centred``: the shared component would otherwise dominate every cosine)."""
    pooled = model.project(features).mean(1)
    return pooled - prepared.states.token_mean.to(pooled) if cfg.centred else pooled
