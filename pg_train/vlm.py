"""The grounded LLaVA-format VLM: frozen vision tower → projector → LLaMA-family LM with vision rows entering at L.

Built on HF's LLaVA conventions, so it saves, loads and generates like any HF model:

- :class:`GroundedLlavaConfig` is a ``LlavaConfig`` (``vision_config``, ``text_config``, ``image_token_index``,
  ``vision_feature_layer`` (−2), ``vision_feature_select_strategy`` (``"default"`` drops CLS and register tokens))
  plus ``insert_layer`` L, ``vision_pool`` (average-pool the patch grid with this kernel; 1 = off),
  ``projector_type`` (``"mlp"``: LLaVA's Linear–GELU–Linear, ``"linear"``) and ``grounding_mode``.
- :class:`GroundedLlavaForConditionalGeneration` is a ``LlavaForConditionalGeneration`` whose projector carries a
  learnable scalar ``gain`` (scale matching, see the trainer) and whose language model runs through
  :func:`~pg_train.grounding.grounded_forward`. With ``insert_layer=0``, no pooling and ``gain=1`` it computes
  exactly what HF's ``LlavaForConditionalGeneration`` computes with the same weights (tested).
- An HF LLaVA checkpoint loads with any L through :func:`load_vlm` (``load_vlm("llava", insert_layer=4)``): HF
  reads it as ``LlavaForConditionalGeneration`` and its parts move into this class; the projector gain starts at 1.

The image pipeline is split where the frozen part ends, so a trainer can cache it:
``encode_images(pixel_values)`` (tower → feature layer → selection → pooling, ``[B, P, D_v]``) and
``project(features)`` (projector, ``[B, P, d]``). ``forward`` accepts ``pixel_values`` or the cached
``vision_features``; placeholder tokens in ``input_ids`` must already be expanded to ``num_image_tokens`` each.

>>> vlm = build_vlm("dinov2-small-imgfocus", "smollm2-135m", insert_layer=4, vision_pool=4)  # doctest: +SKIP
>>> vlm.model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModel, LlavaPreTrainedModel

from pg_analysis.errors import InputError

from .grounding import MODES, DecoderParts, GroundedCache, grounded_forward

IMAGE_TOKEN = "<image>"
PROJECTOR_TYPES = ("mlp", "linear")


@strict
class GroundedLlavaConfig(LlavaConfig):
    """``LlavaConfig`` + the grounding options (see module docstring). Validates itself; no I/O."""

    model_type = "pg_llava"
    insert_layer: int = 0
    vision_pool: int = 1
    projector_type: str = "mlp"
    grounding_mode: str = "splice"
    vision_image_size: int = 0  # pixels the processor feeds the tower, when not vision_config.image_size (DINOv2)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.text_config.num_hidden_layers
        if not 0 <= self.insert_layer <= n:
            raise InputError(f"insert_layer must be in [0, {n}] for a {n}-layer LM, got {self.insert_layer}")
        if self.vision_pool < 1:
            raise InputError(f"vision_pool must be >= 1, got {self.vision_pool}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise InputError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.grounding_mode not in MODES:
            raise InputError(f"grounding_mode must be one of {MODES}, got {self.grounding_mode!r}")
        if not isinstance(self.vision_feature_layer, int):
            raise InputError("GroundedLlavaConfig supports a single vision_feature_layer (an int)")

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the patch grid in the vision tower's output (CLS + registers)."""
        return 1 + int(getattr(self.vision_config, "num_register_tokens", 0) or 0)

    @property
    def num_image_tokens(self) -> int:
        """Vision rows per image after selection and pooling."""
        vc = self.vision_config
        side = (self.vision_image_size or vc.image_size) // vc.patch_size
        pooled = (side // self.vision_pool) ** 2
        return pooled + (self.n_prefix_tokens if self.vision_feature_select_strategy == "full" else 0)


class VisionProjector(nn.Module):
    """LLaVA's projector (``linear_1``–GELU–``linear_2``, or ``linear_1`` alone) times a learnable scalar ``gain``,
    plus a learnable ``offset`` vector: ``gain · mlp(x) + offset``.

    ``gain`` (1) and ``offset`` (0) leave LLaVA's projector unchanged; ``pg-train`` sets them so the rows have the
    norm and the mean of the LM's own token states at the insertion layer (``TrainConfig.scale_match`` /
    ``match_mean``). Parameter names match HF's ``LlavaMultiModalProjector`` so LLaVA checkpoints load into it.
    """

    def __init__(self, config: GroundedLlavaConfig):
        super().__init__()
        d_in, d = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(d_in, d, bias=bias)
        if config.projector_type == "mlp":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(d, d, bias=bias)
        self.gain = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(d))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [B, P, D_v]`` → ``[B, P, d]``."""
        h = self.linear_1(features)
        if hasattr(self, "linear_2"):
            h = self.linear_2(self.act(h))
        return h * self.gain.to(h.dtype) + self.offset.to(h.dtype)


def pool_patch_grid(patches: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool ``[B, P, D]`` patch tokens on their square ``√P × √P`` grid with ``kernel`` → ``[B, P/k², D]``."""
    if kernel == 1:
        return patches
    b, p, d = patches.shape
    side = int(round(p ** 0.5))
    if side * side != p or side % kernel:
        raise InputError(f"cannot pool {p} patch tokens with kernel {kernel}: need a square grid divisible by it")
    grid = patches.transpose(1, 2).reshape(b, d, side, side)
    return nn.functional.avg_pool2d(grid, kernel).flatten(2).transpose(1, 2)


