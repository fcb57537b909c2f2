"""Image–caption pairs as ``datasets.Dataset`` with columns ``id`` (str), ``image``, ``caption`` (str).

``image`` is a file path for file-based sources, or whatever ``datasets`` decodes (a PIL image or a
``{"bytes", "path"}`` dict) for hub datasets; :func:`open_image` turns any of them into an RGB PIL image.

Sources:

- ``tuxpaint`` (default, offline): the Tux Paint stamps, leaving out ``symbols/`` and every ``cartoon/`` folder;
  a stamp is kept when its ``.txt`` has an English first line. 430 pairs.
- ``wit1024``: ``minhuh/prh`` revision ``wit_1024``, split ``train``, caption index 0 (as Huh et al.).
- ``coco``: ``--coco-root DIR`` with ``annotations/captions_{split}2017.json`` and ``{split}2017/`` images; the
  caption with the lowest annotation id of each image.
- a ``.jsonl`` / ``.csv`` file with ``image`` and ``caption`` fields (image paths relative to the file's folder).

Selection (:func:`select`): pairs are ordered by ``id``; when ``n`` is smaller than the pool, ``n`` indices are
drawn without replacement by ``numpy.random.default_rng(seed)`` and kept in ``id`` order.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import assets
from .errors import InputError, ModelUnavailable
from .registry import DATASETS

EXCLUDED_TUXPAINT_DIRS = ("symbols", "cartoon")


def _dataset(rows: list[dict[str, Any]], source: str):
    from datasets import Dataset

    if not rows:
        raise InputError(f"{source}: no image–caption pairs found")
    for r in rows:
        if not isinstance(r["caption"], str) or not r["caption"].strip():
            raise InputError(f"{source}: empty caption for {r['id']}")
    rows = sorted(rows, key=lambda r: r["id"])
    return Dataset.from_list(rows)


def tuxpaint_rows(root: Path, subset: str = "photos") -> list[dict[str, Any]]:
    """Captioned Tux Paint stamps. ``subset``: ``photos`` (the default set: everything outside
    :data:`EXCLUDED_TUXPAINT_DIRS`) or ``cartoon`` (the drawings in ``cartoon/`` folders, symbols excluded)."""
    if subset not in ("photos", "cartoon"):
        raise InputError(f"Tux Paint subset must be photos or cartoon, got {subset!r}")
    excluded = set(EXCLUDED_TUXPAINT_DIRS) - ({"cartoon"} if subset == "cartoon" else set())
    rows = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root)
        dirs = rel.parts[:-1]
        if excluded.intersection(dirs) or (subset == "cartoon" and "cartoon" not in dirs):
            continue
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = first[0].strip() if first else ""
        if not caption:
            continue
        rows.append({"id": str(rel.with_suffix("")), "image": str(png), "caption": caption,
                     "category": rel.parts[0]})
    return rows


def load_tuxpaint(root: Path | None = None, subset: str = "photos"):
    root = Path(root) if root else assets.ensure_asset("tuxpaint")
    return _dataset(tuxpaint_rows(root, subset), "tuxpaint" if subset == "photos" else f"tuxpaint-{subset}")


def load_pairs_file(path: Path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist")
    rows: list[dict[str, Any]] = []
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                raw = [json.loads(line) for line in f if line.strip()]
        elif path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                raw = list(csv.DictReader(f))
        else:
            raise InputError(f"pairs file {path}: expected .jsonl or .csv")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"pairs file {path}: unreadable ({e})") from None
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or "image" not in r or "caption" not in r:
            raise InputError(f"pairs file {path}: row {i} lacks 'image' and 'caption'")
        img = Path(str(r["image"]))
        img = img if img.is_absolute() else path.parent / img
        rows.append({"id": str(r.get("id", f"{i:06d}")), "image": str(img), "caption": r["caption"] or ""})
    return _dataset(rows, str(path))


def load_coco(root: Path, split: str = "val"):
    root = Path(root)
    ann = root / "annotations" / f"captions_{split}2017.json"
    if not ann.is_file():
        raise InputError(f"COCO: {ann} not found (expected --coco-root with annotations/ and {split}2017/)")
    data = json.loads(ann.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    first: dict[int, dict] = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], a)
    rows = [{"id": f"{img_id:012d}", "image": str(root / f"{split}2017" / files[img_id]), "caption": a["caption"]}
            for img_id, a in first.items()]
    return _dataset(rows, f"COCO {split}2017")


def load_wit1024():
    entry = DATASETS["wit1024"]
    try:
        from datasets import load_dataset

        ds = load_dataset(entry.hub_id, revision=entry.revision, split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types when offline
        raise ModelUnavailable(
            f"dataset wit1024 ({entry.hub_id}@{entry.revision}) is not available here: {str(e).splitlines()[0]}; "
            "download it where there is network and copy the HF cache, or pass a .jsonl of (image, caption)"
        ) from None
    rows = [{"id": f"{i:04d}", "image": ex["image"], "caption": ex["text"][0]} for i, ex in enumerate(ds)]
    return _dataset(rows, "wit1024")


def load_pairs(name: str, coco_root: str | None = None):
    """A source name (``tuxpaint``, ``tuxpaint-cartoon``, ``wit1024``, ``coco``) or a ``.jsonl``/``.csv`` path →
    Dataset."""
    if name == "tuxpaint":
        return load_tuxpaint()
    if name == "tuxpaint-cartoon":
        return load_tuxpaint(subset="cartoon")
    if name == "wit1024":
        return load_wit1024()
    if name == "coco":
        if not coco_root:
            raise InputError("--data coco needs --coco-root DIR")
        return load_coco(Path(coco_root))
    if name.endswith((".jsonl", ".csv")):
        return load_pairs_file(Path(name))
    raise InputError(f"unknown data source {name!r}: use tuxpaint, tuxpaint-cartoon, wit1024, coco, or a "
                     ".jsonl/.csv file")


def select(ds, n: int | None, seed: int = 0):
    """``n`` pairs drawn by ``default_rng(seed)`` (kept in id order); all pairs when ``n`` is None."""
    if n is None:
        return ds
    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    if n > len(ds):
        raise InputError(f"asked for {n} samples but the data has only {len(ds)}")
    if n == len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(idx.tolist())


def open_image(value: Any, ident: str = ""):
    """A path, PIL image or ``{"bytes"|"path"}`` dict → RGB PIL image; transparency is composited on white."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        else:
            img = Image.open(str(value))
        img.load()
    except Image.DecompressionBombError as e:  # a huge picture: refuse rather than exhaust memory
        raise InputError(f"image {ident or value!s} is too large to decode safely: {e}") from None
    except (OSError, UnidentifiedImageError, KeyError, TypeError) as e:
        raise InputError(f"unreadable or corrupt image {ident or value!s}: {e}") from None
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# duplicates


