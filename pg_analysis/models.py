"""Load vision encoders and language models from registry entries; one adapter per family.

An adapter yields per-layer hidden states ``[batch, pos, d]`` in the toolkit's convention: index 0 is the embeddings
output, index i the output of block i. (For LLaMA-family LMs HF applies the final norm to the last entry, as in Huh
et al.'s reference code; we keep HF's tuple unchanged.)

Device and dtype are chosen once (:func:`pick_runtime`) and recorded with every result.

Hub models: if a hub id is in the local HF cache it is loaded from there without touching the network; otherwise the
hub is probed once (a 3 s connection attempt) and, if unreachable, :class:`ModelUnavailable` says how to provide the
model — instead of the minute of retries ``from_pretrained`` spends before failing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import assets
from .errors import InputError, ModelUnavailable
from .registry import (AUDIO_FAMILIES, CNN_FAMILIES, LM_FAMILIES, MOLECULE_FAMILIES, VISION_FAMILIES, ModelEntry,
                       family_of_model_type)

log = logging.getLogger(__name__)

HF_ENDPOINT = "huggingface.co"


# ----------------------------------------------------------------------------------------------------------------
# runtime


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "reason": self.reason}


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_runtime(device: str | None = None, dtype: str | None = None) -> Runtime:
    """Decide device and dtype once. Default: CUDA if present (bf16 on compute capability ≥ 8.0), else CPU fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA device is available")
    if dtype is not None:
        if dtype not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
        return Runtime(dev, _DTYPES[dtype], f"dtype {dtype} requested")
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8:
        return Runtime(dev, torch.bfloat16, "CUDA compute capability >= 8.0: bf16")
    return Runtime(dev, torch.float32, f"{dev.type}: fp32")


