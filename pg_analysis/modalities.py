"""Modalities: what an encoder takes, how its pairs are read, and which encoder families serve it.

A modality names the registry kind of its encoders (``resolve_model(name, modality.kind)``), the pairs' input
column, its default encoder and pair source, and the sources that hold its inputs. Everything downstream of the
adapters (pooling, the alignment grid, the null, the plots) is the same for every modality.

=============  ===========  ==========  =====================================  ==========================
modality       kind         column      encoder families                       default pairs
=============  ===========  ==========  =====================================  ==========================
``image``      ``vision``   ``image``   clip, dinov2, vit                      ``tuxpaint``
``molecule``   ``molecule`` ``smiles``  albert, bert, roberta (SMILES models)  ``molecules`` (offline)
``audio``      ``audio``    ``audio``   whisper (its encoder)                  ``tuxpaint-sounds``
=============  ===========  ==========  =====================================  ==========================

``tuxpaint-sounds`` are Tux Paint's sound effects; ``tuxpaint-descriptions`` its English spoken descriptions
(a voice saying the stamp's name) of the same stamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .registry import AUDIO_FAMILIES, MOLECULE_FAMILIES, VISION_FAMILIES, Registry


@dataclass(frozen=True)
class Modality:
    name: str
    kind: str  # the registry kind of its encoders
    column: str  # the pairs' input column
    families: tuple[str, ...]
    default_encoder: str
    default_data: str
    sources: tuple[str, ...]  # --data names that hold this modality's inputs (a file of pairs is always accepted)
    default_pooling: str = "cls"  # how an encoder layer's states are pooled unless told (audio has no CLS)
    noun: str = ""  # one input, in words ("an image", "a molecule", "a sound")


MODALITIES: Registry[Modality] = Registry("modality")
MODALITIES.register("image", Modality("image", "vision", "image", VISION_FAMILIES, "dinov2-small-imgfocus",
                                      "tuxpaint", ("tuxpaint", "tuxpaint-cartoon", "wit1024", "coco"), noun="an image"))
MODALITIES.register("molecule", Modality("molecule", "molecule", "smiles", MOLECULE_FAMILIES, "smiles-albert",
                                         "molecules", ("molecules",), noun="a molecule"))
MODALITIES.register("audio", Modality("audio", "audio", "audio", AUDIO_FAMILIES, "whisper-tiny-en",
                                      "tuxpaint-sounds", ("tuxpaint-sounds", "tuxpaint-descriptions"), "mean", "a sound"))


def get_modality(name: str) -> Modality:
    return MODALITIES.lookup(name)


def load_pairs(modality: Modality, data: str, coco_root: str | None = None):
    """The pairs of ``data`` for ``modality`` as a Dataset with columns ``id``, ``modality.column``, ``caption``; a
    source that holds another modality's inputs is one clear line."""
    from . import data as data_mod

    for other in MODALITIES.values():
        if other is not modality and data in other.sources:
            raise InputError(f"--data {data} holds {other.name} inputs, not {modality.name} inputs "
                             f"(for --modality {modality.name}: {', '.join(modality.sources)} or a pairs file)")
    if modality.name == "image":
        return data_mod.load_pairs(data, coco_root)
    from . import assets, molecules
    from .molecule_assets import MOLECULES_FILE

    if modality.name == "audio":
        from .audio import SOUNDS_FILE, load_sound_pairs

        if data in ("tuxpaint-sounds", "tuxpaint-descriptions"):
            kind = "effect" if data == "tuxpaint-sounds" else "description"
            return load_sound_pairs(assets.ensure_asset("tuxpaint-sounds") / SOUNDS_FILE, kind)
        if data.endswith(".jsonl"):
            return load_sound_pairs(Path(data), kind=None)
        raise InputError(f"unknown sound source {data!r}: use {', '.join(modality.sources)} or a .jsonl with "
                         "audio and caption")
    if data == "molecules":
        return molecules.load_molecule_pairs(assets.ensure_asset("molecules") / MOLECULES_FILE)
    if data.endswith(".jsonl"):
        return molecules.load_molecule_pairs(Path(data))
    raise InputError(f"unknown molecule source {data!r}: use {', '.join(modality.sources)} or a .jsonl with "
                     "smiles and caption")


def item_key(modality: Modality, value: Any) -> str:
    """What makes two inputs the same (duplicates, cache keys): an image's or a sound file's content hash, a
    molecule's canonical SMILES."""
    if modality.name in ("image", "audio"):
        from .data import image_key

        return image_key(value)
    from .molecules import canonical_smiles

    return canonical_smiles(str(value))
