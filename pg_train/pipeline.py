"""The training data pipeline: records streamed from LLaVA JSON/JSONL, tokenized and decoded in DataLoader
workers, in length-grouped batches — memory and time to the first step independent of the number of records.

- :class:`RecordIndex` — byte offsets of the records of one or more LLaVA files. A JSONL file is scanned for
  line starts (8 bytes per record); a JSON list (LLaVA's own format) is converted once to JSONL in the cache,
  streaming, never loaded whole. A record is read from disk when a worker asks for it; its byte length is the
  length the batches are grouped by (no tokenizing pass before step 1).
- :class:`TrainDataset` — one record → its tokens (and its text twin's), and its image: a row of the feature store,
  or the decoded, preprocessed pixels (the encoder then runs in the loop). A record that cannot be used (missing or
  corrupt image, ``<image>`` placeholders that do not match its images) comes back as ``{"error": ...}``; the loop
  skips it (counted) or stops with that one line (``--on-bad-record``).
- :class:`EpochSampler` — transformers' ``LengthGroupedSampler`` with a generator seeded by ``(seed, stage,
  epoch)``, so the batch order is a function of the position alone and a resumed run reads the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pg_analysis.errors import InputError

from .conversations import encode_conversation, encoder_decoder_split, image_instruction
from .datasets import text_first

_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# records on disk


def _json_list_to_jsonl(src: Path, dst: Path) -> int:
    """Stream the records of a JSON list in ``src`` into JSONL ``dst`` (temp name, then renamed); the count."""
    decoder = json.JSONDecoder()
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    n = 0
    try:
        with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
            buf, pos, started, done = "", 0, False, False
            while not done:
                more = f.read(_CHUNK)
                buf = buf[pos:] + more
                pos = 0
                while True:
                    while pos < len(buf) and (buf[pos].isspace() or (started and buf[pos] == ",")):
                        pos += 1
                    if pos == len(buf):
                        break
                    if not started:
                        if buf[pos] != "[":
                            raise InputError(f"{src}: expected a JSON list of records (or JSONL)")
                        started, pos = True, pos + 1
                        continue
                    if buf[pos] == "]":
                        done = True
                        break
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as e:
                        if more:  # the record runs past this chunk
                            break
                        raise InputError(f"{src}: not valid JSON ({e})") from None
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    n, pos = n + 1, end
                if not more and not done:
                    raise InputError(f"{src}: the JSON list is not closed (truncated file?)")
        tmp.rename(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _line_starts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offset and length of every non-blank line of ``path``."""
    starts, ends, offset = [np.zeros(1, np.int64)], [], 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK * 8):
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + offset
            ends.append(nl)
            starts.append(nl + 1)
            offset += len(chunk)
    starts_a = np.concatenate(starts)[:-1] if offset else np.zeros(0, np.int64)
    ends_a = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if len(ends_a) < len(starts_a):  # no newline after the last line
        ends_a = np.append(ends_a, offset)
    length = ends_a - starts_a
    keep = length > 1
    return starts_a[keep], length[keep]


