"""The grounded LLaVA: frozen vision tower → projector → LLaMA-family LM whose vision rows enter at layer L.

A transformers model in full: it subclasses HF's ``LlavaForConditionalGeneration`` (same parts, same weight names,
so an HF LLaVA checkpoint loads into it) and honours the forward/generate contract HF's LLaVA honours —
``output_hidden_states``, ``output_attentions`` (eager), ``return_dict=False``, ``inputs_embeds`` with
``pixel_values``, ``get_image_features``, and ``generate`` with or without the cache (greedy, beam search,
sampling). Its language model runs through :func:`.grounding.grounded_forward`. With ``insert_layer=0``, no
pooling, ``gain=1`` and ``offset=0`` it computes exactly what ``LlavaForConditionalGeneration`` computes.

This file, ``configuration_grounded_llava.py`` and ``grounding.py`` import only torch and transformers:
``save_pretrained`` copies them beside the weights with an ``auto_map``, so

>>> AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)  # doctest: +SKIP

loads a grounded model in a Python that has torch and transformers but not this project.

The image pipeline is split where the frozen part ends, so a trainer can cache it: :meth:`encode_images`
(tower → feature layer → selection → pooling, ``[n_images, P, D_v]``) and :meth:`project` (``[n_images, P, d]``).
``forward`` accepts ``pixel_values`` or the cached ``vision_features``; placeholder tokens in ``input_ids`` must
already be expanded to ``config.num_image_tokens`` each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

from .configuration_grounded_llava import GroundedLlavaConfig
from .grounding import CACHE_FIELD, DecoderParts, GroundedCache, GroundingError, grounded_forward

#: generate() bookkeeping that the grounded forward does not need: its cache keeps its own positions.
_GENERATION_ONLY = ("cache_position",)


@dataclass
class GroundedLlavaOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` — ``loss``, ``logits [B, T, V]``, the cache (under the installed transformers'
    name, ``cache`` or ``past_key_values``), ``hidden_states`` (N + 1 × ``[B, T, d]``), ``attentions`` (N ×
    ``[B, heads, T, S]``) — plus ``image_hidden_states [n_images, P, d]``, the projected vision rows."""

    image_hidden_states: torch.Tensor | None = None


class VisionProjector(nn.Module):
    """LLaVA's projector (``linear_1``–GELU–``linear_2``, or ``linear_1`` alone) times a learnable scalar ``gain``,
    plus a learnable ``offset`` vector: ``gain · mlp(x) + offset``.

    ``gain`` (1) and ``offset`` (0) leave LLaVA's projector unchanged; a trainer may set them so the rows have the
    norm and the mean of the LM's own token states at the insertion layer. Parameter names match HF's
    ``LlavaMultiModalProjector`` so LLaVA checkpoints load into it.
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
        raise GroundingError(f"cannot pool {p} patch tokens with kernel {kernel}: need a square grid divisible by it")
    grid = patches.transpose(1, 2).reshape(b, d, side, side)
    return nn.functional.avg_pool2d(grid, kernel).flatten(2).transpose(1, 2)


def select_features(hidden: torch.Tensor, config: GroundedLlavaConfig) -> torch.Tensor:
    """One tower layer's output ``[n_images, 1 + R + P, D_v]`` → the vision rows' features: prefix tokens (CLS +
    registers) dropped unless ``vision_feature_select_strategy == "full"``, the patch grid pooled by
    ``vision_pool``."""
    n_prefix = config.n_prefix_tokens
    patches = pool_patch_grid(hidden[:, n_prefix:], config.vision_pool)
    if config.vision_feature_select_strategy == "full":
        return torch.cat([hidden[:, :n_prefix], patches], 1)
    return patches


def pool_token_slots(hidden: torch.Tensor, tokens: torch.Tensor, slots: int) -> torch.Tensor:
    """Mean-pool each input's tokens into ``slots`` contiguous slots: ``hidden [B, T, D]``, ``tokens [B, T]`` (True
    at the tokens to pool, contiguous per row) → ``[B, slots, D]``.

    Slot ``j`` of a row with ``n`` tokens averages its tokens ``⌊j·n/S⌋ … max(⌊j·n/S⌋ + 1, ⌈(j+1)·n/S⌉) − 1``: every
    token in some slot, every slot at least one token (an input shorter than ``S`` repeats tokens). A row without
    tokens gives zero slots."""
    b, t, _ = hidden.shape
    tokens = tokens.bool()
    n = tokens.sum(1, keepdim=True)  # [B, 1]
    first = torch.where(tokens.any(1), tokens.float().argmax(1), torch.zeros(b, dtype=torch.long, device=hidden.device))
    rank = torch.arange(t, device=hidden.device)[None] - first[:, None]  # [B, T]: index among the row's tokens
    j = torch.arange(slots, device=hidden.device)[None, :, None]  # [1, S, 1]
    start = torch.div(j * n[:, :, None], slots, rounding_mode="floor")
    end = torch.maximum(start + 1, torch.div((j + 1) * n[:, :, None] + slots - 1, slots, rounding_mode="floor"))
    weights = ((rank[:, None] >= start) & (rank[:, None] < end) & tokens[:, None]).to(hidden.dtype)  # [B, S, T]
    return weights @ hidden / weights.sum(-1, keepdim=True).clamp_min(1)


def token_tower_inputs(input_ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A token tower's right-padded ``input_ids [B, T]`` (``[CLS] … [SEP]`` then ``pad_id``) → ``(attention_mask,
    tokens)``: the mask of real tokens, and of the tokens to pool (``[CLS]`` and ``[SEP]`` left out)."""
    mask = input_ids != pad_id
    last = mask.sum(1, keepdim=True) - 1
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    return mask.long(), mask & (pos > 0) & (pos < last)


