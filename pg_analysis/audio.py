"""Sound–caption pairs: the audio modality's data.

A sound is an audio file decoded by libsndfile (PyPI ``soundfile``: WAV, FLAC, Ogg Vorbis, …), mixed to mono and
resampled to the encoder's rate (:func:`load_audio`); a file that does not decode is one :class:`InputError` line.

The offline source is Tux Paint's stamps again (asset ``tuxpaint-sounds``): the sound effects outside ``symbols/``
whose stamp has an English caption (``animals/mammals/bovines/sheep.ogg`` → "A sheep."), and the English spoken
descriptions (``*_desc.ogg``), kept apart as ``kind`` ``effect`` / ``description``. Pairs as a ``datasets.Dataset``:
``id``, ``audio`` (a path), ``caption``, ``kind``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

SOUNDS_FILE = "pairs.jsonl"


def load_audio(path: Any, sampling_rate: int = 16000, ident: str = "") -> np.ndarray:
    """``path`` → mono float32 samples at ``sampling_rate`` (polyphase resampling)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as e:
        raise InputError(f"audio {ident or path}: does not decode ({str(e).splitlines()[0]})") from None
    if data.size == 0:
        raise InputError(f"audio {ident or path}: no samples")
    mono = data.mean(axis=1)
    if rate != sampling_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(rate), int(sampling_rate))
        mono = resample_poly(mono, sampling_rate // g, int(rate) // g).astype(np.float32)
    return mono


def english_caption(txt: Path) -> str:
    """The first line of a Tux Paint stamp's ``.txt`` (its English caption), or ``""``."""
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines else ""


def sound_rows(stamps: Path) -> list[dict[str, str]]:
    """Every ``.ogg`` sound effect (``X.ogg``) and English spoken description (``X_desc.ogg``) outside ``symbols/``
    whose stamp ``X.txt`` has an English caption."""
    rows = []
    for ogg in sorted(Path(stamps).rglob("*.ogg")):
        rel = ogg.relative_to(stamps)
        if rel.parts[0] == "symbols":
            continue
        stem, kind = ogg.stem, "effect"
        if stem.endswith("_desc"):
            stem, kind = stem[: -len("_desc")], "description"
        elif "_desc_" in stem:
            continue  # a description in another language
        txt = ogg.with_name(f"{stem}.txt")
        caption = english_caption(txt) if txt.is_file() else ""
        if caption:
            rows.append({"id": str(rel.with_suffix("")), "audio": str(rel), "caption": caption, "kind": kind})
    return rows


def load_sound_pairs(path: Path, kind: str | None = "effect"):
    """A ``.jsonl`` of sound pairs (``audio`` relative to the file's folder, ``caption``; ``id``, ``kind``
    optional) → Dataset; ``kind``: keep only that kind (None: all)."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise InputError(f"sound pairs file {path} does not exist")
    try:
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"sound pairs file {path}: unreadable ({e})") from None
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or "audio" not in r or "caption" not in r:
            raise InputError(f"sound pairs file {path}: row {i} lacks 'audio' and 'caption'")
        pid = str(r.get("id", f"{i:06d}"))
        if not isinstance(r["caption"], str) or not r["caption"].strip():
            raise InputError(f"sound pairs file {path}: empty caption for {pid}")
        if kind is not None and r.get("kind", "effect") != kind:
            continue
        audio = Path(str(r["audio"]))
        rows.append({"id": pid, "audio": str(audio if audio.is_absolute() else path.parent / audio),
                     "caption": r["caption"], "kind": str(r.get("kind", "effect"))})
    if not rows:
        raise InputError(f"sound pairs file {path}: no sound–caption pairs")
    return Dataset.from_list(sorted(rows, key=lambda r: r["id"]))