class _GainInit:
    """HF initialises parameters missing from a checkpoint through ``_init_weights``: the gain starts at 1, the
    offset at 0 (a checkpoint saved before the offset existed loads unchanged)."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisionProjector):
            init.ones_(module.gain)
            init.zeros_(module.offset)


class GroundedLlavaModel(_GainInit, LlavaModel):
    """``LlavaModel`` with :class:`VisionProjector` (vision tower, projector, language model)."""

    config_class = GroundedLlavaConfig

    def __init__(self, config: GroundedLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VisionProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class GroundedLlavaForConditionalGeneration(_GainInit, LlavaForConditionalGeneration):
    """A LLaVA whose vision rows enter the language model at layer ``config.insert_layer``."""

    config_class = GroundedLlavaConfig

    def __init__(self, config: GroundedLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = GroundedLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # -- parts ---------------------------------------------------------------------------------------------------

    @property
    def insert_layer(self) -> int:
        return self.config.insert_layer

    def set_insert_layer(self, layer: int) -> None:
        """Change L in place (the training-free probe runs one set of weights at several L)."""
        n = self.config.text_config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise InputError(f"insert_layer must be an integer in [0, {n}], got {layer!r}")
        self.config.insert_layer = layer

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def decoder_parts(self) -> DecoderParts:
        return DecoderParts(self.config.text_config, self.model.language_model, self.lm_head)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part: ``pixel_values [B, 3, H, W]`` → selected, pooled features ``[B, P, D_v]``."""
        tower = self.model.vision_tower
        px = pixel_values.to(tower.device, tower.dtype)
        hidden = tower(px, output_hidden_states=True, return_dict=True).hidden_states[self.config.vision_feature_layer]
        n_prefix = self.config.n_prefix_tokens
        if self.config.vision_feature_select_strategy == "full":
            return torch.cat([hidden[:, :n_prefix], pool_patch_grid(hidden[:, n_prefix:], self.config.vision_pool)], 1)
        return pool_patch_grid(hidden[:, n_prefix:], self.config.vision_pool)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The trained part: ``[B, P, D_v]`` → ``[B, P, d]`` in the LM's embedding space."""
        proj = self.model.multi_modal_projector
        return proj(vision_features.to(proj.linear_1.weight.device, proj.linear_1.weight.dtype))

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        feats = self.project(self.encode_images(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=list(feats))

    def embed(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the projected vision rows scattered into the image-token positions.

        ``vision_embeds [n_images, P, d]`` in order of appearance. Returns ``(inputs_embeds, vision_mask)``.
        """
        embeds = self.get_input_embeddings()(input_ids)
        vision_mask = input_ids == self.config.image_token_index
        n_tokens = int(vision_mask.sum())
        n_feats = 0 if vision_embeds is None else vision_embeds.shape[0] * vision_embeds.shape[1]
        if n_tokens != n_feats:
            raise InputError(f"image tokens and image features do not match: {n_tokens} image tokens in input_ids, "
                             f"{n_feats} feature rows ({self.num_image_tokens} per image)")
        if n_feats:
            embeds = embeds.masked_scatter(vision_mask[..., None], vision_embeds.to(embeds.dtype))
        return embeds, vision_mask

    # -- forward / generate --------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                vision_features: torch.Tensor | None = None, return_logits: bool = True, **kwargs: Any) -> LlavaCausalLMOutputWithPast:
        """Shapes: ``input_ids [B, T]`` (image tokens expanded), ``pixel_values [n_images, 3, H, W]`` or
        ``vision_features [n_images, P, D_v]`` (cached :meth:`encode_images` output), ``attention_mask [B, T]``.

        With a non-empty :class:`GroundedCache` only the new rows are run: ``input_ids`` may be the new tokens or
        the whole sequence (as ``generate`` passes it), ``attention_mask`` may cover the whole sequence; vision
        inputs are ignored (they entered in the prefill). ``return_logits=False`` with ``labels``: loss only, the
        head runs on supervised rows only (training).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids and inputs_embeds")
        continuing = isinstance(past_key_values, GroundedCache) and past_key_values.next_position is not None
        if past_key_values is not None and not continuing:
            if past_key_values.get_seq_length() > 0:
                raise InputError("past_key_values must be the GroundedCache returned by this model")
            past_key_values = None  # an empty cache handed in by generate(): grounded_forward builds its own
            use_cache = True
        if continuing:
            t_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if attention_mask is not None:
                attention_mask = attention_mask[:, -t_new:]
            embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
            vision_mask = None
            use_cache = True
        elif inputs_embeds is not None:
            if pixel_values is not None or vision_features is not None:
                raise InputError("with inputs_embeds, put the vision rows in place yourself (no pixel_values)")
            embeds, vision_mask = inputs_embeds, kwargs.pop("vision_mask", None)
        else:
            if pixel_values is not None and vision_features is not None:
                raise InputError("give pixel_values or vision_features, not both")
            if pixel_values is not None:
                vision_features = self.encode_images(pixel_values)
            vision_embeds = self.project(vision_features) if vision_features is not None else None
            embeds, vision_mask = self.embed(input_ids, vision_embeds)
        out = grounded_forward(self.decoder_parts(), embeds, vision_mask, self.config.insert_layer,
                               attention_mask=attention_mask, labels=labels, past_key_values=past_key_values,
                               use_cache=bool(use_cache), mode=self.config.grounding_mode,
                               logits_to_keep=logits_to_keep if labels is None else 0, return_logits=return_logits)
        return LlavaCausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Cache | None = None,
                                      is_first_iteration: bool | None = False, **kwargs: Any) -> dict[str, Any]:
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values,
                                                       is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("vision_features", None)
            inputs.pop("pixel_values", None)
        return inputs


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

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


ATTENTION = ("auto", "eager", "sdpa")


def use_attention(model: Any, implementation: str = "auto") -> str:
    """Set the LM's attention kernel and return it. ``auto``: ``eager`` on CPU, ``sdpa`` elsewhere.

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

    from pg_analysis.models import _from_pretrained, pick_runtime, resolve_source
    from pg_analysis.registry import resolve_model

    runtime = runtime or pick_runtime("cpu", "float32")
    entry = resolve_model(str(source), "vlm")
    path, kw = resolve_source(entry)
    config = _from_pretrained(AutoConfig, entry, path, kw)
    if config.model_type not in ("llava", GroundedLlavaConfig.model_type):
        raise InputError(f"{source}: a LLaVA-format checkpoint is needed, got model_type {config.model_type!r}")
    if config.model_type == "llava":
        model = _from_llava(_from_pretrained(LlavaForConditionalGeneration, entry, path, kw, dtype=runtime.dtype),
                            insert_layer or 0)
    else:
        overrides = {} if insert_layer is None else {"insert_layer": insert_layer}
        config = GroundedLlavaConfig.from_pretrained(path, **kw, **overrides)
        model = _from_pretrained(GroundedLlavaForConditionalGeneration, entry, path, kw, config=config,
                                 dtype=runtime.dtype)
    tokenizer = _from_pretrained(AutoTokenizer, entry, path, kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    image_processor = _from_pretrained(AutoImageProcessor, entry, path, kw)
    return VLM(model.to(runtime.device).eval(), tokenizer, image_processor)
