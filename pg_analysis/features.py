"""Per-layer pooled features and their on-disk cache.

- :func:`pool_vision` / :func:`pool_text` — pure pooling over one layer's hidden states.
- :func:`extract_vision` / :func:`extract_text` — one forward pass per batch collects every layer → ``[L, N, D]``.
- :class:`FeatureCache` — safetensors + JSON meta, keyed by a hash of everything that determines the features
  (model source and revision, data selection, pooling, dtype, image preprocessing, tokenizer, code version).
  A corrupt or partial file is detected (load failure, key or shape mismatch, non-finite values) and recomputed;
  writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from .errors import InputError
from .runinfo import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

#: Bump when extraction changes in a way that changes the numbers; part of every cache key.
FEATURES_VERSION = 1

VISION_POOLING = ("cls", "mean")
TEXT_POOLING = ("mean", "last")


def pool_vision(hidden: torch.Tensor, pooling: str, n_prefix: int = 1,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden: [B, P, D]`` → ``[B, D]``: the CLS token (``cls``) or the mean of the patch tokens (``mean``): those
    after the ``n_prefix`` CLS / register tokens, or those ``tokens [B, P]`` marks (a molecule's atoms, padding
    left out)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        if tokens is None:
            return hidden[:, n_prefix:].mean(1)
        w = tokens.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1)
    raise InputError(f"unknown vision pooling {pooling!r}; choose from {VISION_POOLING}")


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``hidden: [B, T, D]``, ``attention_mask: [B, T]`` → ``[B, D]``.

    ``mean``: mean over attended tokens (BOS included when the tokenizer adds one, as Huh et al.);
    ``last``: the last attended token (works for left and right padding).
    """
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if pooling == "last":
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = (attention_mask.long() * (pos + 1)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise InputError(f"unknown text pooling {pooling!r}; choose from {TEXT_POOLING}")


def _batches(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _stack_layers(chunks: list[list[torch.Tensor]]) -> torch.Tensor | list[torch.Tensor]:
    """``chunks[batch][layer] : [B, D]`` → ``[L, N, D]`` fp32 on CPU; a list of ``[N, D_l]`` when the widths differ
    by layer (a CNN's stages)."""
    layers = [torch.cat([c[layer] for c in chunks]).float().cpu() for layer in range(len(chunks[0]))]
    return torch.stack(layers) if len({x.shape[-1] for x in layers}) == 1 else layers


def n_samples(layers: torch.Tensor | list[torch.Tensor]) -> int:
    """Samples of a layer stack: ``[L, N, D]`` or a list of ``[N, D_l]``."""
    return int(layers[0].shape[0])


def extract_vision(adapter: Any, items: list[Any], ids: list[str], pooling: str = "cls", batch_size: int = 16,
                   progress: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Pooled features of every hidden state of an encoder (images, molecules, sounds: the adapter's ``encode``) →
    ``[L, N, D]``, or a list of ``[N, D_l]`` when the widths differ by layer."""
    if pooling not in VISION_POOLING:
        raise InputError(f"unknown encoder pooling {pooling!r}; choose from {VISION_POOLING}")
    if pooling == "cls" and not getattr(adapter, "has_cls", True):
        raise InputError(f"{adapter.entry.alias} ({adapter.family}) has no CLS token: pass --vision-pooling mean")
    chunks = []
    for sl in tqdm(list(_batches(len(items), batch_size)), desc=f"encoder {adapter.entry.alias}", disable=not progress):
        hs, tokens = adapter.encode(items[sl], ids[sl])
        chunks.append([pool_vision(h, pooling, adapter.n_prefix_tokens, tokens).float().cpu() for h in hs])
    return _stack_layers(chunks)


def extract_text(adapter: Any, captions: list[str], pooling: str = "mean", batch_size: int = 32,
                 max_length: int = 128, progress: bool = True) -> torch.Tensor:
    """Pooled features of every hidden state of a language model over the captions → ``[L, N, D]``."""
    if pooling not in TEXT_POOLING:
        raise InputError(f"unknown text pooling {pooling!r}; choose from {TEXT_POOLING}")
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise InputError(f"caption {i} is empty")
    tok = adapter.tokenizer
    chunks = []
    for sl in tqdm(list(_batches(len(captions), batch_size)), desc=f"text {adapter.entry.alias}", disable=not progress):
        enc = tok(captions[sl], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hs = adapter.hidden_states(enc["input_ids"], enc["attention_mask"])
        mask = enc["attention_mask"].to(hs[0].device)
        chunks.append([pool_text(h, mask, pooling).float().cpu() for h in hs])
    return _stack_layers(chunks)


# ----------------------------------------------------------------------------------------------------------------
# cache


def _shape(feats: torch.Tensor | list[torch.Tensor]) -> list:
    return list(feats.shape) if isinstance(feats, torch.Tensor) else [list(x.shape) for x in feats]


def _finite(feats: torch.Tensor | list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in (feats if isinstance(feats, list) else [feats]))


def cache_key(fields: dict[str, Any]) -> str:
    """Stable hash of a JSON-able dict (sorted keys)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """Feature tensors on disk under ``root`` (``[L, N, D]`` layer stacks from pg-align, one image's ``[2, P, D_v]``
    from pg-train), one ``<name>-<hash>.safetensors`` + ``.json`` each."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def paths(self, name: str, fields: dict[str, Any]) -> tuple[Path, Path]:
        stem = f"{name}-{cache_key(fields)}"
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.json"

    def load(self, name: str, fields: dict[str, Any]) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        data_path, meta_path = self.paths(name, fields)
        if not data_path.is_file() or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            blob = data_path.read_bytes()
            tensors = load(blob)
            feats = tensors["features"] if "features" in tensors else [tensors[k] for k in sorted(tensors)]
        except (OSError, json.JSONDecodeError, SafetensorError, KeyError, RuntimeError, ValueError) as e:
            log.warning("feature cache %s is unreadable (%s); recomputing", data_path.name, e)
            return None
        if meta.get("fields") != json.loads(json.dumps(fields, sort_keys=True, default=str)) \
                or _shape(feats) != meta.get("shape") or not _finite(feats):
            log.warning("feature cache %s does not match its metadata; recomputing", data_path.name)
            return None
        if meta.get("sha256") != hashlib.sha256(blob).hexdigest():
            log.warning("feature cache %s fails its checksum (changed on disk); recomputing", data_path.name)
            return None
        return feats

    def save(self, name: str, fields: dict[str, Any], feats: torch.Tensor) -> Path:
        from safetensors.torch import save

        data_path, meta_path = self.paths(name, fields)
        tensors = {"features": feats.contiguous()} if isinstance(feats, torch.Tensor) else \
            {f"layer_{i:04d}": x.contiguous() for i, x in enumerate(feats)}
        blob = save(tensors)
        atomic_write_bytes(data_path, blob)
        atomic_write_json(meta_path, {"fields": json.loads(json.dumps(fields, sort_keys=True, default=str)),
                                      "shape": _shape(feats), "sha256": hashlib.sha256(blob).hexdigest()})
        return data_path

    def check_writable(self) -> None:
        """One clear :class:`InputError` now, before features are computed, if the cache cannot be written."""
        from .runinfo import writable_folder_problem

        problem = writable_folder_problem(self.root)
        if problem:
            raise InputError(f"feature cache {self.root}: {problem} (pass --cache-dir)")

    def get_or_compute(self, name: str, fields: dict[str, Any], compute) -> tuple[torch.Tensor, bool]:
        """Return ``(features, from_cache)``."""
        feats = self.load(name, fields)
        if feats is not None:
            return feats, True
        self.check_writable()
        feats = compute()
        if not _finite(feats):
            raise InputError(f"{name}: extracted features contain NaN/inf (check the model and dtype)")
        self.save(name, fields, feats)
        return feats, False