def image_key(value: Any) -> str:
    """A content hash of an image: the file's bytes for a path, the pixels (mode, size, bytes) for a PIL image."""
    import hashlib

    h = hashlib.sha256()
    if isinstance(value, (str, Path)):
        try:
            h.update(Path(value).read_bytes())
        except OSError as e:
            raise InputError(f"image {value}: cannot be read ({e})") from None
    else:
        img = open_image(value)
        h.update(f"{img.mode}{img.size}".encode())
        h.update(img.tobytes())
    return h.hexdigest()


def duplicate_groups(keys: list[Any]) -> list[list[int]]:
    """Index groups (in order) of the entries of ``keys`` that occur more than once."""
    where: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        where.setdefault(key, []).append(i)
    return [g for g in where.values() if len(g) > 1]


def duplicate_report(ds: Any, image_keys: list[str] | None = None) -> dict[str, Any]:
    """How many pairs share an identical caption (exact text, surrounding space ignored) or an identical image
    (content hash, :func:`image_key`; pass them if already computed), with the groups' ids."""
    ids = list(ds["id"])
    out: dict[str, Any] = {}
    for name, keys in (("captions", [c.strip() for c in ds["caption"]]),
                       ("images", image_keys or [image_key(v) for v in ds["image"]])):
        groups = duplicate_groups(keys)
        out[name] = {"pairs_sharing": sum(map(len, groups)), "groups": len(groups),
                     "group_ids": [[ids[i] for i in g] for g in groups]}
    return out


def dedupe(ds: Any, image_keys: list[str] | None = None) -> tuple[Any, list[str]]:
    """Keep the first pair (in the selection's id order) of each identical caption and of each identical image;
    returns the kept pairs and the ids left out."""
    seen_captions: set[str] = set()
    seen_images: set[str] = set()
    keep, dropped = [], []
    keys = image_keys or [image_key(v) for v in ds["image"]]
    for i, (pid, caption, m) in enumerate(zip(ds["id"], ds["caption"], keys)):
        c = caption.strip()
        if c in seen_captions or m in seen_images:
            dropped.append(pid)
            continue
        seen_captions.add(c)
        seen_images.add(m)
        keep.append(i)
    return ds.select(keep), dropped
