"""``pg-train``'s options and recipes.

A **recipe** is a JSON file of option values (``pg_train/recipes/<name>.json``, or any file a user writes): the
run's options are the :class:`TrainConfig` defaults, then the recipe's values, then the flags given. The resolved
options and the recipe file are saved with the run (``run.json``, ``recipe.json``).

- ``tuxpaint`` — the offline recipe and the defaults of :class:`TrainConfig` (the two are tested to agree):
  DINOv2-S × SmolLM2-135M on the Tux Paint instruction data, with the warm-up, scale and mean matching, a format
  stage (text only, until the answer format is learnt) before stage 2, text steps in stage 2 and text-twin
  distillation (why each: ``docs/recipe.md``);
- ``llava15`` — LLaVA-1.5's published hyperparameters (stage 1: projector only, lr 1e-3, global batch 256, one
  epoch, ``plain`` template; stage 2: projector + LM layers ≥ L, lr 2e-5, global batch 128, one epoch,
  ``vicuna_v1``, cosine with 3 % warm-up, no weight decay, bf16, gradient checkpointing, max length 2048), on
  LLaVA JSON/JSONL given by ``--stage1-data``/``--stage2-data``;
- ``molca`` — the molecule modality, MolCA-style: rxnmapper's SMILES ALBERT (frozen) → 8 slots → projector →
  SmolLM2-135M entering at L, on the offline molecule pairs (class questions, names; split by molecule), the offline
  recipe's machinery with a format stage (text only, until the answer format is learnt) before 160 stage-2 steps of
  8 on their own schedule; the LM layers ≥ L train in full (``--lora``, MolCA's choice, did not learn the answer
  format in the budget).

``batch_size`` is the **global** batch of one optimizer step: split over the processes and ``grad_accum``
micro-batches (it must divide evenly).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pg_analysis.errors import InputError
from pg_analysis.options import option

from .conversations import TEMPLATES
from .vlm import ATTENTION, PRECISIONS, TRAINABLE_MODALITIES

RECIPES_DIR = Path(__file__).with_name("recipes")
#: fields that may differ between a run and the checkpoint it resumes from
RESUME_FREE = ("out_dir", "resume", "checkpoint_every", "stop_after", "progress", "cache_dir", "num_workers",
               "report_to")
REPORT_TO = ("tensorboard", "wandb", "none")
#: the format stage's number: it runs after stage 1 and before stage 2 (numbered after them so that stage 2 keeps
#: LLaVA's meaning and every earlier run's numbers)
FORMAT_STAGE = 3
#: the stages in the order they run: 0 the Platonic warm-up, 1 the projector on captions, 3 the format stage (text
#: only), 2 the projector and the LM layers >= L
STAGES = (0, 1, FORMAT_STAGE, 2)


def stage_position(stage: int, step: int) -> tuple[int, int]:
    """Where ``(stage, step)`` falls in a run, as a sortable pair (checkpoints, logs)."""
    return STAGES.index(stage), step
#: transformers' schedules that need only the warm-up and total steps
LR_SCHEDULERS = ("cosine", "linear", "polynomial", "constant_with_warmup")


@dataclass
class TrainConfig:
    """All options of one ``pg-train`` run, each with its flag's help (``pg-train --help``). Validates itself in
    ``__post_init__``; no I/O. The defaults are the ``tuxpaint`` recipe; why each is what it is: ``docs/recipe.md``."""

    out_dir: str = option("runs/train", "output folder (default: %(default)s)")
    recipe: str = option("tuxpaint", "recipe: tuxpaint (offline, the defaults), llava15 (LLaVA-1.5's "
                                     "hyperparameters) or a recipe JSON file; flags override it (default: "
                                     "%(default)s)")
    modality: str = option("image", "what the frozen encoder reads: image, or molecule (--vision a SMILES encoder "
                                    "such as smiles-albert; --data molecules, a molecule pairs .jsonl, or llava "
                                    "records whose 'image' names .smi files; --recipe molca sets it all) (default: "
                                    "%(default)s)")
    vision: str = option("dinov2-small-imgfocus", "frozen vision encoder: alias, folder or hub id; with --modality "
                                                  "molecule a SMILES encoder (default: %(default)s)")
    llm: str = option("smollm2-135m", "language model: alias, folder or hub id (default: %(default)s)")
    init_from: str | None = option(None, "start from a pg-train model folder or an HF LLaVA checkpoint (e.g. llava) "
                                         "instead of --vision/--llm")
    layer: int = option(0, "insert layer L: vision rows enter the LM at layer L (0 = ordinary LLaVA), or auto: the "
                           "layer pg-recommend names (read from --recommendation, else computed there from "
                           "--baseline, --align-result and --attnmap) (default: %(default)s)")
    exit_layer: int | None = option(None, "exit layer K (L <= K <= N): from LM layer K on the vision rows are gone "
                                          "again (default: N, they stay to the end)")
    bypass_encoder: bool = option(True, "with an encoder-decoder LM (T5, FlanT5; BLIP-2 via --init-from): the vision "
                                        "rows bypass its encoder and join the decoder's memory beside the encoded "
                                        "prompt, as the paper's Sec. 5.1 (default: %(default)s)")
    vision_feature_layer: int = option(-2, "encoder hidden state used, as LLaVA (default: %(default)s)")
    vision_pool: int = option(4, "average-pool the patch grid with this kernel: 4 turns 16x16 patches into 16 tokens"
                                 " (default: %(default)s)")
    slots: int = option(8, "--modality molecule: rows per molecule, its atom tokens' encoder states mean-pooled in "
                           "order into this many slots (default: %(default)s)")
    projector: str = option("mlp", "projector: mlp (LLaVA's 2-layer GELU) or linear (default: %(default)s)")
    data: str = option("tuxpaint", "image-caption pairs the instruction data is built from (tuxpaint, a "
                                   ".jsonl/.csv), or llava to train on --stage1-data/--stage2-data (default: "
                                   "%(default)s)")
    extra_train: str | None = option("auto", "more image-caption pairs for the training split only (a pairs source "
                                             "or .jsonl/.csv); pairs sharing a val/test caption are left out; auto: "
                                             "tuxpaint-cartoon (108 drawings) when --data is tuxpaint, else none; "
                                             "none: off (default: %(default)s)")
    stage2_tasks: str = option("mcq,what", "built data only: the tasks stage 2 trains on, comma-separated (mcq: the "
                                           "multiple-choice questions; what: \"What is this?\" -> caption or name) "
                                           "(default: %(default)s)")
    stage1_data: str | None = option(None, "LLaVA JSON or JSONL for stage 1 (captioning); several files joined "
                                           "with commas")
    stage2_data: str | None = option(None, "LLaVA JSON or JSONL for stage 2 (instructions; records without "
                                           "'image' are text-only); several files joined with commas")
    image_root: str | None = option(None, "folder the records' image paths are relative to (default: each data "
                                          "file's folder)")
    on_bad_record: str = option("fail", "a record whose image is missing or does not decode, or whose <image> "
                                        "placeholders do not match its images: fail (stop with one line) or skip "
                                        "(counted in the log and summary) (default: %(default)s)")
    feature_store: str | None = option("auto", "where the frozen encoder's features come from: auto (a store built "
                                               "once in the cache and reused), a folder (built there if absent), "
                                               "or none (the encoder runs inside the loop on decoded images) "
                                               "(default: %(default)s)")
    length_group: int | None = option(8, "batches whose records are sorted by length together (a mega-batch); "
                                         "none: transformers' default, min(records / (4 x batch), 50) (default: "
                                         "%(default)s)")
    num_workers: int = option(0, "DataLoader worker processes that read records, tokenize and decode images "
                                 "(default: %(default)s)")
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
    stage1_steps: int | None = option(None, "stage-1 steps (projector on captions, LLaVA's stage 1); default: from "
                                            "--stage1-epochs, else 100 with --stage1-data and 0 without (after the "
                                            "warm-up it undoes the alignment; docs/recipe.md)")
    stage1_epochs: float | None = option(None, "stage-1 length in epochs over its data, when --stage1-steps is "
                                               "not given")
    stage1_batch_size: int | None = option(None, "stage-1 global batch (default: --batch-size)")
    stage1_lr: float = option(1e-3, "stage-1 learning rate (default: %(default)s)")
    stage2_steps: int | None = option(220, "stage-2 steps (projector + LM layers >= L); none: from --stage2-epochs "
                                           "(default: %(default)s)")
    stage2_epochs: float | None = option(None, "stage-2 length in epochs over its data, when --stage2-steps is "
                                               "none")
    stage2_lr: float = option(2e-4, "stage-2 learning rate of the LM (or LoRA) parameters (default: %(default)s)")
    stage2_projector_lr: float = option(1e-3, "stage-2 learning rate of the projector (default: %(default)s)")
    max_steps: int | None = option(None, "cap every stage at this many optimizer steps (a short run of a long "
                                         "recipe)")
    text_first_steps: int = option(0, "first stage-2 steps that give the caption as text instead of the image "
                                       "(default: %(default)s)")
    text_first_frac: float = option(0.3, "fraction of later stage-2 steps that do so (default: %(default)s)")
    text_first_until: float | None = option(None, "after the first --text-first-steps, keep every step text-only "
                                                  "until the mean loss of the last 5 text steps falls below this "
                                                  "(the answer format is learnt in one sudden drop whose step "
                                                  "varies with the seed: docs/recipe.md); none: the fixed count "
                                                  "only (default: %(default)s)")
    text_first_max_steps: int = option(120, "the stage-2 step after which --text-first-until stops waiting "
                                            "(default: %(default)s)")
    format_steps: int = option(200, "the format stage, between stage 1 and stage 2: at most this many text-only "
                                    "steps (each record's text twin: the caption as text in place of the image) "
                                    "training what stage 2 trains, on a constant lr after the warm-up, until the "
                                    "mean loss of the last 5 falls below --format-until; stage 2 then starts on its "
                                    "own schedule; 0: none (default: %(default)s)")
    format_until: float = option(0.1, "the format stage ends once the mean loss of its last 5 steps is below this "
                                      "(default: %(default)s)")
    format_lr: float | None = option(None, "the format stage's learning rate (default: --stage2-lr)")
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
    batch_size: int = option(16, "global batch: examples per optimizer step over all processes and micro-batches "
                                 "(default: %(default)s)")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation) (default: %(default)s)")
    warmup_frac: float = option(0.03, "fraction of each stage's steps with linear warm-up (from lr 0, as "
                                      "transformers) before --lr-scheduler's decay (default: %(default)s)")
    lr_scheduler: str = option("cosine", "each stage's learning-rate schedule after the warm-up (transformers' "
                                         "get_scheduler): cosine, linear, polynomial or constant_with_warmup "
                                         "(default: %(default)s)")
    weight_decay: float = option(0.0, "AdamW weight decay (default: %(default)s)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables (default: %(default)s)")
    precision: str = option("auto", "bf16 (autocast), fp32, or auto: bf16 where the device runs it fast (CUDA with "
                                    "bf16; a CPU whose bf16 matmul is timed at most 2x fp32's), else fp32 "
                                    "(default: %(default)s)")
    attention: str = option("auto", "LM attention kernel: auto (eager on CPU, measured faster there; sdpa "
                                    "elsewhere), eager or sdpa (default: %(default)s)")
    gradient_checkpointing: bool = option(False, "recompute decoder layers in the backward pass to save memory "
                                                 "(default: %(default)s)")
    checkpoint_every: int = option(100, "save a checkpoint every N steps (and at each stage end) (default: "
                                        "%(default)s)")
    report_to: str = option("tensorboard", "tracker: tensorboard (<out>/logs), wandb, or none (default: "
                                           "%(default)s)")
    seed: int = option(0, "seed of data order, augmentation and initialisation (default: %(default)s)")
    device: str | None = option(None, "cpu or cuda (default: cuda if available)")
    cache_dir: str | None = option(None, "feature and record-index cache folder (default: <asset cache>/features)")
    resume: bool = option(False, "continue from the latest checkpoint in --out-dir (default: %(default)s)")
    stop_after: int | None = option(None, "stop after N optimizer steps in this process, leaving a checkpoint (to "
                                          "test resuming)")
    progress: bool = option(True, "progress bars (the CLI's --quiet turns them off)")

    def __post_init__(self) -> None:
        if self.system_prompt == "default":
            self.system_prompt = None
        for name in ("stage0_steps", "stage1_steps", "stage2_steps", "text_first_steps", "format_steps",
                     "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_length", "checkpoint_every", "vision_pool", "lora_r", "slots",
                     "stage1_batch_size", "max_steps", "length_group"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_epochs", "stage2_epochs"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stage2_steps is None and self.stage2_epochs is None:
            raise InputError("stage 2 needs --stage2-steps or --stage2-epochs")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InputError(f"layer must be an integer >= 0, got {self.layer!r}")
        if self.template not in ("auto", *TEMPLATES):
            raise InputError(f"template must be auto or one of {TEMPLATES}, got {self.template!r}")
        if self.data == "llava" and self.extra_pairs() is not None:
            raise InputError("--extra-train adds pairs to the built instruction data; it does not apply to --data llava")
        if self.modality not in TRAINABLE_MODALITIES:
            raise InputError(f"modality must be one of {', '.join(TRAINABLE_MODALITIES)} (audio is aligned by "
                             f"pg-align, not yet trained), got {self.modality!r}")
        tasks = [t for t in self.stage2_tasks.split(",") if t]
        if not tasks or set(tasks) - {"mcq", "what"}:
            raise InputError(f"stage2_tasks must name mcq and/or what, got {self.stage2_tasks!r}")
        if self.attention not in ATTENTION:
            raise InputError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.on_bad_record not in ("fail", "skip"):
            raise InputError(f"on_bad_record must be fail or skip, got {self.on_bad_record!r}")
        if self.report_to not in REPORT_TO:
            raise InputError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise InputError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.text_first_until is not None and not self.text_first_until > 0:
            raise InputError(f"text_first_until must be > 0 (or none), got {self.text_first_until}")
        if self.text_first_until is not None and self.text_first_max_steps < self.text_first_steps:
            raise InputError(f"text_first_max_steps ({self.text_first_max_steps}) is below text_first_steps "
                             f"({self.text_first_steps}): --text-first-until would never extend the text-first steps")
        if not self.format_until > 0 or (self.format_lr is not None and not self.format_lr > 0):
            raise InputError(f"format_until and format_lr must be > 0, got {self.format_until} and {self.format_lr}")
        if not 0 <= self.text_first_frac <= 1 or not 0 <= self.warmup_frac < 1:
            raise InputError("text_first_frac must be in [0, 1] and warmup_frac in [0, 1)")
        if self.tau <= 0 or self.aux_weight < 0:
            raise InputError("tau must be > 0 and aux_weight >= 0")
        if self.distill_weight < 0 or self.distill_layers < 1:
            raise InputError("distill_weight must be >= 0 and distill_layers >= 1")
        if self.data == "llava" and not (self.stage1_data or self.stage2_data):
            raise InputError("--data llava needs --stage1-data and/or --stage2-data (LLaVA JSON or JSONL)")
        if self.projector not in ("mlp", "linear"):
            raise InputError(f"projector must be mlp or linear, got {self.projector!r}")
        if self.uses_warmup_features and self.store is None:
            raise InputError("the warm-up (--stage0-steps), --scale-match and --aux-weight read every training "
                             "image's features: they need a --feature-store (auto or a folder), not none")
        for stage in (1, 2):
            batch = self.global_batch(stage)
            if batch % self.grad_accum:
                raise InputError(f"stage-{stage} global batch {batch} is not divisible by --grad-accum "
                                 f"{self.grad_accum}")

    # ------------------------------------------------------------------------------------------------------------

    @property
    def centred(self) -> bool:
        """Rows carry the LM's mean token state at L (``scale_match`` and ``match_mean``), so the InfoNCE terms
        compare both sides with that mean taken off."""
        return self.scale_match and self.match_mean

    @property
    def uses_warmup_features(self) -> bool:
        """Whether the run needs every training image's features before step 1 (the offline recipe's warm-up,
        scale matching and InfoNCE term); only then are the captions' LM states computed too."""
        return bool(self.stage0_steps or self.aux_weight or (self.scale_match and not self.init_from))

    @property
    def uses_twins(self) -> bool:
        """Whether stage 2 needs each record's text twin (caption as text in place of the image)."""
        return bool(self.text_first_steps or self.text_first_frac or self.text_first_until or self.distill_weight
                    or self.format_steps)

    @property
    def store(self) -> str | None:
        """The feature store: ``"auto"``, a folder, or None (the encoder runs in the loop)."""
        return None if self.feature_store in (None, "", "none") else self.feature_store

    def decoder_only_options(self) -> list[str]:
        """The options set here that only a decoder-only LM takes (an encoder–decoder LM refuses them)."""
        given = {"--layer": self.layer, "--exit-layer": self.exit_layer is not None,
                 "--stage0-steps (the warm-up)": self.stage0_steps, "--aux-weight": self.aux_weight,
                 "--distill-weight": self.distill_weight,
                 "--text-first-steps/--text-first-frac/--text-first-until": (
                     self.text_first_steps or self.text_first_frac or self.text_first_until),
                 "--format-steps": self.format_steps,
                 "--scale-match": self.scale_match and not self.init_from}
        return [flag for flag, on in given.items() if on]

    def extra_pairs(self) -> str | None:
        """The pairs source ``extra_train`` resolves to (None: no extra training pairs)."""
        if self.extra_train in (None, "", "none"):
            return None
        if self.extra_train == "auto":
            return "tuxpaint-cartoon" if self.data == "tuxpaint" and self.modality == "image" else None
        return self.extra_train

    def global_batch(self, stage: int) -> int:
        return (self.stage1_batch_size or self.batch_size) if stage == 1 else self.batch_size

    def micro_batch(self, stage: int) -> int:
        """Examples of one micro-batch over all processes."""
        return self.global_batch(stage) // self.grad_accum

    def stage_steps(self, stage: int, n_records: int) -> int:
        """Optimizer steps of ``stage`` (0, 1, 2 or the format stage, which reads stage 2's records) over
        ``n_records`` records: the explicit count, else the epochs over the global batch, else (stage 1) 100 with
        stage-1 data; capped by ``max_steps``. Stage 0 (the warm-up, over the whole training set at once) takes
        ``stage0_steps`` whatever ``n_records``; the format stage's count is its most: it ends when its loss is low
        enough."""
        if stage == 0:
            steps = self.stage0_steps
        elif n_records == 0:
            return 0
        elif stage == FORMAT_STAGE:
            steps = self.format_steps
        else:
            steps = self.stage1_steps if stage == 1 else self.stage2_steps
            epochs = self.stage1_epochs if stage == 1 else self.stage2_epochs
            if steps is None:
                steps = (math.ceil(epochs * n_records / self.global_batch(stage)) if epochs is not None
                         else 100 if self.stage1_data else 0)
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def training_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The options that define what is trained (a resumed run must match them)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}


