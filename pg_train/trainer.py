"""``pg-train``'s loop, on accelerate: stage 0 (Platonic warm-up), stage 1 (projector), the format stage (text
only, optional; numbered 3), stage 2 (projector + LM layers ≥ L), on one process or many (DDP, FSDP, DeepSpeed —
whatever ``accelerate launch`` or ``torchrun`` set up).

Where each concept lives: options and recipes ``config.py``; records, batches and images ``pipeline.py`` (and the
feature store ``feature_store.py``); the loss terms and their total ``losses.py``; what a stage trains and LoRA
``params.py``; the warm-up statistics ``warmup.py``; checkpoints ``checkpoints.py``. This file only runs them.

- ``batch_size`` is the global batch: a step's ``grad_accum`` micro-batches are each split over the processes
  (accelerate's ``split_batches``); accumulation is accelerate's. The LM term is the global token mean.
- Everything that varies per step is a function of ``(seed, stage, step)`` — batch order (the sampler's epoch seed
  and the position), mirror augmentation, the text-first choice — or of the loss gates' state, which checkpoints
  carry, so a checkpoint (accelerate's state: weights, optimizer, scheduler, RNG) resumes onto the same loss curve,
  on the same number of processes.
- Only the main process writes: ``run.json``, ``recipe.json``, ``data/`` (the built instruction JSON), ``log.jsonl``
  (one line per step: stage, step, loss, lr, samples/s, tokens/s), ``logs/`` (tensorboard), ``checkpoints/``,
  ``model/`` (the final HF folder, written atomically), ``loss.png``, ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from pg_analysis.errors import InputError
from pg_analysis.runinfo import atomic_write_json
from pg_analysis.runs import DATA_DIR, MODEL_DIR, TRAIN_LOG, TRAIN_SUMMARY, write_run_record

from .checkpoints import latest_checkpoint, read_checkpoint, save_checkpoint
from .config import FORMAT_STAGE, STAGES, TrainConfig, recipe_path, stage_position, training_fields
from .conversations import default_template
from .datasets import pad_rows
from .inputs import flips_in_tensor
from .losses import Objective, common_suffix_length, distill_layer_indices
from .params import add_lora, grad_norms, merge_lora, set_trainable
from .pipeline import EpochSampler, RecordIndex, TrainDataset, keep_items
from .vlm import VLM, build_vlm, load_vlm, precision_context, resolve_precision, use_attention
from .warmup import CaptionStates, caption_targets, match_scale

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "latest_checkpoint", "train"]


def step_rng(seed: int, stage: int, step: int, micro: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step, micro, 7])


class LossGate:
    """Whether a loss has fallen: the step at which the mean of the last :attr:`WINDOW` observed losses first went
    below ``until`` (``learnt_at``; None until then). Its state travels with checkpoints."""

    WINDOW = 5

    def __init__(self, until: float, state: dict[str, Any] | None = None) -> None:
        self.until = until
        self.recent: list[float] = list((state or {}).get("recent", []))
        self.learnt_at: int | None = (state or {}).get("learnt_at")

    def observe(self, step: int, loss: float) -> None:
        """A step's loss (the global token mean, the same on every process)."""
        self.recent = (self.recent + [loss])[-self.WINDOW:]
        if self.learnt_at is None and len(self.recent) == self.WINDOW and sum(self.recent) / self.WINDOW < self.until:
            self.learnt_at = step

    def state(self) -> dict[str, Any]:
        return {"recent": self.recent, "learnt_at": self.learnt_at}


