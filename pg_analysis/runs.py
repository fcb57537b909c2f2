"""Run folders: what every command writes where, and how a folder is recognised.

Every command writes into its ``--out`` folder its results, a run record and its figures, assembled under a temp
name and renamed when complete (:func:`pg_analysis.runinfo.atomic_output_dir`). The run record is
:data:`RUN_RECORD` (``run.json``: the command, every option, timings, package versions, git commit). It is named
apart from the HF model's own ``config.json``, which a ``pg-train`` run holds in :data:`MODEL_DIR`. Folders written
before the record had its own name hold it as ``config.json`` (without the ``model_type`` every HF configuration
has); :func:`read_run_record` reads either, and :func:`model_folder` never takes such a record for a model.

Layout of a ``pg-train`` run: ``model/`` (HF folder) · ``run.json`` · ``log.jsonl`` · ``summary.json`` · ``loss.png``
· ``data/`` (instruction data, ``manifest.json``) · ``checkpoints/`` · ``eval/`` (``pg-eval``'s result).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError
from .runinfo import atomic_write_json, run_metadata

RUN_RECORD = "run.json"
LEGACY_RUN_RECORD = "config.json"
HF_CONFIG = "config.json"

MODEL_DIR = "model"
DATA_DIR = "data"
EVAL_DIR = "eval"
CHECKPOINTS_DIR = "checkpoints"

ALIGN_RESULT = "alignment.json"
ATTNMAP_RESULT = "attnmap.json"
ATTENTION_ARRAY = "attention.npy"
RECOMMEND_RESULT = "recommend.json"
SWEEP_RESULT = "sweep.json"
BENCH_RESULT = "bench.json"
EVAL_RESULT = "eval.json"
TRAIN_LOG = "log.jsonl"
TRAIN_SUMMARY = "summary.json"
DATA_MANIFEST = "manifest.json"


def write_run_record(folder: Path, command: str, config: dict[str, Any], **info: Any) -> None:
    """``folder/run.json``: the command, its options, ``info`` (timings, sources…) and provenance."""
    atomic_write_json(Path(folder) / RUN_RECORD, {"command": command, "config": config, **info, **run_metadata()})


def _json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """The run record of ``folder`` (``run.json``, or a legacy ``config.json`` that is no HF configuration),
    else None."""
    folder = Path(folder)
    record = _json_or_none(folder / RUN_RECORD)
    if record is not None:
        return record
    legacy = _json_or_none(folder / LEGACY_RUN_RECORD)
    return legacy if legacy is not None and "model_type" not in legacy else None


def is_model_folder(folder: Path) -> bool:
    """An HF model folder: a ``config.json`` that is a model configuration (``model_type``), not a run record."""
    config = _json_or_none(Path(folder) / HF_CONFIG)
    return config is not None and "model_type" in config


def is_train_run(folder: Path) -> bool:
    """A ``pg-train`` output folder (an HF model folder in ``model/``)."""
    return is_model_folder(Path(folder) / MODEL_DIR)


def model_folder(source: str | Path) -> Path | None:
    """The HF model folder of a ``pg-train`` run or of a model folder; None if ``source`` is neither."""
    path = Path(source)
    if is_train_run(path):
        return path / MODEL_DIR
    return path if is_model_folder(path) else None


def has_result(folder: str | Path | None, name: str) -> bool:
    """Whether ``folder`` holds the result file ``name`` (one of the ``*_RESULT`` constants)."""
    return bool(folder) and (Path(folder) / name).is_file()


def read_json(path: Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object file, or one clear :class:`InputError`: missing, not JSON (a torn write), not an object, or
    without one of ``keys``. ``what`` names it in the message (``"pg-eval's instruction data manifest"``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a JSON object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise InputError(f"{what} {path} lacks {', '.join(missing)}")
    return data


def read_result_json(out_dir: Path, name: str, command: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """``out_dir/name`` of a saved result folder, or one clear :class:`InputError` (missing, not JSON, or
    without one of ``keys``)."""
    if not (Path(out_dir) / name).is_file():
        raise InputError(f"{out_dir} holds no {command} result ({name} missing)")
    return read_json(Path(out_dir) / name, f"the {command} result", keys)
