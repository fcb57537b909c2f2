"""Provenance and atomic output: what every command writes beside its results.

- :func:`run_metadata` — package versions, git commit, host facts.
- :func:`atomic_write_bytes` / :func:`atomic_write_json` — temp file in the same folder, then ``os.replace``.
- :func:`atomic_output_dir` — build a whole output folder under a temp name, rename it into place on success,
  remove it on failure, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

_TRACKED_PACKAGES = (
    "torch", "transformers", "numpy", "safetensors", "datasets", "accelerate", "peft",
    "scikit-learn", "matplotlib", "seaborn", "nnsight", "transformer-lens", "platonic-grounding",
)


def package_versions(names: tuple[str, ...] = _TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout holding this package (``+dirty`` if modified), or None outside git."""
    where = path or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata() -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN: an undefined value is null
    return x


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def writable_folder_problem(folder: Path) -> str | None:
    """Why files cannot be created under ``folder`` (or the nearest existing ancestor it would be created in), or
    None. Tries it — a temp folder made and removed — since permission bits say nothing for root, a read-only
    mount or ``/proc``."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".pg-probe-"))
    except OSError as e:
        return f"{probe} cannot be written ({e.strerror or e})"
    return None


def check_writable_parent(out_dir: Path) -> None:
    """Raise :class:`InputError` now (before any compute) if ``out_dir`` cannot be created or written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path {out_dir} exists and is not a directory")
    problem = writable_folder_problem(out_dir.parent)
    if problem:
        raise InputError(f"output directory {out_dir} cannot be created: {problem}")


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir``; on success it replaces ``out_dir``, on error it is deleted."""
    out_dir = Path(out_dir)
    check_writable_parent(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not overwrite:
        raise InputError(f"output directory {out_dir} exists (pass --overwrite)")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