class TextFirst:
    """Which stage-2 steps give the caption as text in place of the image: the first ``text_first_steps`` always,
    a ``text_first_frac`` share of the rest at random; with ``text_first_until``, also every step after the first
    ones until the mean loss of the last :attr:`LossGate.WINDOW` text steps falls below it (the answer format is
    learnt then, in one sudden drop whose step varies with the seed), up to step ``text_first_max_steps``. A run
    whose loss fell within the first steps is the run without the gate, step for step. ``learnt_at``: the step the
    format was learnt (the text loss below ``text_first_until``, or below :attr:`LEARNT` without the gate: a
    :class:`LossGate` over the text steps)."""

    LEARNT = 0.1

    def __init__(self, cfg: TrainConfig, state: dict[str, Any] | None = None) -> None:
        self.first, self.until, self.cap = cfg.text_first_steps, cfg.text_first_until, cfg.text_first_max_steps
        self.frac, self.seed = cfg.text_first_frac, cfg.seed
        self.gate = LossGate(self.until if self.until is not None else self.LEARNT, state)

    @property
    def learnt_at(self) -> int | None:
        return self.gate.learnt_at

    def use_text(self, step: int) -> bool:
        if step < self.first or (self.until is not None and self.learnt_at is None and step < self.cap):
            return True
        return bool(step_rng(self.seed, 2, step).random() < self.frac)

    def observe(self, step: int, loss: float) -> None:
        """A text step's loss (the global token mean, the same on every process)."""
        self.gate.observe(step, loss)

    def state(self) -> dict[str, Any]:
        return self.gate.state()


