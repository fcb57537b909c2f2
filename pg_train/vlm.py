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

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

from pg_analysis.errors import InputError

from .configuration_grounded_llava import GroundedLlavaConfig
from .conversations import IMAGE_TOKEN
from .modeling_grounded_llava import GroundedLlavaForConditionalGeneration, VisionProjector

# In this project's processes the classes resolve without trust_remote_code (a saved folder's auto_map serves
# everyone else).
AutoConfig.register(GroundedLlavaConfig.model_type, GroundedLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(GroundedLlavaConfig, GroundedLlavaForConditionalGeneration, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# assembling, saving, loading


@dataclass
class VLM:
    """A grounded VLM with what it needs to read inputs: tokenizer (with ``<image>``) and image processor."""

    model: GroundedLlavaForConditionalGeneration
    tokenizer: Any
    image_processor: Any

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index

    def pixel_values(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def save(self, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """An HF folder: weights, config, modelling code, tokenizer, image processor. ``state_dict``: the full
        weights when the model's own are sharded (FSDP, DeepSpeed ZeRO-3 gather them on the main process)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, state_dict=state_dict)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


ATTENTION = ("auto", "eager", "sdpa")


def precision_context(precision: str, device: torch.device):
    """bf16 autocast on ``device`` for ``"bf16"``, nothing for ``"fp32"`` (training and evaluation alike)."""
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
              grounding_mode: str = "splice", runtime: Any = None, seed: int = 0) -> VLM:
    """Assemble a VLM from a pretrained vision encoder and causal LM (registry aliases, folders or hub ids).

    The projector is freshly initialised (seeded); the tokenizer gains ``<image>`` and the LM's embeddings one row.
    """
    from pg_analysis.models import load_causal_lm, load_vision, pick_runtime
    from pg_analysis.registry import resolve_model

    runtime = runtime or pick_runtime("cpu", "float32")
    vis = load_vision(resolve_model(vision, "vision"), runtime)
    lm, tokenizer = load_causal_lm(resolve_model(llm, "lm"), runtime)
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = GroundedLlavaConfig(
        vision_config=vis.model.config, text_config=lm.config, image_token_index=image_token_id,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
        insert_layer=insert_layer, vision_pool=vision_pool, projector_type=projector_type,
        grounding_mode=grounding_mode, tie_word_embeddings=bool(lm.config.tie_word_embeddings),
        vision_image_size=_processed_size(vis.processor, vis.model.config.image_size))
    config.image_seq_length = config.num_image_tokens
    torch.manual_seed(seed)
    model = GroundedLlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vis.model.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.tie_weights()
    model.generation_config.suppress_tokens = [image_token_id]  # a generated placeholder would need an image
    model.to(runtime.device, runtime.dtype).eval()
    return VLM(model, tokenizer, vis.processor)


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


def load_vlm(source: str | Path, insert_layer: int | None = None, runtime: Any = None) -> VLM:
    """Load a VLM saved by :meth:`VLM.save` / ``pg-train``, or an HF LLaVA checkpoint (folder, alias or hub id).

    ``insert_layer`` overrides the saved L (an HF LLaVA checkpoint has none: default 0).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from pg_analysis.models import load_pretrained, pick_runtime, resolve_source
    from pg_analysis.registry import resolve_model

    runtime = runtime or pick_runtime("cpu", "float32")
    entry = resolve_model(str(source), "vlm")
    path, kw = resolve_source(entry)
    config = load_pretrained(AutoConfig, entry, path, kw)
    if config.model_type not in ("llava", GroundedLlavaConfig.model_type):
        raise InputError(f"{source}: a LLaVA-format checkpoint is needed, got model_type {config.model_type!r}")
    if config.model_type == "llava":
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
    image_processor = load_pretrained(AutoImageProcessor, entry, path, kw)
    return VLM(model.to(runtime.device).eval(), tokenizer, image_processor)