class RecordIndex:
    """Records of LLaVA files, read on demand: ``len``, :meth:`record`, and ``lengths`` (bytes, for grouping).

    ``paths``: ``.jsonl`` files (one record per line) or ``.json`` lists; a ``.json`` list is converted once into
    ``cache_dir/records/`` (keyed by path, size and modification time). ``image_root``: what relative ``image``
    paths are relative to (default: each file's folder)."""

    def __init__(self, paths: list[str | Path], cache_dir: Path, image_root: str | Path | None = None):
        self.files: list[str] = []
        self.roots: list[str] = []
        starts, lengths, file_ids = [], [], []
        for path in map(Path, paths):
            if not path.is_file():
                raise InputError(f"data file {path} does not exist")
            lines = path if path.suffix == ".jsonl" else self._converted(path, Path(cache_dir) / "records")
            s, n = _line_starts(lines)
            starts.append(s)
            lengths.append(n)
            file_ids.append(np.full(len(s), len(self.files), np.int32))
            self.files.append(str(lines))
            self.roots.append(str(Path(image_root) if image_root is not None else path.parent))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self._handles: dict[int, Any] = {}
        self._pid = None

    @staticmethod
    def _converted(path: Path, folder: Path) -> Path:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]
        dst = folder / f"{path.stem}-{key}.jsonl"
        if not dst.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            _json_list_to_jsonl(path, dst)
        return dst

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def __len__(self) -> int:
        return len(self.starts)

    def record(self, i: int) -> dict[str, Any]:
        """Record ``i``: its JSON object with ``id`` (default: its position) and ``image_path`` (the resolved image
        file, when it names one; not checked here — the worker that loads it reports a missing file)."""
        if self._pid != os.getpid():  # file handles are per process (DataLoader workers fork)
            self._handles, self._pid = {}, os.getpid()
        f_id = int(self.file_ids[i])
        handle = self._handles.get(f_id)
        if handle is None:
            handle = self._handles[f_id] = open(self.files[f_id], "rb")
        handle.seek(int(self.starts[i]))
        line = handle.read(int(self.lengths[i]))
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{self.files[f_id]} record {i}: not valid JSON ({e})") from None
        if not isinstance(r, dict) or "conversations" not in r:
            raise InputError(f"{self.files[f_id]} record {i}: needs 'conversations'")
        r.setdefault("id", f"{i:06d}")
        if r.get("image"):
            img = Path(r["image"])
            r["image_path"] = str(img if img.is_absolute() else Path(self.roots[f_id]) / img)
        return r

    def records(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self.record(i)


# ----------------------------------------------------------------------------------------------------------------
# examples


class TrainDataset(Dataset):
    """Record ``i`` → ``{"input_ids", "labels", "image"?, "twin"?, "id"}`` or ``{"error": one line}``.

    ``image``: the record's feature-store row (``store`` given) or its preprocessed pixels ``[3, H, W]``
    (``image_processor`` given). ``twins``: also tokenize the record with its caption as text in place of the image
    (``twin``: ``(input_ids, labels)``, None without a caption). ``seq2seq`` (an encoder–decoder LM):
    ``input_ids`` is the prompt and ``labels`` the last answer (:func:`.conversations.encoder_decoder_split`)."""

    def __init__(self, index: RecordIndex, tokenizer: Any, template: str, image_token_id: int, n_image_tokens: int,
                 max_length: int, system: str | None = None, store: Any = None, image_processor: Any = None,
                 twins: bool = False, seq2seq: bool = False):
        if (store is None) == (image_processor is None):
            raise ValueError("give exactly one of store and image_processor")
        self.index, self.tokenizer, self.template = index, tokenizer, template
        self.image_token_id, self.n_image_tokens = image_token_id, n_image_tokens
        self.max_length, self.system, self.store, self.image_processor = max_length, system, store, image_processor
        self.twins, self.seq2seq = twins, seq2seq

    def __len__(self) -> int:
        return len(self.index)

    def _encode(self, record: dict[str, Any], n_images: int) -> tuple[list[int], list[int]]:
        enc = encode_conversation(record["conversations"], self.tokenizer, self.template, self.image_token_id,
                                  self.n_image_tokens, n_images, self.max_length, where=f"record {record.get('id')}",
                                  system=self.system)
        if self.seq2seq:
            return encoder_decoder_split(enc.input_ids, enc.labels)
        return enc.input_ids, enc.labels

    def _image(self, path: str) -> Any:
        if self.store is not None:
            return self.store.row(path)
        from .inputs import open_input

        item = open_input(self.image_processor, path)  # an InputError for a missing or damaged file
        return self.image_processor(images=[item], return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        record_id: Any = i
        try:
            record = self.index.record(i)
            record_id = record["id"]
            path = record.get("image_path")
            ids, labels = self._encode(record, 1 if path else 0)
            item: dict[str, Any] = {"id": record_id, "input_ids": ids, "labels": labels}
            if path:
                item["image"] = self._image(path)
                item["instruction"] = image_instruction(record["conversations"])
            if self.twins:
                twin = text_first(record)
                item["twin"] = self._encode(twin, 0) if twin is not None else None
            return item
        except InputError as e:
            return {"id": record_id, "error": str(e).splitlines()[0]}


def keep_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DataLoader's collate function: the items as they are (the loop builds the tensors, since a step decides
    whether its examples read the image or the caption)."""
    return items


class EpochSampler(Sampler):
    """Length-grouped batches in random order, seeded by ``(seed, stage, epoch)`` (``set_epoch``, called by
    accelerate's DataLoader, picks the epoch).

    transformers' ``get_length_grouped_indices`` (what its ``LengthGroupedSampler`` yields) sorts the samples of each
    mega-batch of ``group`` batches by length, longest first; its batches then come in that sorted order. Here the
    batches of each mega-batch are dealt in a seeded random order instead (the run's longest batch still first, so
    memory peaks at once). Sorted order would run every mega-batch from its longest to its shortest records — on the
    offline data ~25 multiple-choice steps, then ~7 captioning steps, every cycle. Dealing within a mega-batch keeps
    every ``group`` consecutive steps a sample of the data's mix of lengths (tasks); dealing over the whole epoch
    lets one kind of batch run on for many steps (docs/experiments.md, 2026-12-02)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, stage: int, group: int | None = None):
        self.lengths, self.batch_size, self.seed, self.stage, self.epoch = lengths, batch_size, seed, stage, 0
        # transformers' default mega-batch when none is given, stated here so the deal knows its bounds
        self.group = group or max(1, min(len(lengths) // (4 * batch_size), 50))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        seed = int(np.random.SeedSequence([self.seed, self.stage, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        order = get_length_grouped_indices(self.lengths.tolist(), self.batch_size, mega_batch_mult=self.group,
                                           generator=generator)
        b = self.batch_size
        full = len(order) // b
        deal = []
        for start in range(0, full, self.group):
            size = min(self.group, full - start)
            deal += (start + torch.randperm(size, generator=generator)).tolist()
        first = deal.index(0)
        deal[0], deal[first] = deal[first], deal[0]  # the longest batch first
        return iter([i for k in deal for i in order[k * b:(k + 1) * b]] + order[full * b:])