def recipe_path(recipe: str) -> Path:
    """A recipe's file: a built-in name (``pg_train/recipes/<name>.json``) or a JSON file."""
    builtin = RECIPES_DIR / f"{recipe}.json"
    if builtin.is_file():
        return builtin
    path = Path(recipe)
    if path.suffix == ".json" and path.is_file():
        return path
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
    raise InputError(f"recipe {recipe!r} is neither a built-in recipe ({', '.join(names)}) nor a JSON file")


def load_recipe(recipe: str) -> dict[str, Any]:
    """The option values a recipe sets (``{"options": {...}}`` in its file), checked against :class:`TrainConfig`."""
    path = recipe_path(recipe)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))["options"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"recipe {path}: expected a JSON object with an 'options' object ({e})") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"recipe {path}: unknown options {', '.join(unknown)}")
    if "recipe" in values or "out_dir" in values:
        raise InputError(f"recipe {path}: a recipe sets training options, not recipe or out_dir")
    return values


def resolve_config(given: dict[str, Any]) -> TrainConfig:
    """The run's options: the defaults, then the recipe's values (``given["recipe"]``, default ``tuxpaint``), then
    ``given`` (the flags set on the command line, or a caller's keyword arguments)."""
    recipe = given.get("recipe") or "tuxpaint"
    return TrainConfig(**{**load_recipe(recipe), **given, "recipe": recipe})
