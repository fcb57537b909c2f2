"""Training data: LLaVA conversation JSON, the offline Tux Paint instruction builder, cached encoder features,
tokenised examples and batches.

LLaVA JSON: a list of records ``{"id", "image" (path relative to the image root; optional), "conversations": [...]}``.
Records written by :func:`build_tuxpaint_instructions` carry extra fields the evaluation uses: ``task``
(``caption`` / ``mcq`` / ``what``), ``caption`` (the English caption), and for MCQ ``options`` and ``answer``
(the correct letter).

The frozen encoder's output is computed once per image (and for its horizontal mirror, a free augmentation) and
cached on disk (:func:`image_features`), keyed by everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pg_analysis.errors import InputError
from pg_analysis.runs import DATA_MANIFEST
from pg_analysis.runinfo import atomic_write_bytes, atomic_write_json

from .conversations import IMAGE_TOKEN, encode_conversation

log = logging.getLogger(__name__)

LETTERS = "ABCD"
MCQ_QUESTION = "Which of these is shown?"
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
WHAT_QUESTION = "What is this?"
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------------------------
# LLaVA JSON


def load_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Read LLaVA-format records; resolve ``image`` against ``image_root`` (default: the JSON's folder) and check
    each file exists."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of records")
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for i, r in enumerate(records):
        where = f"{path.name} record {r.get('id', i) if isinstance(r, dict) else i}"
        if not isinstance(r, dict) or "conversations" not in r:
            raise InputError(f"{where}: needs 'conversations'")
        r = dict(r)
        r.setdefault("id", f"{i:06d}")
        if r.get("image"):
            img = Path(r["image"])
            img = img if img.is_absolute() else root / img
            if not img.is_file():
                raise InputError(f"{where}: image file {img} not found")
            r["image_path"] = str(img)
        out.append(r)
    return out


def _human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


def mcq_prompt(options: list[str], question: str = MCQ_QUESTION) -> str:
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join([question, *lines, MCQ_INSTRUCTION])


def mcq_record(base: dict[str, Any], pool: list[str], answer: int, rng: np.random.Generator,
               question: str = MCQ_QUESTION, weights: np.ndarray | None = None) -> dict[str, Any]:
    """A 4-way multiple-choice record for ``base`` (``image``, ``caption``, ``image_id``): three distractors drawn
    from ``pool`` (captions that differ from ``base["caption"]``; with probabilities ``weights`` when given), the
    caption placed at option ``answer``."""
    letter = LETTERS[answer]
    distractors = [pool[j] for j in rng.choice(len(pool), size=3, replace=False, p=weights)]
    options = distractors[:answer] + [base["caption"]] + distractors[answer:]
    return {**base, "id": f"{base['image_id']}#mcq{letter}", "task": "mcq", "options": options, "answer": letter,
            "conversations": [_human(f"{IMAGE_TOKEN}\n{mcq_prompt(options, question)}"), _gpt(letter)]}


def split_ids(ids: list[str], seed: int, val_frac: float, test_frac: float) -> dict[str, list[str]]:
    """Deterministic split by image id: a seeded permutation of the sorted ids; test first, then val."""
    ids = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test, n_val = round(test_frac * len(ids)), round(val_frac * len(ids))
    pick = [ids[i] for i in order]
    return {"test": sorted(pick[:n_test]), "val": sorted(pick[n_test:n_test + n_val]),
            "train": sorted(pick[n_test + n_val:])}


def manifest_image_root(manifest: dict[str, Any], data_dir: str | Path) -> str | None:
    """The folder a built data folder's records name their inputs relative to: the manifest's ``image_root``, a
    relative one read against the data folder itself (the molecule builder's ``.smi`` files live there)."""
    root = manifest.get("image_root")
    if root is None:
        return None
    return str(Path(root) if Path(root).is_absolute() else Path(data_dir) / root)


def build_tuxpaint_instructions(out_dir: str | Path, seed: int = 0, val_frac: float = 0.05, test_frac: float = 0.23,
                                pairs: Any = None, extra_train: Any = None) -> dict[str, Any]:
    """Write the offline instruction data (LLaVA JSON) from image–caption pairs (default: the Tux Paint stamps;
    any ``pg_analysis.data`` pairs dataset) into ``out_dir``.

    Per split: ``{split}_caption.json`` (stage 1: ``<image>`` → caption), ``{split}_mcq.json`` (4 questions per
    image, the correct option rotated over A–D, three distractor captions drawn from the same split) and
    ``{split}_what.json`` ("What is this?" → caption). Images are split, never questions; captions that repeat
    (case-insensitive) are never options of the same question. Deterministic in ``seed``.
    ``extra_train``: more pairs (e.g. ``tuxpaint-cartoon``) added to the training split only; the split of ``pairs``
    is unchanged, and an extra pair whose caption (case-insensitive) is a val or test caption, or whose id is
    already taken, is left out (counted in ``manifest["extra_train"]``).
    Image paths are relative to ``manifest["image_root"]`` (absolute). Returns the manifest, also written to
    ``manifest.json``.
    """
    from pg_analysis.data import load_tuxpaint

    ds = pairs if pairs is not None else load_tuxpaint()
    rows = {r["id"]: r for r in ds}
    splits = split_ids(list(rows), seed, val_frac, test_frac)
    extra_info = None
    if extra_train is not None:
        held_out = {rows[i]["caption"].strip().lower() for s in ("val", "test") for i in splits[s]}
        added = [r for r in extra_train if r["id"] not in rows and r["caption"].strip().lower() not in held_out]
        extra_info = {"offered": len(extra_train), "added": len(added), "left_out": len(extra_train) - len(added)}
        rows.update({r["id"]: r for r in added})
        splits["train"] = sorted(splits["train"] + [r["id"] for r in added])
    image_root = Path(os.path.commonpath([str(Path(r["image"]).resolve().parent) for r in rows.values()]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"image_root": str(image_root), "seed": seed, "val_frac": val_frac,
                                "test_frac": test_frac, "files": {}, "counts": {}}
    if extra_info is not None:
        manifest["extra_train"] = extra_info
    for s_i, (split, ids) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, s_i])
        caption_of = {i: rows[i]["caption"].strip() for i in ids}
        records: dict[str, list[dict[str, Any]]] = {"caption": [], "mcq": [], "what": []}
        for img_id in ids:
            cap = caption_of[img_id]
            image = str(Path(rows[img_id]["image"]).resolve().relative_to(image_root))
            base = {"image": image, "caption": cap, "image_id": img_id}
            records["caption"].append({**base, "id": f"{img_id}#caption", "task": "caption",
                                       "conversations": [_human(IMAGE_TOKEN), _gpt(cap)]})
            records["what"].append({**base, "id": f"{img_id}#what", "task": "what",
                                    "conversations": [_human(f"{IMAGE_TOKEN}\n{WHAT_QUESTION}"), _gpt(cap)]})
            pool = sorted({c for j, c in caption_of.items() if c.lower() != cap.lower()})
            if len(pool) < 3:
                continue
            records["mcq"] += [mcq_record(base, pool, k, rng) for k in range(len(LETTERS))]
        _write_split(out_dir, split, records, len(ids), manifest)
    atomic_write_json(out_dir / DATA_MANIFEST, manifest)
    return manifest


