#!/usr/bin/env python3
"""Write or check ``constraints.txt``: the exact versions of every package this project installs.

``scripts/setup.sh`` installs through it by default, so a fresh machine gets the set the suite last passed with.
``scripts/check_latest.sh`` installs the newest versions ``pyproject.toml`` allows instead, runs the suite, and
prints what moved; when that suite passes, ``python scripts/lock.py write`` in that environment updates the lock.

    python scripts/lock.py write      # from the installed distributions (after the suite passed)
    python scripts/lock.py diff       # installed versions that differ from the lock (exit 1 if any)

The set is the dependency closure of ``platonic-grounding[dev]`` (its requirements, theirs, …), read from the
installed distributions' own metadata; the project itself and pip's own tools are left out.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PROJECT = "platonic-grounding"
EXTRAS = ("dev",)
SKIP = {"pip", "setuptools", "wheel", canonicalize_name(PROJECT)}


def _applies(req: Requirement, extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or ("",)))


def closure() -> dict[str, str]:
    """``{canonical name: installed version}`` for every distribution the project's install pulls in."""
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(PROJECT, EXTRAS)]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency whose marker did not apply here
        for text in dist.requires or []:
            req = Requirement(text)
            if not _applies(req, extras):
                continue
            key = canonicalize_name(req.name)
            if key in found or key in SKIP:
                continue
            try:
                found[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            todo.append((req.name, tuple(req.extras)))
    return dict(sorted(found.items()))


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def write(path: Path = LOCK) -> None:
    pins = closure()
    if "torch" not in pins or "transformers" not in pins:
        sys.exit("lock: the project is not installed here (pip install -e '.[dev]' first)")
    head = [f"# The package set `python3 -m pytest -q` last passed with ({datetime.date.today()}, Python "
            f"{platform.python_version()}, {platform.system()} {platform.machine()}).",
            "# Written by `python scripts/lock.py write`; used by scripts/setup.sh (pip -c). Do not edit by hand:",
            "# run scripts/check_latest.sh to try the newest allowed versions, then rewrite the lock from there."]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(head + [f"{name}=={version}" for name, version in pins.items()]) + "\n")
    tmp.replace(path)
    print(f"lock: wrote {len(pins)} pins to {path.relative_to(ROOT)}")


def diff(path: Path = LOCK) -> int:
    locked, installed = read_lock(path), closure()
    moved = [(n, locked.get(n, "-"), installed.get(n, "-")) for n in sorted(set(locked) | set(installed))
             if locked.get(n) != installed.get(n)]
    for name, old, new in moved:
        print(f"{name:32s} lock {old:>14s}   installed {new}")
    print(f"lock: {len(moved)} of {len(installed)} installed packages differ from {path.name}")
    return 1 if moved else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("write", "diff"), help="write the lock, or list what differs from it")
    args = parser.parse_args()
    if args.action == "write":
        write()
        return 0
    return diff()


if __name__ == "__main__":
    sys.exit(main())
