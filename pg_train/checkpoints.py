"""Checkpoints: accelerate's ``save_state`` / ``load_state`` (model, optimizer, scheduler, every process's RNG
state; sharded the way FSDP or DeepSpeed shard) plus ``state.json`` (stage, next step, options, world size).

``checkpoints/stage{s}-step{k}`` means "stage ``s`` continues at step ``k``" (``k`` = the stage's length: the
stage is done; the format stage, 3, runs before stage 2: ``config.STAGES``). Every process writes its part into ``stage{s}-step{k}.tmp``; once all have, the main process adds
``state.json`` and renames the folder, and removes older ones. Only renamed folders holding ``state.json`` and the
optimizer are ever resumed from; a torn one (a kill mid-write) is reported and passed over.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from pg_analysis.errors import InputError
from pg_analysis.runinfo import atomic_write_json
from pg_analysis.runs import CHECKPOINTS_DIR

from .config import STAGES, TrainConfig, stage_position, training_fields

log = logging.getLogger(__name__)

STATE = "state.json"
_NAME = re.compile(r"^stage(\d+)-step(\d{6})$")
_REQUIRED = (STATE, "optimizer.bin")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest *complete* checkpoint under ``out_dir/checkpoints`` (never a ``.tmp`` one being written)."""
    found = []
    for path in (Path(out_dir) / CHECKPOINTS_DIR).glob("stage*-step*"):
        m = _NAME.match(path.name)
        if m is None or int(m.group(1)) not in STAGES:
            continue
        missing = [f for f in _REQUIRED if not (path / f).is_file()]
        try:
            json.loads((path / STATE).read_text()) if not missing else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            missing.append(f"a readable {STATE}")
        if missing:
            log.warning("checkpoint %s is incomplete (no %s): skipped", path, ", ".join(missing))
            continue
        found.append((stage_position(int(m.group(1)), int(m.group(2))), path))
    return max(found)[1] if found else None


def read_checkpoint(path: Path, cfg: TrainConfig, world_size: int, precision: str | None = None) -> dict[str, Any]:
    """``state.json`` of ``path``, checked against this run: the same training options and number of processes.

    ``precision``: this run's resolved precision (bf16 / fp32). A checkpoint that records the one it was trained in
    is checked against it, not against the ``--precision`` option, so ``auto`` and the precision it stood for resume
    each other, and ``auto`` on a device that resolves it otherwise is refused."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"checkpoint {path} is unreadable ({e})") from None
    saved, now = dict(state.get("config", {})), training_fields(cfg)
    # an option that did not exist when the checkpoint was written was, in effect, at its default
    default = training_fields(TrainConfig())
    trained_in = state.get("precision")
    if trained_in is not None and precision is not None:
        saved.pop("precision", None)
        now.pop("precision", None)
        if trained_in != precision:
            raise InputError(f"checkpoint {path} was trained in {trained_in}; this run would train in {precision} "
                             f"(--precision {cfg.precision} on this device): resume with --precision {trained_in}")
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k, default.get(k)) != now.get(k))
    if diff:
        raise InputError(f"checkpoint {path} is incompatible with this run: options differ ({', '.join(diff)})")
    if state.get("world_size", 1) != world_size:
        raise InputError(f"checkpoint {path} was written by {state.get('world_size', 1)} processes; resume it with "
                         f"the same number (this launch has {world_size})")
    return state


def save_checkpoint(accelerator: Any, out_dir: Path, stage: int, next_step: int, state: dict[str, Any]) -> Path:
    """Save the prepared objects' state as ``checkpoints/stage{stage}-step{next_step}`` (all processes call this)."""
    final = Path(out_dir) / CHECKPOINTS_DIR / f"stage{stage}-step{next_step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        try:
            accelerator.save_state(str(tmp))
        except RuntimeError as e:  # torch.save's zip writer reports a short write (a full disk) as a RuntimeError
            free = shutil.disk_usage(tmp.parent).free / 2**30
            raise OSError(f"checkpoint {tmp} could not be written ({str(e).strip()}); {free:.1f} GiB free on its "
                          "disk") from e
        accelerator.wait_for_everyone()
        if main:
            atomic_write_json(tmp / STATE, {"stage": stage, "next_step": next_step,
                                            "world_size": accelerator.num_processes, **state})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in final.parent.glob("stage*-step*"):
                if old != final and not old.name.endswith(".tmp"):
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # a kill or a full disk mid-write: no half checkpoint left under any name
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final