def _write_split(out_dir: Path, split: str, records: dict[str, list[dict[str, Any]]], n_inputs: int,
                 manifest: dict[str, Any]) -> None:
    """``{split}_{task}.json`` per task, named and counted in ``manifest``."""
    for task, recs in records.items():
        name = f"{split}_{task}.json"
        atomic_write_json(out_dir / name, recs)
        manifest["files"][f"{split}_{task}"] = name
        manifest["counts"][f"{split}_{task}"] = len(recs)
    manifest["counts"][f"{split}_images"] = n_inputs


MOLECULE_MCQ_QUESTION = "Which class of compounds is this molecule?"
MOLECULE_WHAT_QUESTION = "What is this molecule?"
MOLECULES_DIR = "molecules"


def _file_name(ident: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ident).strip("._") or "molecule"


def build_molecule_instructions(out_dir: str | Path, pairs: Any, seed: int = 0, val_frac: float = 0.05,
                                test_frac: float = 0.23) -> dict[str, Any]:
    """Write the offline molecule instruction data (LLaVA JSON; MolCA-style tasks) from molecule pairs
    (``id``, ``smiles``, ``caption`` "name, class phrase", ``category``) into ``out_dir``, split by molecule.

    Each molecule's SMILES goes to ``molecules/<id>.smi`` (the records' ``image``: the input file, as an image's).
    Per split: ``{split}_caption.json`` (stage 1: ``<image>`` → its caption), ``{split}_mcq.json`` (4 class
    questions per molecule: its class phrase and three other classes', drawn about as often as each class is an
    answer in the split, the answer rotated over A–D; ``caption`` = the class phrase) and ``{split}_what.json`` ("What is this molecule?" → its name; ``candidates``: the name and
    three other names of the split, for name ranking). Records carry ``modality: molecule`` (text twins read
    ``Molecule: …``). Deterministic in ``seed``. Returns the manifest, also written to ``manifest.json``."""
    from pg_analysis.molecules import CLASS_PHRASE, check_smiles

    rows = {}
    for r in pairs:
        if not r.get("category"):
            raise InputError(f"molecule {r['id']}: no category, so no class question can be asked (the pairs "
                             "need a 'category' column)")
        rows[r["id"]] = r
    phrase = {r["category"]: CLASS_PHRASE.get(r["category"], r["category"].replace("_", " ")) for r in rows.values()}
    classes = sorted(set(phrase.values()))
    if len(classes) < 4:
        raise InputError(f"class questions need at least 4 classes, the pairs have {len(classes)}")
    out_dir = Path(out_dir)
    root = out_dir / MOLECULES_DIR
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, r in rows.items():
        name = _file_name(i) + ".smi"
        if name in files.values():
            raise InputError(f"molecule ids {i!r} and another one give the same file name {name}")
        files[i] = name
        text = f"{check_smiles(r['smiles'], i)} {i}\n".encode()
        if not (root / name).is_file() or (root / name).read_bytes() != text:  # unchanged: cached features hold
            atomic_write_bytes(root / name, text)
    splits = split_ids(list(rows), seed, val_frac, test_frac)
    # the .smi files live in the data folder: their root is named relative to it, so a run folder can be moved
    manifest: dict[str, Any] = {"image_root": MOLECULES_DIR, "modality": "molecule", "seed": seed,
                                "val_frac": val_frac, "test_frac": test_frac, "files": {}, "counts": {}}
    for s_i, (split, ids) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, s_i])
        name_of = {}
        for i in ids:
            cap, suffix = rows[i]["caption"].strip(), ", " + phrase[rows[i]["category"]]
            name_of[i] = cap[:-len(suffix)] if cap.endswith(suffix) else cap
        records: dict[str, list[dict[str, Any]]] = {"caption": [], "mcq": [], "what": []}
        count = Counter(phrase[rows[i]["category"]] for i in ids)
        for i in ids:
            r, cls = rows[i], phrase[rows[i]["category"]]
            base = {"image": files[i], "image_id": i, "modality": "molecule", "smiles": r["smiles"]}
            records["caption"].append({**base, "id": f"{i}#caption", "task": "caption", "caption": r["caption"],
                                       "conversations": [_human(IMAGE_TOKEN), _gpt(r["caption"])]})
            others = sorted({n for j, n in name_of.items() if n.lower() != name_of[i].lower()})
            candidates = None
            if len(others) >= 3:
                candidates = [others[k] for k in rng.choice(len(others), 3, replace=False)]
                candidates.insert(int(rng.integers(4)), name_of[i])
            records["what"].append({**base, "id": f"{i}#what", "task": "what", "caption": name_of[i],
                                    "candidates": candidates,
                                    "conversations": [_human(f"{IMAGE_TOKEN}\n{MOLECULE_WHAT_QUESTION}"),
                                                      _gpt(name_of[i])]})
            # distractor classes about as often as they are answers in this split (counts + ½, so every class can
            # be drawn): an option's class alone says little about whether it is the answer (the no-molecule
            # control checks)
            pool = [c for c in classes if c != cls]
            p = np.array([count[c] + 0.5 for c in pool])
            weights = p / p.sum()
            records["mcq"] += [mcq_record({**base, "caption": cls}, pool, k, rng, MOLECULE_MCQ_QUESTION, weights)
                               for k in range(len(LETTERS))]
        _write_split(out_dir, split, records, len(ids), manifest)
    atomic_write_json(out_dir / DATA_MANIFEST, manifest)
    return manifest


def without_image(record: dict[str, Any], replacement: str = "") -> dict[str, Any]:
    """The record without its image: each ``<image>`` placeholder (with the line break after it, when
    ``replacement`` is empty) replaced by ``replacement`` in every turn; the other fields kept."""
    conv = [dict(t) for t in record["conversations"]]
    for t in conv:
        text = t["value"] if replacement else t["value"].replace(IMAGE_TOKEN + "\n", "")
        t["value"] = text.replace(IMAGE_TOKEN, replacement)
    return {k: v for k, v in record.items() if k not in ("image", "image_path")} | {"conversations": conv}


#: how a text twin introduces the caption that stands in for the input, by the record's ``modality``
TWIN_LABEL = {"image": "Picture", "molecule": "Molecule"}


def text_first(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record with its image replaced by its caption as text ("teach the answer format with text first":
    ``Picture: <caption>.``, ``Molecule: <caption>.`` for a record whose ``modality`` is molecule); None when the
    record has no caption."""
    if not record.get("caption") or not record.get("image"):
        return None
    return without_image(record, f"{TWIN_LABEL.get(record.get('modality', 'image'), 'Input')}: {record['caption']}.")


# ----------------------------------------------------------------------------------------------------------------
# cached encoder features


def _file_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:20]


def encoder_key(vlm: Any, mirror: bool = True) -> dict[str, Any]:
    """Everything that determines an image's frozen-encoder features: the vision tower's config and a weights
    checksum, the feature layer, selection and pooling, the image processor, and whether the mirror is kept."""
    from pg_analysis.features import FEATURES_VERSION

    model = vlm.model
    # LLaVA-style models hold the tower under .model.vision_tower (grounded LLaVA) or .vision_tower (plain
    # projector + T5); BLIP's is .vision_model and its features are the last hidden state
    tower = getattr(model, "vision_model", None) or getattr(model, "vision_tower", None) or model.model.vision_tower
    first = next(iter(tower.state_dict().values()))
    config = model.config
    key = {"version": FEATURES_VERSION, "vision": tower.config.to_dict(), "weights": float(first.float().sum()),
           "layer": getattr(config, "vision_feature_layer", "last"),
           "select": getattr(config, "vision_feature_select_strategy", "full"),
           "pool": getattr(config, "vision_pool", 1), "processor": vlm.image_processor.to_dict(), "per_image": True}
    if not mirror:
        key["mirror"] = False
    return key


def image_features(vlm: Any, paths: list[str], cache_dir: Path | None, batch_size: int = 32,
                   progress: bool = True, mirror: bool = True) -> torch.Tensor:
    """Frozen-encoder features of each image and of its mirror: ``[N, 2, P, D_v]`` fp32 (index 1 = flipped);
    ``mirror=False``: ``[N, 1, P, D_v]``, the images only (analysis, evaluation of many images). A SMILES tower's
    inputs are ``.smi`` files and their "mirror" another spelling of the molecule (:mod:`.inputs`).

    Cached under ``cache_dir`` one entry per image, keyed by the vision tower's config and weights checksum, the
    feature layer, selection and pooling, the image processor, and the image file (path, size, mtime): another
    split of the same pictures (another seed, the test images at evaluation) reads what an earlier run extracted,
    and only images never seen are encoded.
    """
    from pg_analysis.features import FeatureCache

    from .inputs import augmented_input, open_input

    if not paths:
        raise InputError("no images to encode: the records name no image files")
    model = vlm.model
    base = encoder_key(vlm, mirror)

    def encode(chunk: list[str]) -> torch.Tensor:
        pil = [open_input(vlm.image_processor, p) for p in chunk]
        both = pil + [augmented_input(vlm.image_processor, im) for im in pil] if mirror else pil
        feats = model.encode_images(vlm.pixel_values(both)).float().cpu()
        out = torch.stack([feats[:len(pil)], feats[len(pil):]], 1) if mirror else feats[:, None]
        if not torch.isfinite(out).all():
            raise InputError("encoder features contain NaN/inf (check the model and dtype)")
        return out

    cache = FeatureCache(Path(cache_dir)) if cache_dir is not None else None
    keys = {p: dict(base, image=_file_digest([p])) for p in dict.fromkeys(paths)}
    found = {p: cache.load("encoder", f) for p, f in keys.items()} if cache is not None else {}
    missing = [p for p in keys if found.get(p) is None]
    for start in tqdm(range(0, len(missing), batch_size), desc="encoder features", disable=not progress):
        chunk = missing[start:start + batch_size]
        for p, f in zip(chunk, encode(chunk)):
            found[p] = f
            if cache is not None:
                cache.save("encoder", keys[p], f.clone())
    log.info("encoder features of %d images (%d from the cache)", len(keys), len(keys) - len(missing))
    return torch.stack([found[p] for p in paths])


# ----------------------------------------------------------------------------------------------------------------
# tokenised examples and batches


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image: int  # index into the feature table; -1 = no image
    record: dict[str, Any] = field(default_factory=dict)


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, template: str, image_token_id: int,
                     n_image_tokens: int, image_index: dict[str, int], max_length: int | None = None,
                     generation: bool = False, system: str | None = None) -> list[Example]:
    """Encode records; ``generation=True`` drops the final assistant turn and encodes the prompt."""
    out = []
    for r in records:
        conv = r["conversations"][:-1] if generation else r["conversations"]
        path = r.get("image_path") or r.get("image")
        n_images = 1 if path else 0
        enc = encode_conversation(conv, tokenizer, template, image_token_id, n_image_tokens, n_images, max_length,
                                  generation=generation, where=f"record {r.get('id')}", system=system)
        if path and path not in image_index:
            raise InputError(f"record {r.get('id')}: image {path} has no features")
        out.append(Example(enc.input_ids, enc.labels, image_index[path] if path else -1, r))
    return out


def pad_rows(rows: list[list[int]], pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths → ``(ids [B, T], attention_mask [B, T])``, padded with ``pad_id`` on the
    right (training, continuations) or the left (prompts to generate from)."""
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side must be right or left, got {padding_side!r}")
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(t - len(r), t)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate(examples: list[Example], pad_id: int, features: torch.Tensor | None, flips: list[bool] | None = None,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch: ``input_ids``/``attention_mask``/``labels [B, T]`` and ``vision_features [n_images, P, D_v]``
    (images in row order; ``flips[i]`` picks the mirrored copy for example ``i``)."""
    ids, mask = pad_rows([e.input_ids for e in examples], pad_id, padding_side)
    labels, _ = pad_rows([e.labels for e in examples], -100, padding_side)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_image = [(i, e.image) for i, e in enumerate(examples) if e.image >= 0]
    if with_image:
        if features is None:
            raise InputError("a batch with images needs the feature table")
        rows = torch.tensor([img for _, img in with_image])
        which = torch.tensor([int(flips[i]) if flips else 0 for i, _ in with_image])
        batch["vision_features"] = features[rows, which]
    return batch