def placeholder_mask(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, token_id: int,
                     embeddings: nn.Module) -> torch.Tensor:
    """``[B, T]`` True at image placeholders: by id, or (``inputs_embeds`` only) where a row equals the
    placeholder's embedding, as HF's LLaVA finds them."""
    if input_ids is not None:
        return input_ids == token_id
    token = torch.full((), token_id, dtype=torch.long, device=inputs_embeds.device)
    return (inputs_embeds == embeddings(token).to(inputs_embeds.dtype)).all(-1)


class ProjectorInit:
    """HF initialises parameters missing from a checkpoint through ``_init_weights``: the gain starts at 1, the
    offset at 0 (an HF LLaVA checkpoint, or one saved before the offset existed, loads unchanged)."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisionProjector):
            init.ones_(module.gain)  # transformers' helpers leave parameters loaded from a checkpoint alone
            init.zeros_(module.offset)


class GroundedLlavaModel(ProjectorInit, LlavaModel):
    """``LlavaModel``'s parts (vision tower, projector, language model) with :class:`VisionProjector`."""

    config_class = GroundedLlavaConfig

    def __init__(self, config: GroundedLlavaConfig):
        super(LlavaModel, self).__init__(config)  # LlavaPreTrainedModel: LlavaModel would build its own projector
        # a token tower (SMILES BERT/ALBERT) without its pooler: only its hidden states are read
        self.vision_tower = AutoModel.from_config(config.vision_config,
                                                  **({"add_pooling_layer": False} if config.vision_slots else {}))
        self.multi_modal_projector = VisionProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class GroundedLlavaForConditionalGeneration(ProjectorInit, LlavaForConditionalGeneration):
    """A LLaVA whose vision rows enter the language model at layer ``config.insert_layer``."""

    config_class = GroundedLlavaConfig

    def __init__(self, config: GroundedLlavaConfig):
        super(LlavaForConditionalGeneration, self).__init__(config)  # LlavaPreTrainedModel
        self.model = GroundedLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # -- parts ---------------------------------------------------------------------------------------------------

    @property
    def insert_layer(self) -> int:
        return self.config.insert_layer

    def set_insert_layer(self, layer: int) -> None:
        """Change L in place (a training-free probe runs one set of weights at several L)."""
        n = self.config.text_config.num_hidden_layers
        top = n if self.config.exit_layer is None else self.config.exit_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= top:
            raise GroundingError(f"insert_layer must be an integer in [0, {top}] (exit_layer {top}), got {layer!r}")
        self.config.insert_layer = layer

    @property
    def exit_layer(self) -> int:
        """K: the first block the vision rows no longer reach (N when they stay to the end)."""
        n = self.config.text_config.num_hidden_layers
        return n if self.config.exit_layer is None else self.config.exit_layer

    def set_exit_layer(self, layer: int | None) -> None:
        """Change K in place (None: the vision rows stay to the end)."""
        n = self.config.text_config.num_hidden_layers
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or not self.config.insert_layer <= layer <= n):
            raise GroundingError(f"exit_layer must be None or an integer in [{self.config.insert_layer}, {n}], "
                                 f"got {layer!r}")
        self.config.exit_layer = layer

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def decoder_parts(self) -> DecoderParts:
        return DecoderParts(self.config.text_config, self.model.language_model, self.lm_head)

    def _tower(self, pixel_values: torch.Tensor, layer: int, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """The tower's outputs on ``pixel_values`` and layer ``layer``'s selected, pooled features: an image tower's
        patch grid (:func:`select_features`), or a token tower's slots (:func:`pool_token_slots`; ``pixel_values``
        are then its right-padded input ids)."""
        tower = self.model.vision_tower
        if not self.config.vision_slots:
            out = tower(pixel_values.to(tower.device, tower.dtype), output_hidden_states=True, return_dict=True,
                        **kwargs)
            return out, select_features(out.hidden_states[layer], self.config)
        if pixel_values.dtype.is_floating_point:
            raise GroundingError("this model's encoder reads token ids: pixel_values must hold its input ids")
        ids = pixel_values.to(tower.device)
        mask, tokens = token_tower_inputs(ids, self.config.vision_config.pad_token_id or 0)
        out = tower(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True, **kwargs)
        return out, pool_token_slots(out.hidden_states[layer], tokens, self.config.vision_slots)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part: ``pixel_values [n_images, 3, H, W]`` (a token tower: input ids ``[n, T]``) → selected,
        pooled features ``[n_images, P, D_v]``."""
        return self._tower(pixel_values, self.config.vision_feature_layer)[1]

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The trained part: ``[n_images, P, D_v]`` → ``[n_images, P, d]`` in the LM's embedding space."""
        proj = self.model.multi_modal_projector
        return proj(vision_features.to(proj.linear_1.weight.device, proj.linear_1.weight.dtype))

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None,
                           vision_feature_select_strategy: str | None = None, return_dict: bool | None = None,
                           **kwargs: Any) -> BaseModelOutputWithPooling | tuple:
        """As HF's LLaVA: the tower's outputs (``last_hidden_state``, ``hidden_states``) with ``pooler_output`` the
        list of projected rows per image (``[P, d]`` each); ``return_dict=False`` gives the tuple."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if not isinstance(layer, int) or strategy != self.config.vision_feature_select_strategy:
            raise GroundingError("the grounded model's image features use its configured single feature layer "
                                 f"and selection {self.config.vision_feature_select_strategy!r}")
        out, features = self._tower(pixel_values, layer, **kwargs)
        out.pooler_output = list(self.project(features))
        return out if return_dict is not False else out.to_tuple()

    def embed(self, input_ids: torch.Tensor | None, vision_embeds: torch.Tensor | None,
              inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (or ``inputs_embeds``) with the projected vision rows scattered into the image-token
        positions. ``vision_embeds [n_images, P, d]`` in order of appearance. Returns ``(inputs_embeds,
        vision_mask)``."""
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        vision_mask = placeholder_mask(input_ids, embeds, self.config.image_token_index,
                                       self.get_input_embeddings())
        n_tokens = int(vision_mask.sum())
        n_feats = 0 if vision_embeds is None else vision_embeds.shape[0] * vision_embeds.shape[1]
        if n_tokens != n_feats:
            raise GroundingError(f"image tokens and image features do not match: {n_tokens} image tokens in the "
                                 f"input, {n_feats} feature rows ({self.num_image_tokens} per image)")
        if n_feats:
            embeds = embeds.masked_scatter(vision_mask[..., None], vision_embeds.to(embeds.dtype))
        return embeds, vision_mask

    # -- forward / generate --------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: GroundedCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, vision_features: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None, return_logits: bool = True,
                past_key_values: GroundedCache | None = None, num_items_in_batch: Any = None,
                **kwargs: Any) -> GroundedLlavaOutput | tuple:
        """Shapes: ``input_ids [B, T]`` (image tokens expanded), ``pixel_values [n_images, 3, H, W]`` or
        ``vision_features [n_images, P, D_v]`` (cached :meth:`encode_images` output), ``attention_mask [B, T]``.

        ``inputs_embeds [B, T, d]`` instead of ``input_ids``: with ``pixel_values``/``vision_features`` the
        placeholder rows (equal to the image token's embedding) receive the image, as in HF's LLaVA; without them,
        ``vision_mask [B, T]`` marks rows that already hold vision rows.

        The cache comes as ``cache`` (transformers ≥ 5.24) or ``past_key_values`` (earlier) and goes back under the
        installed transformers' name. With a non-empty :class:`GroundedCache` only the new rows are run:
        ``attention_mask`` may cover the whole sequence; vision inputs entered in the prefill. Positions are
        always derived from ``attention_mask`` (full-sequence positions for every row at every layer), so
        ``position_ids`` are not taken. ``return_logits=False`` with ``labels``: loss only, the head runs on
        supervised rows only (training). ``num_items_in_batch`` (transformers' loss keyword): the loss is the summed
        cross-entropy divided by it — the supervised tokens of the whole optimizer step over all micro-batches and
        processes.
        """
        if past_key_values is not None:
            if cache is not None:
                raise GroundingError("give the cache as `cache` or as `past_key_values`, not both")
            cache = past_key_values
        for key in _GENERATION_ONLY:
            kwargs.pop(key, None)
        if kwargs.pop("position_ids", None) is not None:
            raise GroundingError("position_ids are not taken: the grounded model derives every row's position "
                                 "from attention_mask")
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward got unexpected arguments {sorted(kwargs)}")
        if (input_ids is None) == (inputs_embeds is None):
            raise GroundingError("give exactly one of input_ids and inputs_embeds")
        config = self.config
        output_attentions = bool(output_attentions if output_attentions is not None
                                 else getattr(config, "output_attentions", False))
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else getattr(config, "output_hidden_states", False))
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        continuing = isinstance(cache, GroundedCache) and cache.next_position is not None
        if cache is not None and not continuing:
            if cache.get_seq_length() > 0:
                raise GroundingError("the cache must be the GroundedCache returned by this model")
            cache, use_cache = None, True  # an empty cache handed in by generate(): the forward builds its own
        vision_embeds = None
        if continuing:
            t_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if attention_mask is not None:
                attention_mask = attention_mask[:, -t_new:]
            embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
            vision_mask, use_cache = None, True
        else:
            if pixel_values is not None and vision_features is not None:
                raise GroundingError("give pixel_values or vision_features, not both")
            if pixel_values is not None:
                vision_features = self.encode_images(pixel_values)
            if vision_features is not None:
                vision_embeds = self.project(vision_features)
            if inputs_embeds is not None and vision_embeds is None:
                embeds = inputs_embeds
            else:
                if vision_mask is not None:
                    raise GroundingError("vision_mask goes with inputs_embeds that already hold the vision rows")
                embeds, vision_mask = self.embed(input_ids, vision_embeds, inputs_embeds)
        out = grounded_forward(self.decoder_parts(), embeds, vision_mask, config.insert_layer,
                               attention_mask=attention_mask, labels=labels, cache=cache if continuing else None,
                               use_cache=bool(use_cache), mode=config.grounding_mode,
                               logits_to_keep=logits_to_keep if labels is None else 0, return_logits=return_logits,
                               output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                               exit_layer=config.exit_layer, num_items_in_batch=num_items_in_batch)
        result = GroundedLlavaOutput(loss=out.loss, logits=out.logits, hidden_states=out.hidden_states,
                                     attentions=out.attentions, image_hidden_states=vision_embeds,
                                     **{CACHE_FIELD: out.cache})
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """transformers' own preparation; the cached vision features, like ``pixel_values``, enter at prefill only."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if not kwargs.get("is_first_iteration", False) and kwargs.get("use_cache", True):
            inputs.pop("vision_features", None)
            inputs.pop("pixel_values", None)
        return inputs


GroundedLlavaConfig.register_for_auto_class()
GroundedLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