def make_accelerator(cfg: TrainConfig) -> Any:
    """The run's ``Accelerator``: the launcher's processes (one when run plainly), batches split over them,
    accelerate's gradient accumulation (never synced at a DataLoader's end: the loop counts steps itself), DDP
    told that a step may leave the projector unused (a text-only batch), and the tracker."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    out = Path(cfg.out_dir)
    return Accelerator(
        cpu=cfg.device == "cpu",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


# ----------------------------------------------------------------------------------------------------------------
# preparation


class Run:
    """What a run trains on: the model, the record indices, the datasets, the feature store, the warm-up."""

    def __init__(self, cfg: TrainConfig, accelerator: Any, out_dir: Path):
        from pg_analysis.assets import feature_cache_dir
        from pg_analysis.models import pick_runtime

        self.cfg = cfg
        main = accelerator.is_main_process
        runtime = pick_runtime("cuda" if accelerator.device.type == "cuda" else "cpu", "float32")
        self.vlm = self._model(cfg, runtime)
        model, tok = self.vlm.model, self.vlm.tokenizer
        cache = feature_cache_dir(cfg.cache_dir)
        # data: only the main process writes (built JSON, converted JSONL); the others then read
        files, self.manifest = None, None
        if main:
            files, self.manifest = self._data_files(cfg, out_dir)
        accelerator.wait_for_everyone()
        if not main:
            files, self.manifest = self._data_files(cfg, out_dir, build=False)
        self.index = {}
        with accelerator.main_process_first():
            for stage in (1, 2):
                self.index[stage] = (RecordIndex(files[stage], cache, self.manifest["image_root"]) if files[stage]
                                     else None)
        for stage in (1, 2):
            if self.index[stage] is not None and len(self.index[stage]) == 0:
                raise InputError(f"the stage-{stage} data ({', '.join(files[stage])}) holds no records")
        self.template = cfg.template if cfg.template != "auto" else default_template(tok)
        self.store = None
        if cfg.store is not None:
            with accelerator.main_process_first():
                self.store = self._store(cfg, cache, out_dir)
        common = dict(tokenizer=tok, image_token_id=model.config.image_token_index,
                      n_image_tokens=model.num_image_tokens, max_length=cfg.max_length, store=self.store,
                      image_processor=None if self.store is not None else self.vlm.image_processor,
                      seq2seq=self.vlm.is_encoder_decoder)
        self.datasets = {}
        if self.index[1] is not None:
            self.datasets[1] = TrainDataset(self.index[1], template="plain", **common)
        if self.index[2] is not None:
            self.datasets[2] = TrainDataset(self.index[2], template=self.template, system=cfg.system_prompt,
                                            twins=cfg.uses_twins, **common)
        self.steps = {0: cfg.stage_steps(0, 0) if cfg.uses_warmup_features else 0,
                      1: cfg.stage_steps(1, len(self.index[1] or [])),
                      FORMAT_STAGE: cfg.stage_steps(FORMAT_STAGE, len(self.index[2] or [])),
                      2: cfg.stage_steps(2, len(self.index[2] or []))}
        for stage in (1, 2):
            if self.steps[stage] and len(self.datasets[stage]) < cfg.micro_batch(stage):
                raise InputError(f"stage {stage} has {len(self.datasets[stage])} records, fewer than one micro-batch "
                                 f"({cfg.micro_batch(stage)})")
        self.states: CaptionStates | None = None
        self.targets = None
        if cfg.uses_warmup_features:
            self.states = self._caption_states()
            self.targets = self.states.means - self.states.token_mean if cfg.centred else self.states.means

    @staticmethod
    def _model(cfg: TrainConfig, runtime: Any) -> VLM:
        if cfg.init_from:
            vlm = load_vlm(cfg.init_from, insert_layer=cfg.layer, runtime=runtime)
        else:
            vlm = build_vlm(cfg.vision, cfg.llm, insert_layer=0, vision_feature_layer=cfg.vision_feature_layer,
                            vision_pool=cfg.vision_pool, projector_type=cfg.projector, runtime=runtime, seed=cfg.seed,
                            bypass_encoder=cfg.bypass_encoder, modality=cfg.modality, slots=cfg.slots)
        if vlm.modality != cfg.modality:
            raise InputError(f"--init-from {cfg.init_from} reads {vlm.modality} inputs, not --modality {cfg.modality}")
        if vlm.is_encoder_decoder:
            refused = cfg.decoder_only_options()
            if refused:
                raise InputError(f"an encoder-decoder LM is grounded with --bypass-encoder; it does not take "
                                 f"{', '.join(refused)} (decoder-only options; --recipe llava15 sets none of them)")
            vlm.model.config.bypass_encoder = cfg.bypass_encoder
            return vlm
        if not cfg.init_from:
            n_lm = vlm.model.config.text_config.num_hidden_layers
            if cfg.layer > n_lm:
                raise InputError(f"--layer must be in [0, {n_lm}] for this {n_lm}-layer LM, got {cfg.layer}")
            vlm.model.set_insert_layer(cfg.layer)
        if cfg.exit_layer is not None:
            vlm.model.set_exit_layer(cfg.exit_layer)  # a GroundingError (one line) unless L <= K <= N
        n_layers = vlm.model.config.text_config.num_hidden_layers
        if cfg.lora and cfg.layer >= n_layers:  # before any data or features are prepared
            raise InputError(f"--lora adapts the LM layers >= L, and L = {cfg.layer} leaves none of the {n_layers}")
        return vlm

    @staticmethod
    def _data_files(cfg: TrainConfig, out_dir: Path, build: bool = True) -> tuple[dict[int, list[str]], dict]:
        """The stage-1 and stage-2 files, and the data manifest. ``--data llava``: the given files; else the
        instruction JSON built into ``<out>/data`` (``build``: write it; else read what the main process wrote)."""
        if cfg.data == "llava":
            split = (lambda s: [p for p in s.split(",") if p] if s else [])
            files = {1: split(cfg.stage1_data), 2: split(cfg.stage2_data)}
            return files, {"stage1_data": cfg.stage1_data, "stage2_data": cfg.stage2_data,
                           "image_root": cfg.image_root}
        from pg_analysis.runs import DATA_MANIFEST

        from .datasets import manifest_image_root

        data_dir = out_dir / DATA_DIR
        if build and cfg.modality == "molecule":
            from pg_analysis.modalities import get_modality, load_pairs

            from .datasets import build_molecule_instructions

            if cfg.extra_pairs():
                raise InputError("--extra-train adds image-caption pairs; molecule runs take none")
            manifest = build_molecule_instructions(data_dir, load_pairs(get_modality("molecule"), cfg.data),
                                                   seed=cfg.seed)
        elif build:
            from pg_analysis.data import load_pairs

            from .datasets import build_tuxpaint_instructions

            extra = cfg.extra_pairs()
            manifest = build_tuxpaint_instructions(data_dir, seed=cfg.seed, pairs=load_pairs(cfg.data),
                                                   extra_train=load_pairs(extra) if extra else None)
        else:
            manifest = json.loads((data_dir / DATA_MANIFEST).read_text())
        # the built records name inputs relative to the manifest's image root
        manifest = {**manifest, "image_root": manifest_image_root(manifest, data_dir)}
        f = manifest["files"]
        files = {1: [str(data_dir / f["train_caption"])],
                 2: [str(data_dir / f[f"train_{task}"]) for task in cfg.stage2_tasks.split(",") if task]}
        return files, manifest

    def _image_paths(self) -> list[str]:
        """Every training image, in first-seen order (one pass over the records: the store is built from it)."""
        seen: dict[str, None] = {}
        for stage in (1, 2):
            if self.index[stage] is not None:
                for r in self.index[stage].records():
                    if r.get("image_path"):
                        seen.setdefault(r["image_path"], None)
        return list(seen)

    def _store(self, cfg: TrainConfig, cache: Path, out_dir: Path) -> Any:
        from .datasets import encoder_key
        from .feature_store import open_or_build, store_key

        paths = None
        if cfg.store == "auto":
            paths = self._image_paths()
            if not paths:
                raise InputError("the training data has no images")
            folder = cache / "stores" / store_key(encoder_key(self.vlm), paths)
        else:
            folder = Path(cfg.store)
            if not (folder / "index.json").is_file():
                paths = self._image_paths()
        return open_or_build(folder, self.vlm, paths if paths is not None else [], cache, progress=cfg.progress)

    def _caption_states(self) -> CaptionStates:
        """The LM's states of each stored image's caption at the insertion point (the warm-up's targets)."""
        caption_of: dict[str, str] = {}
        prefix = None
        for stage in (1, 2):
            if self.index[stage] is None:
                continue
            for i, r in enumerate(self.index[stage].records()):
                path = r.get("image_path")
                if not path:
                    continue
                if r.get("caption"):
                    caption_of.setdefault(path, r["caption"])
                elif r["conversations"][-1]["from"] == "gpt":
                    caption_of.setdefault(path, r["conversations"][-1]["value"])
                if prefix is None or stage == 2 and prefix[0] == 1:
                    item = self.datasets[stage][i]
                    if "error" not in item:
                        ids, image_id = item["input_ids"], self.vlm.model.config.image_token_index
                        prefix = (stage, ids[:ids.index(image_id)])
        captions = [caption_of.get(p, "") or "image" for p in self.store.paths]
        return caption_targets(self.vlm, captions, self.cfg.layer, prefix[1] if prefix else [])


    def batches(self, accelerator: Any, stage: int, first_step: int) -> Iterator[list[dict[str, Any]]]:
        """This process's share of the stage's micro-batches from optimizer step ``first_step`` on, epoch after
        epoch (each epoch's order seeded by it and the stage); skipped batches are never loaded. The format stage
        reads stage 2's records."""
        cfg = self.cfg
        micro, data = cfg.micro_batch(stage), 2 if stage == FORMAT_STAGE else stage
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            self.datasets[data], batch_size=micro, drop_last=True, collate_fn=keep_items,
            sampler=EpochSampler(self.index[data].lengths, micro, cfg.seed, stage, cfg.length_group),
            num_workers=cfg.num_workers))
        epoch, offset = divmod(first_step * cfg.grad_accum, len(self.datasets[data]) // micro)
        while True:
            loader.set_epoch(epoch)
            yield from (accelerator.skip_first_batches(loader, offset) if offset else loader)
            epoch, offset = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------------
# batches


def step_inputs(run: Run, items: list[dict[str, Any]], use_text: bool, flips: list[bool], stage: int,
            device: torch.device) -> dict[str, Any]:
    """One micro-batch's model inputs (and the InfoNCE rows and distillation pairs) from its items."""
    pad = run.vlm.tokenizer.pad_token_id
    rows, images, image_items = [], [], []
    for k, (it, flip) in enumerate(zip(items, flips)):
        if use_text and it.get("twin") is not None:
            rows.append(it["twin"])
        else:
            rows.append((it["input_ids"], it["labels"]))
            if "image" in it:
                images.append((it["image"], flip))
                image_items.append(k)
    ids, mask = pad_rows([r[0] for r in rows], pad)
    labels, _ = pad_rows([r[1] for r in rows], -100)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    image_rows = None
    if images:
        if run.store is not None:
            inputs["vision_features"] = run.store.features([r for r, _ in images], [int(f) for _, f in images])
            image_rows = torch.tensor([r for r, _ in images])
        else:
            flippable = flips_in_tensor(run.vlm.image_processor)  # a molecule's other spelling needs the store
            px = torch.stack([im.flip(-1) if flip and flippable else im for im, flip in images])
            inputs["pixel_values"] = px
        inputs.update(run.vlm.qformer_inputs([items[k]["instruction"] for k in image_items]))  # InstructBLIP
    out: dict[str, Any] = {"inputs": {k: v.to(device) for k, v in inputs.items()},
                           "image_rows": image_rows, "twins": None}
    pairs = [(k, items[k]["twin"]) for k in image_items if items[k].get("twin") is not None]
    if stage == 2 and not use_text and pairs:
        t_ids, t_mask = pad_rows([tw[0] for _, tw in pairs], pad)
        out["twins"] = {"inputs": {"input_ids": t_ids.to(device), "attention_mask": t_mask.to(device)},
                        "rows": torch.tensor([k for k, _ in pairs], device=device),
                        "suffix": [common_suffix_length(rows[k][0], tw[0]) for k, tw in pairs],
                        "student_lengths": [len(rows[k][0]) for k, _ in pairs],
                        "teacher_lengths": [len(tw[0]) for _, tw in pairs]}
    return out


# ----------------------------------------------------------------------------------------------------------------
# the loop


class _Log:
    """Appends JSON lines to ``log.jsonl`` (main process); on resume, drops lines past the checkpoint's position."""

    def __init__(self, path: Path, keep_until: tuple[int, int] | None, active: bool):
        self.path, self.active = path, active
        if not active:
            return
        lines = []
        if keep_until is not None and path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    rec = json.loads(line)
                    position = stage_position(rec["stage"], rec["step"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # torn by the kill: past the checkpoint
                    log.warning("%s line %d is torn; dropped", path, number)
                    continue
                if position < stage_position(*keep_until):
                    lines.append(line)
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, rec: dict[str, Any]) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def train(cfg: TrainConfig, layer_evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary (also written to ``summary.json``).

    ``layer_evidence``: the pg-recommend result behind ``--layer auto``, recorded in ``run.json``."""
    t_call = time.perf_counter()
    accelerator = make_accelerator(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise InputError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    if not cfg.resume and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"output folder {out_dir} is not empty; pass --resume to continue it or choose another")
    precision = resolve_precision(cfg.precision, accelerator.device)
    if accelerator.num_processes > 1:  # every process autocasts alike: rank 0's choice ("auto" is timed per process)
        from accelerate.utils import broadcast_object_list

        precision = broadcast_object_list([precision])[0]
    state = read_checkpoint(ckpt, cfg, accelerator.num_processes, precision) if ckpt is not None else None
    for stage in (1, 2):
        micro = cfg.micro_batch(stage)
        if micro % accelerator.num_processes:
            raise InputError(f"the stage-{stage} micro-batch ({cfg.global_batch(stage)} examples / --grad-accum "
                             f"{cfg.grad_accum}) does not split over {accelerator.num_processes} processes")
    if cfg.lora and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise InputError("--lora is merged into the saved model on one process or under DDP; with FSDP or DeepSpeed "
                         "train the full layers >= L")
    created = not out_dir.exists()
    accelerator.wait_for_everyone()  # every process has looked before the main one creates anything
    try:
        return _train(cfg, accelerator, layer_evidence, out_dir, ckpt, state, precision, t_call)
    except BaseException:
        # A fresh run that fails or is interrupted before its first checkpoint has nothing to resume from: leave
        # nothing behind, so the same command can simply be run again.
        if accelerator.is_main_process and created and latest_checkpoint(out_dir) is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, accelerator: Any, layer_evidence: dict[str, Any] | None, out_dir: Path,
           ckpt: Path | None, state: dict[str, Any] | None, precision: str, t_call: float) -> dict[str, Any]:
    from transformers import get_scheduler

    from pg_analysis.plots import loss_curve_figure

    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    run = Run(cfg, accelerator, out_dir)
    vlm, device = run.vlm, accelerator.device
    model = vlm.model
    attention = use_attention(model, cfg.attention)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers renamed gradient_checkpointing_enable (5.24)
    steps = run.steps
    scale: dict[str, Any] = {}
    if run.states is not None:
        scale = {"target_median_norm": run.states.median_norm,
                 "target_centred_median_norm": run.states.centred_median_norm,
                 "target_mean_norm": float(run.states.token_mean.norm())}
    if ckpt is not None:
        start_stage, start_step = state["stage"], state["next_step"]
        scale = state.get("scale", scale)
    else:
        start_stage, start_step = 0, 0
        if cfg.scale_match and not cfg.init_from:
            scale.update(match_scale(model, run.store.all_features(), run.states, cfg.match_mean))
    if main:
        record = {"data": run.manifest, "num_image_tokens": model.num_image_tokens, "template": run.template,
                  "attention": attention, "precision": precision,
                  "world_size": accelerator.num_processes, "steps": steps}
        if layer_evidence is not None:
            record["layer_auto"] = layer_evidence
        write_run_record(out_dir, "pg-train", cfg.to_dict(), **record)
        shutil.copyfile(recipe_path(cfg.recipe), out_dir / "recipe.json")
    tracking = cfg.report_to != "none"
    if tracking:
        accelerator.init_trackers("pg-train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in training_fields(cfg).items()})
    logger = _Log(out_dir / TRAIN_LOG, (start_stage, start_step) if ckpt is not None else None, main)
    world, g = accelerator.num_processes, cfg.grad_accum
    done_steps, skipped = 0, 0
    stage_time: dict[int, float] = {}
    t_run = time.perf_counter()
    before = float(state.get("run_seconds", 0.0)) if state is not None else 0.0  # earlier processes of this run

    text_first = TextFirst(cfg, state.get("text_first") if state is not None else None)
    format_gate = LossGate(cfg.format_until, state.get("format") if state is not None else None)

    def extra() -> dict[str, Any]:
        return {"config": training_fields(cfg), "precision": precision, "scale": scale,
                "run_seconds": before + time.perf_counter() - t_run, "text_first": text_first.state(),
                "format": format_gate.state()}

    stopped, to_first_step = False, None
    for stage in STAGES:
        if STAGES.index(stage) < STAGES.index(start_stage) or steps[stage] == 0:
            continue
        accelerator.free_memory()  # the previous stage's prepared objects
        lm_stage = stage in (FORMAT_STAGE, 2)  # the format stage trains what stage 2 trains, less the projector
        if lm_stage and cfg.lora and not any("lora_" in n for n, _ in model.named_parameters()):
            add_lora(model, cfg.layer, cfg.lora_r, cfg.lora_alpha)
        groups = set_trainable(model, 2 if lm_stage else stage, cfg.layer, cfg.lora)
        if stage == FORMAT_STAGE:  # text only: the projector would get no gradient
            for p in groups.pop("projector"):
                p.requires_grad_(False)
        lrs = {0: {"projector": cfg.stage0_lr}, 1: {"projector": cfg.stage1_lr},
               FORMAT_STAGE: {"lm": cfg.format_lr or cfg.stage2_lr},
               2: {"projector": cfg.stage2_projector_lr, "lm": cfg.stage2_lr}}[stage]
        param_groups = [{"params": groups[k], "lr": lr, "name": k} for k, lr in lrs.items() if groups[k]]
        optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
        # the format stage's length is set by its gate: a constant lr after the warm-up, whenever it ends
        scheduler = get_scheduler("constant_with_warmup" if stage == FORMAT_STAGE else cfg.lr_scheduler, optimizer,
                                  num_warmup_steps=int(cfg.warmup_frac * steps[stage]),
                                  num_training_steps=steps[stage])
        # inside the window [L, K) only: there every row is present (layers >= K run on the text rows alone)
        picks = (distill_layer_indices(cfg.layer, model.exit_layer, cfg.distill_layers)
                 if stage == 2 and cfg.distill_weight else [])
        objective = Objective(model, tau=cfg.tau, aux_weight=cfg.aux_weight if stage else 0.0,
                              distill_weight=cfg.distill_weight, distill_layers=picks, targets=run.targets,
                              token_mean=run.states.token_mean if run.states is not None and cfg.centred else None)
        objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
        first = start_step if stage == start_stage else 0
        if ckpt is not None and stage == start_stage:
            accelerator.load_state(str(ckpt))
        batches = run.batches(accelerator, stage, first) if stage > 0 else None
        model.train()
        bar = tqdm(range(first, steps[stage]), desc=f"stage {stage}", disable=not (cfg.progress and main),
                   initial=first, total=steps[stage], unit="step")
        t_stage = time.perf_counter()
        for step in bar:
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"stage": stage, "step": step,
                                   "lr": {pg["name"]: pg["lr"] for pg in optimizer.param_groups}}
            if stage == 0:
                flips = (step_rng(cfg.seed, 0, step).random(len(run.store)) < 0.5).astype(int).tolist()
                with precision_context(precision, device):
                    terms = objective(stage=0, features=run.store.all_features(flips).to(device))
                accelerator.backward(terms["total"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                rec.update(loss=float(terms["infonce"]), samples_per_s=len(run.store) / (time.perf_counter() - t0))
            else:
                use_text = stage == FORMAT_STAGE or (stage == 2 and text_first.use_text(step))
                rec.update(_stage_step(cfg, run, accelerator, objective, optimizer, scheduler, param_groups,
                                       batches, stage, step, world, g, precision, use_text))
                skipped += rec.pop("skipped")
                if stage == FORMAT_STAGE and rec["samples"] == 0:  # an empty step's loss of 0 would close the gate
                    raise InputError("the format stage found no text in a batch: it reads stage-2 records with a "
                                     "'caption' (their text twin) or without an image; --format-steps 0 turns it off")
                if use_text:
                    rec["text_only"] = True
                    (format_gate if stage == FORMAT_STAGE else text_first).observe(step, rec["loss"])
            dt = time.perf_counter() - t0
            rec["step_s"] = dt
            if to_first_step is None:  # model, data index, feature store, warm-up statistics, first batch
                to_first_step = time.perf_counter() - t_call
            if stage > 0:
                rec.update(samples_per_s=rec["samples"] / dt, tokens_per_s=rec["tokens"] / dt)
            logger.write(rec)
            if tracking:
                accelerator.log({f"stage{stage}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))},
                                step=done_steps)
            postfix = {"loss": f"{rec['loss']:.3f}"}
            if rec.get("tokens_per_s"):
                postfix["tok/s"] = f"{rec['tokens_per_s']:.0f}"
            bar.set_postfix(postfix)
            done_steps += 1
            ended = stage == FORMAT_STAGE and format_gate.learnt_at is not None  # the format is learnt
            last = step + 1 == steps[stage] or ended
            if ended:  # its checkpoint marks the stage done
                save_checkpoint(accelerator, out_dir, stage, steps[stage], extra())
            elif (step + 1) % cfg.checkpoint_every == 0 or last:
                save_checkpoint(accelerator, out_dir, stage, step + 1, extra())
            if cfg.stop_after is not None and done_steps >= cfg.stop_after and not last:
                if (step + 1) % cfg.checkpoint_every:
                    save_checkpoint(accelerator, out_dir, stage, step + 1, extra())
                stopped = True
                break
            if ended:
                break
        bar.close()
        stage_time[stage] = time.perf_counter() - t_stage
        if stopped:
            break
    model.eval()
    full_state = None
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED") and not stopped:  # sharded: gather on main
        full_state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(objective).items()}
    summary: dict[str, Any] = {"stopped_early": stopped, "stage_seconds": stage_time,
                               "run_seconds": extra()["run_seconds"],
                               "run_seconds_this_process": time.perf_counter() - t_run,
                               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "scale": scale, "num_image_tokens": model.num_image_tokens,
                               "insert_layer": getattr(model, "insert_layer", None), "steps": steps,
                               "skipped_records": skipped, "text_first": text_first.state(),
                               "format": format_gate.state(),
                               "world_size": world, "seconds_to_first_step": to_first_step}
    accelerator.wait_for_everyone()
    accelerator.end_training()  # trackers closed; the process group is released (no collective after this)
    summary["main_process"] = main
    if stopped or not main:
        return summary
    if cfg.lora:
        merge_lora(model)
    tmp = out_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        vlm.save(tmp, state_dict=full_state)
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


def _stage_step(cfg: TrainConfig, run: Run, accelerator: Any, objective: Any, optimizer: Any, scheduler: Any,
                param_groups: list[dict[str, Any]], batches: Iterator[list[dict[str, Any]]], stage: int, step: int,
                world: int, g: int, precision: str, use_text: bool) -> dict[str, Any]:
    """One optimizer step of stage 1 or 2 (``precision``: the run's resolved one; ``use_text``: the caption as text
    in place of the image, :class:`TextFirst`): ``g`` micro-batches, the global token count first (the LM term's
    denominator), then forward/backward under accelerate's accumulation; returns the step's log fields."""
    device = accelerator.device
    micro, share = cfg.micro_batch(stage), cfg.micro_batch(stage) // world
    mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    prepared, skipped = [], 0
    for m in range(g):
        items = next(batches)
        flips = (step_rng(cfg.seed, stage, step, m + 1).random(micro) < 0.5).tolist()[mine]
        bad = [it for it in items if "error" in it]
        if bad:
            if cfg.on_bad_record == "fail":
                raise InputError(f"{bad[0]['error']} (--on-bad-record skip leaves such records out)")
            skipped += len(bad)
            log.warning("skipped %d bad records (e.g. %s)", len(bad), bad[0]["error"])
            flips = [f for it, f in zip(items, flips) if "error" not in it]
            items = [it for it in items if "error" not in it]
        if stage == FORMAT_STAGE:  # text only: a record whose image has no text twin (no caption) sits it out
            flips = [f for it, f in zip(items, flips) if it.get("twin") is not None or "image" not in it]
            items = [it for it in items if it.get("twin") is not None or "image" not in it]
        prepared.append(step_inputs(run, items, use_text, flips, stage, device) if items else None)
    shift = 0 if run.vlm.is_encoder_decoder else 1  # a causal LM's first label predicts nothing
    local = [sum(int((p["inputs"]["labels"][:, shift:] != -100).sum()) for p in prepared if p),
             sum(int(p["inputs"]["attention_mask"].sum()) for p in prepared if p),
             sum(int(p["inputs"]["input_ids"].shape[0]) for p in prepared if p), skipped]
    counts = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=device), "sum").tolist()
    n_items = max(counts[0], 1.0)
    sums = {"lm_sum": 0.0, "distill": 0.0, "aux_infonce": 0.0}
    seen = {"distill": 0, "aux_infonce": 0}
    norms = None
    for p in prepared:
        with accelerator.accumulate(objective):
            if p is None:  # every record of this micro-batch was skipped: a zero loss through the wrapped
                # module's forward, so DDP / FSDP see a forward before the backward and every process syncs
                loss = objective(stage=stage, inputs=None)["total"]
            else:
                with precision_context(precision, device):
                    terms = objective(stage=stage, inputs=p["inputs"], num_items=n_items, lm_scale=world * g,
                                      image_rows=p["image_rows"], twins=p["twins"])
                loss = terms["total"]
                sums["lm_sum"] += float(terms["lm_sum"])
                for k in seen:
                    if k in terms:
                        sums[k] += float(terms[k])
                        seen[k] += 1
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms = grad_norms(param_groups)  # before clipping: which group drives the clip shows here
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_([q for pg in param_groups for q in pg["params"]], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    stats = accelerator.reduce(torch.tensor([sums["lm_sum"], sums["distill"], seen["distill"], sums["aux_infonce"],
                                             seen["aux_infonce"]], dtype=torch.float64, device=device), "sum").tolist()
    rec: dict[str, Any] = {"loss": stats[0] / n_items, "tokens": int(counts[1]), "samples": int(counts[2]),
                           "skipped": int(counts[3]), "grad_norm": norms}
    if stats[2]:
        rec["distill"] = stats[1] / stats[2]
    if stats[4]:
        rec["aux_infonce"] = stats[3] / stats[4]
    return rec


def _throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for stage in STAGES:
        rs = [r for r in records if r["stage"] == stage]
        if rs:
            t = sum(r["step_s"] for r in rs)
            tokens = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
            out[f"stage{stage}"] = {"steps": len(rs), "seconds": t, "s_per_step": t / len(rs),
                                    "samples_per_s": float(np.median([r["samples_per_s"] for r in rs])),
                                    "tokens_per_s": float(np.median(tokens)) if tokens else None}
    return out