# ----------------------------------------------------------------------------------------------------------------
# sources


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((HF_ENDPOINT, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(repo_id: str, revision: str | None, filename: str = "config.json", repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    return isinstance(hit, str)


def resolve_source(entry: ModelEntry) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` should read ``entry`` from, and the extra kwargs (revision, local_files_only)."""
    if entry.asset is not None:
        return str(assets.ensure_asset(entry.asset)), {}
    if entry.path is not None:
        if not Path(entry.path).is_dir():
            raise InputError(f"model folder {entry.path} does not exist")
        return entry.path, {}
    assert entry.hub_id is not None
    kw: dict[str, Any] = {"revision": entry.revision} if entry.revision else {}
    if _in_hf_cache(entry.hub_id, entry.revision):
        return entry.hub_id, {**kw, "local_files_only": True}
    if not hub_reachable():
        raise ModelUnavailable(
            f"model {entry.alias!r} ({entry.hub_id}) is not in the local HF cache and the hub is unreachable: "
            f"download it where there is network (`hf download {entry.hub_id}`) and copy the cache "
            f"(HF_HOME), or pass a local folder instead of {entry.alias!r} (no local folder of that name exists)")
    return entry.hub_id, kw


def load_pretrained(cls: Any, entry: ModelEntry, source: str, kw: dict[str, Any], **extra: Any) -> Any:
    """``cls.from_pretrained(source, **kw, **extra)`` for a resolved registry entry; a model that cannot be read
    here is one :class:`ModelUnavailable` line naming it."""
    try:
        return cls.from_pretrained(source, **kw, **extra)
    except OSError as e:
        raise ModelUnavailable(f"could not load {entry.alias!r} from {source}: {str(e).splitlines()[0]}") from None


def _family(entry: ModelEntry, source: str, kw: dict[str, Any]) -> tuple[str, Any]:
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, entry, source, kw)
    family = entry.family or family_of_model_type(config.model_type, entry.alias)
    return family, config


# ----------------------------------------------------------------------------------------------------------------
# adapters


@dataclass
class VisionAdapter:
    """A vision encoder with its image processor. ``hidden_states(pixel_values)`` → tuple of ``[B, P, D]``."""

    entry: ModelEntry
    family: str
    model: Any
    processor: Any
    runtime: Runtime

    @property
    def n_layers(self) -> int:
        """Number of hidden states: embeddings + blocks."""
        return self.model.config.num_hidden_layers + 1

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the patch grid (CLS, registers)."""
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def pixel_values(self, images: list) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        px = pixel_values.to(self.runtime.device, self.runtime.dtype)
        return self.model(pixel_values=px, output_hidden_states=True).hidden_states

    def encode(self, images: list[Any], ids: list[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Images (paths, PIL images, dataset dicts) → every hidden state, and no token mask (all patches count)."""
        from .data import open_image

        return self.hidden_states(self.pixel_values([open_image(x, i) for x, i in zip(images, ids)])), None

    has_cls = True


@dataclass
class ConvVisionAdapter(VisionAdapter):
    """A CNN image encoder (EfficientNet): each stage's feature map ``[B, C, H, W]`` as ``H·W`` tokens ``[B, HW, C]``;
    the states are the stem, every block and the head convolution. No CLS token: pooled by the mean."""

    has_cls = False

    @property
    def n_layers(self) -> int:
        return len(self.model.encoder.blocks) + 2

    @property
    def n_prefix_tokens(self) -> int:
        return 0

    @torch.no_grad()
    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        px = pixel_values.to(self.runtime.device, self.runtime.dtype)
        out = self.model(pixel_values=px, output_hidden_states=True)
        return tuple(h.flatten(2).transpose(1, 2) for h in (*out.hidden_states, out.last_hidden_state))


@dataclass
class TokenAdapter:
    """A transformer over tokens with its tokenizer (a causal LM's decoder, a SMILES encoder)."""

    entry: ModelEntry
    family: str
    model: Any
    tokenizer: Any
    runtime: Runtime

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers + 1


@dataclass
class MoleculeAdapter(TokenAdapter):
    """A SMILES encoder (BERT-style). ``encode(smiles, ids)`` → every hidden state ``[B, T, D]`` and the mask of the
    atom tokens (``[CLS]``, ``[SEP]`` and padding left out)."""

    n_prefix_tokens = 1  # [CLS]

    @torch.no_grad()
    def encode(self, smiles: list[str], ids: list[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        from .molecules import check_smiles

        for s, i in zip(smiles, ids):
            check_smiles(s, i)
        enc = self.tokenizer(list(smiles), padding=True, truncation=True, return_tensors="pt",
                             return_special_tokens_mask=True)
        out = self.model(input_ids=enc["input_ids"].to(self.runtime.device),
                         attention_mask=enc["attention_mask"].to(self.runtime.device), output_hidden_states=True)
        tokens = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
        return out.hidden_states, tokens.to(self.runtime.device)


def load_molecule_encoder(entry: ModelEntry, runtime: Runtime) -> MoleculeAdapter:
    from transformers import AutoModel, AutoTokenizer

    source, kw = resolve_source(entry)
    family, _ = _family(entry, source, kw)
    if family not in MOLECULE_FAMILIES:
        raise InputError(f"{entry.alias!r} is a {family} model, not a SMILES encoder ({', '.join(MOLECULE_FAMILIES)})")
    model = load_pretrained(AutoModel, entry, source, kw, dtype=runtime.dtype, add_pooling_layer=False)
    tokenizer = load_pretrained(AutoTokenizer, entry, source, kw)
    return MoleculeAdapter(entry, family, model.to(runtime.device).eval(), tokenizer, runtime)


@dataclass
class AudioAdapter:
    """The encoder of a speech model (Whisper) with its feature extractor. ``encode(paths, ids)`` → every hidden
    state ``[B, frames, D]`` (30 s, padded) and the mask of the frames that hold the sound (mel frames halved by the
    encoder's stride-2 convolution). No CLS token: pooled by the mean over the sound's frames."""

    entry: ModelEntry
    family: str
    model: Any  # the encoder alone
    feature_extractor: Any
    runtime: Runtime
    has_cls = False
    n_prefix_tokens = 0

    @property
    def n_layers(self) -> int:
        return self.model.config.encoder_layers + 1

    @torch.no_grad()
    def encode(self, paths: list[Any], ids: list[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        from .audio import load_audio

        rate = self.feature_extractor.sampling_rate
        waves = [load_audio(p, rate, i) for p, i in zip(paths, ids)]
        feats = self.feature_extractor(waves, sampling_rate=rate, return_tensors="pt", return_attention_mask=True)
        out = self.model(feats["input_features"].to(self.runtime.device, self.runtime.dtype),
                         output_hidden_states=True)
        stride = feats["input_features"].shape[-1] // out.last_hidden_state.shape[1]
        return out.hidden_states, feats["attention_mask"][:, ::stride].bool().to(self.runtime.device)


def load_audio_encoder(entry: ModelEntry, runtime: Runtime) -> AudioAdapter:
    from transformers import AutoFeatureExtractor, WhisperModel

    source, kw = resolve_source(entry)
    family, _ = _family(entry, source, kw)
    if family not in AUDIO_FAMILIES:
        raise InputError(f"{entry.alias!r} is a {family} model, not an audio encoder ({', '.join(AUDIO_FAMILIES)})")
    model = load_pretrained(WhisperModel, entry, source, kw, dtype=runtime.dtype)
    fe = load_pretrained(AutoFeatureExtractor, entry, source, kw)
    return AudioAdapter(entry, family, model.get_encoder().to(runtime.device).eval(), fe, runtime)


def load_encoder(entry: ModelEntry, runtime: Runtime, modality: str = "image") -> Any:
    """The adapter of ``entry`` for ``modality`` (image: :func:`load_vision`; molecule: a SMILES encoder; audio: a
    speech model's encoder)."""
    if modality == "image":
        return load_vision(entry, runtime)
    if modality == "molecule":
        return load_molecule_encoder(entry, runtime)
    if modality == "audio":
        return load_audio_encoder(entry, runtime)
    raise InputError(f"no encoder adapter for modality {modality!r}")


@dataclass
class LMAdapter(TokenAdapter):
    """A causal LM's decoder (no LM head) with its tokenizer. ``hidden_states(ids, mask)`` → tuple of ``[B, T, D]``."""

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids.to(self.runtime.device),
                         attention_mask=attention_mask.to(self.runtime.device), output_hidden_states=True)
        return out.hidden_states


def _vision_class(family: str) -> Any:
    import transformers

    return {"clip": transformers.CLIPVisionModel, "dinov2": transformers.Dinov2Model,
            "vit": transformers.ViTModel, "efficientnet": transformers.EfficientNetModel}[family]


def load_vision(entry: ModelEntry, runtime: Runtime) -> VisionAdapter:
    from transformers import AutoImageProcessor

    source, kw = resolve_source(entry)
    family, _ = _family(entry, source, kw)
    if family not in VISION_FAMILIES:
        raise InputError(f"{entry.alias!r} is a {family} model, not a vision encoder ({', '.join(VISION_FAMILIES)})")
    extra = {"add_pooling_layer": False} if family == "vit" else {}
    model = load_pretrained(_vision_class(family), entry, source, kw, dtype=runtime.dtype, **extra)
    processor = load_pretrained(AutoImageProcessor, entry, source, kw)
    adapter = ConvVisionAdapter if family in CNN_FAMILIES else VisionAdapter
    return adapter(entry, family, model.to(runtime.device).eval(), processor, runtime)


def _load_lm(entry: ModelEntry, runtime: Runtime, with_head: bool, seq2seq: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    source, kw = resolve_source(entry)
    family, config = _family(entry, source, kw)
    if seq2seq:
        if not getattr(config, "is_encoder_decoder", False):
            raise InputError(f"{entry.alias!r} is a {family} model, not an encoder-decoder LM (T5, FlanT5)")
    elif family not in LM_FAMILIES:
        raise InputError(f"{entry.alias!r} is a {family} model, not a causal LM ({', '.join(LM_FAMILIES)})")
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM if with_head else AutoModel
    model = load_pretrained(cls, entry, source, kw, dtype=runtime.dtype)
    tokenizer = load_pretrained(AutoTokenizer, entry, source, kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(runtime.device).eval(), tokenizer


def load_lm(entry: ModelEntry, runtime: Runtime) -> LMAdapter:
    """The decoder without its head, for hidden states."""
    model, tokenizer = _load_lm(entry, runtime, with_head=False)
    family = entry.family or family_of_model_type(model.config.model_type, entry.alias)
    return LMAdapter(entry, family, model, tokenizer, runtime)


def model_identity(entry: ModelEntry) -> dict[str, Any]:
    """What determines a model's outputs, without loading its weights (part of feature-cache keys)."""
    ident: dict[str, Any] = {"alias": entry.alias, "source": entry.source, "revision": entry.revision}
    folder: Path | None = None
    if entry.asset is not None:
        folder = assets.ensure_asset(entry.asset)
        ident["asset"] = assets.asset_info(entry.asset)
    elif entry.path is not None:
        folder = Path(entry.path)
    if folder is not None:
        for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
            f = folder / name
            if f.is_file():
                ident[name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return ident


def load_causal_lm(entry: ModelEntry, runtime: Runtime) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM *with* its head (for grounded runs, training and benchmarks)."""
    return _load_lm(entry, runtime, with_head=True)


def load_seq2seq_lm(entry: ModelEntry, runtime: Runtime) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of an encoder–decoder LM (T5, FlanT5) with its head."""
    return _load_lm(entry, runtime, with_head=True, seq2seq=True)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` starts with the BOS token (read from the tokenizer's own output, not its config:
    SmolLM2's defines a BOS token and never adds it, LLaMA's adds ``<s>``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos
