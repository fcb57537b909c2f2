"""Assembling, saving and loading grounded VLMs (the model itself: :mod:`.modeling_grounded_llava`).

- :func:`build_vlm` puts a pretrained vision encoder and causal LM (registry aliases, folders or hub ids) together
  with a fresh projector; :class:`VLM` carries the model with its tokenizer (``<image>`` added) and image processor.
- :meth:`VLM.save` writes an HF folder that loads with transformers alone
  (``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)``): the modelling code travels
  with the weights.
- :func:`load_vlm` loads such a folder, or an HF LLaVA checkpoint at any L (``load_vlm("llava", insert_layer=4)``):
  HF reads it as ``LlavaForConditionalGeneration`` and its parts move into the grounded class.

>>> vlm = build_vlm("dinov2-small-imgfocus", "smollm2-135m", insert_layer=4, vision_pool=4)  # doctest: +SKIP
>>> vlm.model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

from pg_analysis.errors import InputError

from .configuration_grounded_encdec import GroundedBlip2Config, GroundedInstructBlipConfig, GroundedVisionT5Config
from .configuration_grounded_llava import GroundedLlavaConfig
from .conversations import IMAGE_TOKEN
from .modeling_grounded_encdec import (GroundedBlip2ForConditionalGeneration,
                                       GroundedInstructBlipForConditionalGeneration,
                                       GroundedVisionT5ForConditionalGeneration)
from .modeling_grounded_llava import GroundedLlavaForConditionalGeneration, VisionProjector

log = logging.getLogger(__name__)

# In this project's processes the classes resolve without trust_remote_code (a saved folder's auto_map serves
# everyone else).
for _config, _model in ((GroundedLlavaConfig, GroundedLlavaForConditionalGeneration),
                        (GroundedBlip2Config, GroundedBlip2ForConditionalGeneration),
                        (GroundedInstructBlipConfig, GroundedInstructBlipForConditionalGeneration),
                        (GroundedVisionT5Config, GroundedVisionT5ForConditionalGeneration)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)

#: the sub-folder of an InstructBLIP checkpoint that holds its Q-Former's tokenizer (HF's processor layout)
QFORMER_TOKENIZER = "qformer_tokenizer"

#: checkpoint ``model_type`` → (grounded config, grounded model) of the encoder–decoder VLMs; HF's BLIP-2 and
#: InstructBLIP checkpoints load into the grounded classes unchanged (same weight names).
ENCDEC_CLASSES = {
    "blip-2": (GroundedBlip2Config, GroundedBlip2ForConditionalGeneration),
    "pg_blip2": (GroundedBlip2Config, GroundedBlip2ForConditionalGeneration),
    "instructblip": (GroundedInstructBlipConfig, GroundedInstructBlipForConditionalGeneration),
    "pg_instructblip": (GroundedInstructBlipConfig, GroundedInstructBlipForConditionalGeneration),
    "pg_vision_t5": (GroundedVisionT5Config, GroundedVisionT5ForConditionalGeneration),
}


# ----------------------------------------------------------------------------------------------------------------
# assembling, saving, loading


@dataclass
class VLM:
    """A grounded VLM with what it needs to read inputs: tokenizer (with ``<image>``) and image processor."""

    model: Any  # GroundedLlavaForConditionalGeneration, or an encoder-decoder one (ENCDEC_CLASSES)
    tokenizer: Any
    image_processor: Any
    qformer_tokenizer: Any = None  # InstructBLIP's: its Q-Former reads the instruction

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config.text_config, "is_encoder_decoder", False))

    @property
    def modality(self) -> str:
        """What the encoder reads: ``image``, or ``molecule`` (a SMILES tower, :class:`~.inputs.SmilesProcessor`)."""
        return getattr(self.image_processor, "modality", "image")

    def pixel_values(self, images: list) -> torch.Tensor:
        """The encoder's input tensor of ``images`` (images, or SMILES for a SMILES tower)."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def save(self, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """An HF folder: weights, config, modelling code, tokenizer, image processor. ``state_dict``: the full
        weights when the model's own are sharded (FSDP, DeepSpeed ZeRO-3 gather them on the main process)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, state_dict=state_dict)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.qformer_tokenizer is not None:  # where InstructBlipProcessor keeps it
            self.qformer_tokenizer.save_pretrained(folder / QFORMER_TOKENIZER)

    def qformer_inputs(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """InstructBLIP: ``qformer_input_ids`` / ``qformer_attention_mask`` of each image's instruction (padded);
        other models: nothing."""
        if self.qformer_tokenizer is None or not instructions:
            return {}
        enc = self.qformer_tokenizer(instructions, padding=True, truncation=True, max_length=512,
                                     return_tensors="pt")
        return {"qformer_input_ids": enc["input_ids"], "qformer_attention_mask": enc["attention_mask"]}


ATTENTION = ("auto", "eager", "sdpa")

#: what a grounded VLM can be built for (pg_analysis.modalities names more: audio is aligned, not yet trained)
TRAINABLE_MODALITIES = ("image", "molecule")


PRECISIONS = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=None)
def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 autocast pays on this device: CUDA with bf16 support; a CPU whose bf16 matmul takes at most
    twice fp32's, timed once per process on 256 × 256 matrices (a few ms). A CPU without AVX-512 runs bf16 matmuls
    through a slow fallback: 2.3 s against 27 ms in fp32 for 1024 × 1024, one thread, on an AVX2-only host."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def best(x: torch.Tensor) -> float:
        x @ x  # untimed: the first call of a dtype sets its kernels up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a.bfloat16()) <= 2 * best(a)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where :func:`bf16_is_fast`, else ``fp32``; ``bf16`` / ``fp32`` as given (an explicit bf16
    on a device where it is slow is kept, with a warning)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device.type) else "fp32"
    if precision == "bf16" and device.type == "cpu" and not bf16_is_fast("cpu"):
        log.warning("bf16 autocast is requested on a CPU whose bf16 matmuls are far slower than fp32 ones "
                    "(no AVX-512); --precision auto or fp32 is much faster here")
    return precision


def precision_context(precision: str, device: torch.device):
    """bf16 autocast on ``device`` for ``"bf16"``, nothing for ``"fp32"`` (training and evaluation alike); ``"auto"``
    as :func:`resolve_precision` decides."""
    if precision == "auto":
        precision = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def use_attention(model: Any, implementation: str = "auto") -> str:
    """Set the LM's attention kernel, record it as ``model.attention_kernel``, and return it. ``auto``: ``eager`` on
    CPU, ``sdpa`` elsewhere.

    The grounded forward always passes an explicit additive mask. On this 2-core CPU, with ~90-row masked
    sequences, one SmolLM2-135M training step (batch 16, bf16 autocast) takes 4.27 s with eager attention and
    4.76 s with SDPA's CPU flash kernel (``python benchmarks/bench_attention.py``). The logits agree to fp32
    rounding.
    """
    if implementation not in ATTENTION:
        raise InputError(f"attention must be one of {ATTENTION}, got {implementation!r}")
    if implementation == "auto":
        implementation = "eager" if next(model.parameters()).device.type == "cpu" else "sdpa"
    model.set_attn_implementation(implementation)
    model.attention_kernel = implementation
    return implementation


def add_image_token(tokenizer: Any) -> int:
    """Add ``<image>`` as a special token if absent; return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _square(size: Any) -> int | None:
    """``height`` if a size spec (dict or SizeDict) is square, else None."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    h, w = get("height"), get("width")
    return int(h) if h and h == w else None


def _processed_size(processor: Any, default: int) -> int:
    """The square size the image processor outputs (crop size, else fixed resize size), else ``default``."""
    crop = getattr(processor, "crop_size", None)
    if crop is not None and getattr(processor, "do_center_crop", True) and _square(crop):
        return _square(crop)
    size = getattr(processor, "size", None)
    return (_square(size) if size is not None else None) or default


def build_vlm(vision: str, llm: str, insert_layer: int = 0, vision_feature_layer: int = -2,
              vision_feature_select_strategy: str = "default", vision_pool: int = 1, projector_type: str = "mlp",
              grounding_mode: str = "splice", runtime: Any = None, seed: int = 0,
              bypass_encoder: bool = True, modality: str = "image", slots: int = 8) -> VLM:
    """Assemble a VLM from a pretrained vision encoder and LM (registry aliases, folders or hub ids).

    A causal LM gives a :class:`GroundedLlavaForConditionalGeneration` (vision rows enter at ``insert_layer``); an
    encoder–decoder LM (T5, FlanT5) a :class:`GroundedVisionT5ForConditionalGeneration` (plain projector, vision
    rows bypass the encoder unless ``bypass_encoder=False``; ``insert_layer`` must stay 0). The projector is
    freshly initialised (seeded); the tokenizer gains ``<image>`` and the LM's embeddings one row.

    ``modality="molecule"``: ``vision`` is a SMILES encoder (BERT-family; MolCA-style), read through a
    :class:`~.inputs.SmilesProcessor`; each molecule gives ``slots`` rows (its atom tokens' states mean-pooled, in
    order); ``<image>`` stays the placeholder of a molecule's rows.
    """
    from pg_analysis.models import load_causal_lm, load_pretrained, load_seq2seq_lm, load_vision, pick_runtime
    from pg_analysis.models import resolve_source
    from pg_analysis.registry import resolve_model

    runtime = runtime or pick_runtime("cpu", "float32")
    if modality not in TRAINABLE_MODALITIES:
        raise InputError(f"a VLM can be built for {' or '.join(TRAINABLE_MODALITIES)} inputs, not {modality!r}")
    if modality == "molecule":
        return _build_molecule_vlm(vision, llm, insert_layer, vision_feature_layer, slots, projector_type,
                                   grounding_mode, runtime, seed)
    vis = load_vision(resolve_model(vision, "vision"), runtime)
    lm_entry = resolve_model(llm, "lm")
    source, kw = resolve_source(lm_entry)
    seq2seq = bool(getattr(load_pretrained(AutoConfig, lm_entry, source, kw), "is_encoder_decoder", False))
    if seq2seq and (insert_layer or grounding_mode != "splice"):
        raise InputError(f"{llm} is an encoder-decoder LM: its vision rows bypass the encoder (bypass_encoder); "
                         f"insert_layer and grounding_mode are for decoder-only LMs")
    lm, tokenizer = (load_seq2seq_lm if seq2seq else load_causal_lm)(lm_entry, runtime)
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if seq2seq:
        config = GroundedVisionT5Config(
            vision_config=vis.model.config, text_config=lm.config, image_token_index=image_token_id,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            vision_pool=vision_pool, projector_type=projector_type, bypass_encoder=bypass_encoder,
            tie_word_embeddings=bool(lm.config.tie_word_embeddings),
            vision_image_size=_processed_size(vis.processor, vis.model.config.image_size))
        torch.manual_seed(seed)
        model = GroundedVisionT5ForConditionalGeneration(config)
        model.vision_tower.load_state_dict(vis.model.state_dict())
        model.language_model.load_state_dict(lm.state_dict())
        model.generation_config.suppress_tokens = [image_token_id]
        model.to(runtime.device, runtime.dtype).eval()
        return VLM(model, tokenizer, vis.processor)
    config = GroundedLlavaConfig(
        vision_config=vis.model.config, text_config=lm.config, image_token_index=image_token_id,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
        insert_layer=insert_layer, vision_pool=vision_pool, projector_type=projector_type,
        grounding_mode=grounding_mode, tie_word_embeddings=bool(lm.config.tie_word_embeddings),
        vision_image_size=_processed_size(vis.processor, vis.model.config.image_size))
    return VLM(_grounded_llava(config, vis.model, lm, seed, runtime), tokenizer, vis.processor)


def _grounded_llava(config: GroundedLlavaConfig, tower: Any, lm: Any, seed: int, runtime: Any) -> Any:
    """A fresh grounded model (projector seeded) holding ``tower``'s and ``lm``'s weights."""
    config.image_seq_length = config.num_image_tokens
    torch.manual_seed(seed)
    model = GroundedLlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.tie_weights()
    model.generation_config.suppress_tokens = [config.image_token_index]  # a generated placeholder needs an input
    return model.to(runtime.device, runtime.dtype).eval()


def _build_molecule_vlm(encoder: str, llm: str, insert_layer: int, feature_layer: int, slots: int,
                        projector_type: str, grounding_mode: str, runtime: Any, seed: int) -> VLM:
    from pg_analysis.models import load_causal_lm, load_molecule_encoder
    from pg_analysis.registry import resolve_model

    from .inputs import SmilesProcessor

    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise InputError(f"a molecule's rows (slots) must be an integer >= 1, got {slots!r}")
    enc = load_molecule_encoder(resolve_model(encoder, "molecule"), runtime)
    lm, tokenizer = load_causal_lm(resolve_model(llm, "lm"), runtime)
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = GroundedLlavaConfig(
        vision_config=enc.model.config, text_config=lm.config, image_token_index=image_token_id,
        vision_feature_layer=feature_layer, insert_layer=insert_layer, vision_slots=slots,
        projector_type=projector_type, grounding_mode=grounding_mode,
        tie_word_embeddings=bool(lm.config.tie_word_embeddings))
    # ids padded to a fixed length the tower's positions cover (a longer SMILES is refused, never cut)
    processor = SmilesProcessor(enc.tokenizer, min(128, enc.model.config.max_position_embeddings))
    return VLM(_grounded_llava(config, enc.model, lm, seed, runtime), tokenizer, processor)


_LLAVA_FIELDS = ("image_token_index", "image_seq_length", "projector_hidden_act", "vision_feature_select_strategy",
                 "vision_feature_layer", "multimodal_projector_bias", "tie_word_embeddings")


def _from_llava(hf: LlavaForConditionalGeneration, insert_layer: int) -> GroundedLlavaForConditionalGeneration:
    """Move an HF LLaVA's parts into a grounded model (no copy of the big weights; skeleton built on meta)."""
    fields = {k: getattr(hf.config, k) for k in _LLAVA_FIELDS}
    config = GroundedLlavaConfig(**fields, vision_config=hf.config.vision_config, text_config=hf.config.text_config,
                                 insert_layer=insert_layer)
    with torch.device("meta"):
        model = GroundedLlavaForConditionalGeneration(config)
    model.model.vision_tower = hf.model.vision_tower
    model.model.language_model = hf.model.language_model
    model.lm_head = hf.lm_head
    weight = hf.model.multi_modal_projector.linear_1.weight
    projector = VisionProjector(config).to(weight.device, weight.dtype)
    missing, unexpected = projector.load_state_dict(hf.model.multi_modal_projector.state_dict(), strict=False)
    if sorted(missing) != ["gain", "offset"] or unexpected:
        raise InputError(f"LLaVA projector does not match: missing {missing}, unexpected {unexpected}")
    model.model.multi_modal_projector = projector
    return model


def load_vlm(source: str | Path, insert_layer: int | None = None, runtime: Any = None,
             bypass_encoder: bool | None = None) -> VLM:
    """Load a VLM saved by :meth:`VLM.save` / ``pg-train``, an HF LLaVA checkpoint, or an HF BLIP-2 / InstructBLIP
    checkpoint with a T5 LM (folder, alias or hub id).

    ``insert_layer`` overrides the saved L (an HF LLaVA checkpoint has none: default 0). ``bypass_encoder``
    overrides an encoder–decoder model's saved mode (an HF BLIP checkpoint has none: default True, grounded).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from pg_analysis.models import load_pretrained, pick_runtime, resolve_source
    from pg_analysis.registry import resolve_model

    runtime = runtime or pick_runtime("cpu", "float32")
    entry = resolve_model(str(source), "vlm")
    path, kw = resolve_source(entry)
    config = load_pretrained(AutoConfig, entry, path, kw)
    if config.model_type in ENCDEC_CLASSES:
        if insert_layer:
            raise InputError(f"{source} is an encoder-decoder VLM: it is grounded with bypass_encoder, not "
                             "insert_layer")
        config_class, model_class = ENCDEC_CLASSES[config.model_type]
        overrides = {} if bypass_encoder is None else {"bypass_encoder": bypass_encoder}
        config = config_class.from_pretrained(path, **kw, **overrides)
        model = load_pretrained(model_class, entry, path, kw, config=config, dtype=runtime.dtype)
    elif config.model_type not in ("llava", GroundedLlavaConfig.model_type):
        raise InputError(f"{source}: a LLaVA-, BLIP-2- or InstructBLIP-format checkpoint is needed, got model_type "
                         f"{config.model_type!r}")
    elif bypass_encoder is not None:
        raise InputError(f"{source} is a decoder-only VLM: it is grounded with insert_layer, not bypass_encoder")
    elif config.model_type == "llava":
        model = _from_llava(load_pretrained(LlavaForConditionalGeneration, entry, path, kw, dtype=runtime.dtype),
                            insert_layer or 0)
    else:
        overrides = {} if insert_layer is None else {"insert_layer": insert_layer}
        config = GroundedLlavaConfig.from_pretrained(path, **kw, **overrides)
        model = load_pretrained(GroundedLlavaForConditionalGeneration, entry, path, kw, config=config,
                                 dtype=runtime.dtype)
    tokenizer = load_pretrained(AutoTokenizer, entry, path, kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(config, "vision_slots", 0):  # a SMILES tower: its tokenizer travels in a sub-folder
        from .inputs import SmilesProcessor

        image_processor = SmilesProcessor.from_pretrained(
            lambda sub: load_pretrained(AutoTokenizer, entry, path, {**kw, "subfolder": sub}))
    else:
        image_processor = load_pretrained(AutoImageProcessor, entry, path, kw)
    qformer_tokenizer = None
    if config.model_type in ("instructblip", GroundedInstructBlipConfig.model_type):
        qformer_tokenizer = load_pretrained(AutoTokenizer, entry, path, {**kw, "subfolder": QFORMER_TOKENIZER})
    return VLM(model.to(runtime.device).eval(), tokenizer, image_processor, qformer_tokenizer)
