"""What a VLM's encoder reads from a record's input file, per modality.

A LLaVA record names its input in ``image``: an image file for an image tower, a SMILES file (``.smi``: the SMILES,
then optionally whitespace and a name, on the first line) for a SMILES tower. Everything keyed by that path — the
feature cache and store, the batches, the evaluation — is the same for both; only three steps differ, and they are
the VLM's processor's:

============  ==========================================  =============================================
step          image tower (an HF image processor)          SMILES tower (:class:`SmilesProcessor`)
============  ==========================================  =============================================
open a file   :func:`pg_analysis.data.open_image`          the SMILES, checked by RDKit
augmented     its horizontal mirror                        another valid SMILES of the molecule (seeded)
to tensors    ``processor(images=…)["pixel_values"]``      the tokenizer's ids, right-padded to a fixed T
============  ==========================================  =============================================

The grounded model reads a SMILES tower's ids from ``pixel_values`` (``GroundedLlavaConfig.vision_slots``).
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import torch

from pg_analysis.errors import InputError

#: the sub-folder of a saved molecule VLM that holds its SMILES tokenizer
ENCODER_TOKENIZER = "encoder_tokenizer"


class SmilesProcessor:
    """A SMILES tower's processor: opens ``.smi`` files, makes the augmented spelling, tokenizes.

    ``__call__(images=[smiles, …])`` → ``{"pixel_values": LongTensor [n, max_length]}`` (the image processors'
    call and key, so batches and caches treat both alike); a SMILES longer than ``max_length`` tokens is an
    :class:`InputError`, never cut."""

    modality = "molecule"

    def __init__(self, tokenizer: Any, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, max_length

    def open(self, path: str | Path) -> str:
        from pg_analysis.molecules import check_smiles

        path = Path(path)
        if not path.is_file():
            raise InputError(f"molecule file {path} not found")
        try:
            line = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"molecule file {path}: unreadable ({e})") from None
        return check_smiles(line.split()[0] if line.strip() else "", str(path))

    @staticmethod
    def augmented(smiles: str) -> str:
        """Another valid spelling of the molecule (RDKit's random SMILES, seeded by the input: deterministic); the
        input itself when RDKit yields nothing else (a one-atom molecule)."""
        from rdkit import Chem

        mol = Chem.MolFromSmiles(smiles)
        seed = zlib.crc32(smiles.encode()) & 0x7FFFFFFF
        for alt in Chem.MolToRandomSmilesVect(mol, 8, randomSeed=seed):
            if alt != smiles:
                return alt
        return smiles

    def __call__(self, images: list[str], return_tensors: str = "pt", **_: Any) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(images), padding="max_length", max_length=self.max_length, truncation=False,
                             return_tensors=return_tensors)
        ids = enc["input_ids"]
        if ids.shape[1] > self.max_length:
            lengths = enc["attention_mask"].sum(1)
            worst = int(lengths.argmax())
            raise InputError(f"SMILES {images[worst]!r} has {int(lengths[worst])} tokens, more than the processor's "
                             f"max_length {self.max_length}")
        return {"pixel_values": ids}

    def to_dict(self) -> dict[str, Any]:
        """What determines the ids (a feature-cache key): the tokenizer's vocabulary and rules, and T."""
        spec = self.tokenizer.backend_tokenizer.to_str().encode()
        return {"tokenizer": hashlib.sha256(spec).hexdigest()[:20], "max_length": self.max_length}

    def save_pretrained(self, folder: str | Path) -> None:
        tokenizer_dir = Path(folder) / ENCODER_TOKENIZER
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(tokenizer_dir)

    @classmethod
    def from_pretrained(cls, load: Any) -> "SmilesProcessor":
        """``load(AutoTokenizer, subfolder)`` reads the tokenizer (a folder or a hub repo)."""
        tokenizer = load(ENCODER_TOKENIZER)
        return cls(tokenizer, int(tokenizer.model_max_length))


def open_input(processor: Any, path: str | Path) -> Any:
    """The input a record's file holds, as the processor takes it."""
    if isinstance(processor, SmilesProcessor):
        return processor.open(path)
    from pg_analysis.data import open_image

    if not Path(path).is_file():
        raise InputError(f"image file {path} not found")
    return open_image(path)  # an InputError for a damaged or oversized file


def augmented_input(processor: Any, item: Any) -> Any:
    """The free augmentation of an input: an image's mirror, a molecule's other spelling."""
    if isinstance(processor, SmilesProcessor):
        return processor.augmented(item)
    from PIL import ImageOps

    return ImageOps.mirror(item)


def flips_in_tensor(processor: Any) -> bool:
    """Whether the augmentation can be made on the processed tensor (an image: flip the last axis); a molecule's
    needs the SMILES, so only stored features carry it."""
    return not isinstance(processor, SmilesProcessor)
