"""An on-disk, memory-mapped table of frozen-encoder features, written once and reused.

A store is a folder: ``features.npy`` ``[n_images, 2, P, D_v]`` float32 (index 1 = the horizontal mirror) opened
with ``numpy.load(mmap_mode="r")`` — a DataLoader worker reads only the rows of its batch, and nothing is held in
memory — and ``index.json`` (the encoder key, the image paths in row order). It is built through
:func:`pg_train.datasets.image_features`, so images already in the per-image feature cache are not encoded again,
in chunks of ``chunk`` images (memory bounded by a chunk), under a temp name renamed when complete.

For users who precompute features for a large dataset (``--feature-store FOLDER``); the offline recipe keeps its
cached features this way too (``--feature-store auto``: a store in the cache keyed by encoder and image set).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pg_analysis.errors import InputError

INDEX = "index.json"
FEATURES = "features.npy"


def store_key(encoder: dict[str, Any], paths: list[str]) -> str:
    """The name of the store of these images under this encoder (``--feature-store auto``)."""
    h = hashlib.sha256(json.dumps(encoder, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:24]


class FeatureStore:
    """Read side of a store. Picklable: the memory map is opened lazily in each process that reads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX).read_text())
            self.encoder, self.paths = index["encoder"], index["paths"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"feature store {self.folder} is unreadable ({e}); remove it to rebuild") from None
        self.row_of = {p: i for i, p in enumerate(self.paths)}
        self._table: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}

    @property
    def table(self) -> np.ndarray:
        if self._table is None:
            self._table = np.load(self.folder / FEATURES, mmap_mode="r")
        return self._table

    def __len__(self) -> int:
        return len(self.paths)

    def row(self, path: str) -> int:
        """The row of image ``path``; an :class:`InputError` when the store does not hold it."""
        try:
            return self.row_of[path]
        except KeyError:
            raise InputError(f"image {path} is not in the feature store {self.folder}") from None

    def features(self, rows: list[int], copies: list[int] | None = None) -> torch.Tensor:
        """``[len(rows), P, D_v]``: the image (copy 0) or its mirror (copy 1) of each row."""
        copies = copies if copies is not None else [0] * len(rows)
        return torch.from_numpy(np.stack([self.table[r, c] for r, c in zip(rows, copies)]))

    def all_features(self, copies: list[int] | None = None) -> torch.Tensor:
        """Every row, in row order (the offline recipe's warm-up reads all of them: a few hundred images)."""
        return self.features(list(range(len(self))), copies)

    def check(self, encoder: dict[str, Any]) -> None:
        if json.dumps(self.encoder, sort_keys=True, default=str) != json.dumps(encoder, sort_keys=True, default=str):
            raise InputError(f"feature store {self.folder} was built by another encoder or preprocessing; choose "
                             "another --feature-store folder or remove it")


def open_or_build(folder: Path, vlm: Any, paths: list[str], cache_dir: Path | None, chunk: int = 256,
                  progress: bool = True) -> FeatureStore:
    """The store in ``folder`` for these images under ``vlm``'s encoder: opened when it exists (its encoder must
    match, and it must hold every image), else built."""
    from .datasets import encoder_key, image_features

    encoder = encoder_key(vlm)
    if (folder / INDEX).is_file():
        store = FeatureStore(folder)
        store.check(encoder)
        missing = [p for p in paths if p not in store.row_of]
        if missing:
            raise InputError(f"feature store {folder} lacks {len(missing)} of the training images (e.g. "
                             f"{missing[0]}); build one for this data in another folder")
        return store
    if not paths:
        raise InputError("the training data has no images to store features of")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        table = None
        bar = tqdm(total=len(paths), desc="feature store", unit="img", disable=not progress)
        for start in range(0, len(paths), chunk):
            feats = image_features(vlm, paths[start:start + chunk], cache_dir, progress=False).numpy()
            if table is None:
                table = np.lib.format.open_memmap(tmp / FEATURES, mode="w+", dtype=np.float32,
                                                  shape=(len(paths), *feats.shape[1:]))
            table[start:start + len(feats)] = feats
            bar.update(len(feats))
        bar.close()
        table.flush()
        del table
        (tmp / INDEX).write_text(json.dumps({"encoder": encoder, "paths": paths}, default=str))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureStore(folder)
