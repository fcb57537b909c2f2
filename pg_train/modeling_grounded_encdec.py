"""Encoder–decoder grounding (the paper's Sec. 5.1): the vision rows bypass the language model's encoder.

In BLIP-2 / InstructBLIP with a (Flan)T5 LM, HF writes the Q-Former's projected query rows into the prompt's
placeholder tokens and runs the T5 encoder over both; the decoder cross-attends to the result. Grounded
(``config.bypass_encoder``), the encoder reads the prompt's text rows only — packed, as if the placeholders were
never there — and the decoder's memory holds the vision rows exactly as projected, at the placeholders' positions,
beside the encoded prompt:

    encoder input:   [ <image> × Q | prompt ]  →  T5 encoder( prompt )           (vision rows removed)
    decoder memory:  [ q_1 … q_Q   | enc(prompt) ]   mask: the call's attention_mask, unchanged

T5's cross-attention has no position bias, so where the vision rows sit in the memory changes nothing but the
mask; the memory keeps the input's length, so ``attention_mask`` describes it as it is.

- :func:`bypass_memory`: the pure step — embeddings with vision rows in, encoder outputs out.
- :class:`GroundedBlip2ForConditionalGeneration`, :class:`GroundedInstructBlipForConditionalGeneration`: HF's
  classes (same parts, same weight names: ``Salesforce/blip2-flan-t5-*`` / ``instructblip-flan-t5-*`` load into
  them); ``bypass_encoder=False`` is exactly HF's model.
- :class:`GroundedVisionT5ForConditionalGeneration`: a vision tower and LLaVA's plain projector (no Q-Former) in
  front of a T5 — the vision rows are patch features, projected.

Each honours its HF counterpart's ``forward`` (``labels``, ``decoder_input_ids``, ``encoder_outputs``) and
``generate`` (greedy, beam search, sampling; T5's own KV cache). This file imports only torch and transformers (and
this package's model files): it travels with saved checkpoints (``trust_remote_code``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (AutoModel, AutoModelForSeq2SeqLM, Blip2ForConditionalGeneration, GenerationMixin,
                          InstructBlipForConditionalGeneration, PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .configuration_grounded_encdec import (GroundedBlip2Config, GroundedInstructBlipConfig,
                                            GroundedVisionT5Config)
from .grounding import GroundingError, pack_rows, scatter_rows
from .modeling_grounded_llava import ProjectorInit, VisionProjector, placeholder_mask, select_features


def bypass_memory(encoder: Any, inputs_embeds: torch.Tensor, vision_mask: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
                  output_attentions: bool = False) -> BaseModelOutput:
    """The decoder's memory when the vision rows bypass ``encoder`` (an HF encoder stack such as
    ``T5ForConditionalGeneration.get_encoder()``).

    ``inputs_embeds [B, T, d]`` hold the projected vision rows where ``vision_mask [B, T]`` is True and token
    embeddings elsewhere; ``attention_mask [B, T]`` marks padding. The text rows are packed and encoded alone
    (relative positions as if the vision rows were absent); the result ``last_hidden_state [B, T, d]`` holds the
    encoded text rows at their positions and the vision rows as given (padding rows: 0). With
    ``output_hidden_states`` each of the encoder's hidden states is laid out the same way, vision rows unchanged
    in all of them; ``attentions`` are the encoder's own, over the packed text rows.
    """
    if vision_mask.shape != inputs_embeds.shape[:2]:
        raise GroundingError(f"vision_mask {tuple(vision_mask.shape)} does not match inputs_embeds "
                             f"{tuple(inputs_embeds.shape)}")
    mask = (torch.ones(vision_mask.shape, dtype=torch.bool, device=vision_mask.device) if attention_mask is None
            else attention_mask.bool())
    vision_mask = vision_mask.bool()
    base = inputs_embeds.masked_fill(~(vision_mask & mask)[..., None], 0.0)
    index, valid = pack_rows(mask & ~vision_mask)
    if index.shape[1] == 0:  # no text at all: the memory is the vision rows
        n = 1 + (encoder.config.num_layers if output_hidden_states else 0)
        return BaseModelOutput(last_hidden_state=base, hidden_states=(base,) * n if output_hidden_states else None)
    gather = index[..., None].expand(-1, -1, inputs_embeds.shape[-1])
    enc = encoder(inputs_embeds=inputs_embeds.gather(1, gather), attention_mask=valid.long(),
                  output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True)

    def lay_out(rows: torch.Tensor) -> torch.Tensor:
        """Packed encoder rows back at their positions; the left fill of shorter samples leaves ``base`` alone."""
        rows = torch.where(valid[..., None], rows.to(base.dtype), base.gather(1, gather))
        return scatter_rows(base, index, rows)

    hidden = tuple(lay_out(h) for h in enc.hidden_states) if output_hidden_states else None
    return BaseModelOutput(last_hidden_state=lay_out(enc.last_hidden_state), hidden_states=hidden,
                           attentions=enc.attentions if output_attentions else None)


@dataclass
class GroundedEncDecOutput(ModelOutput):
    """``loss``, ``logits [B, T_dec, V]``, the vision tower's and (BLIP) Q-Former's outputs, and the LM's own
    ``Seq2SeqLMOutput`` (``encoder_last_hidden_state`` is the decoder's memory)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    vision_outputs: Any = None
    qformer_outputs: Any = None
    language_model_outputs: Any = None

    def to_tuple(self) -> tuple:
        return tuple(self[k] if k != "language_model_outputs" or not hasattr(self[k], "to_tuple")
                     else self[k].to_tuple() for k in self.keys())


class _EncoderBypass:
    """What the three grounded encoder–decoder classes share: embed the prompt with its vision rows (subclass:
    :meth:`_vision_rows`), build the decoder's memory — :func:`bypass_memory` with ``config.bypass_encoder``, the
    LM's encoder over every row without — and run the LM or its ``generate`` on it."""

    def _vision_rows(self, pixel_values: torch.Tensor | None, **kwargs: Any) -> tuple[Any, Any, Any]:
        """``[n_images, Q, d]`` rows for the LM (None without an image), the tower's and the Q-Former's outputs."""
        raise NotImplementedError

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the vision rows written into the placeholders; ``(embeds, vision_mask)``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise GroundingError("give exactly one of input_ids and inputs_embeds")
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        vision_mask = placeholder_mask(input_ids, embeds, self.config.image_token_index,
                                       self.get_input_embeddings())
        n_rows = 0 if rows is None else rows.shape[0] * rows.shape[1]
        if int(vision_mask.sum()) != n_rows:
            raise GroundingError(f"image tokens and image features do not match: {int(vision_mask.sum())} image "
                                 f"tokens in the input, {n_rows} vision rows")
        if n_rows:
            embeds = embeds.masked_scatter(vision_mask[..., None], rows.to(embeds.dtype))
        return embeds, vision_mask

    def _lm_forward(self, pixel_values, input_ids, attention_mask, inputs_embeds, encoder_outputs,
                    vision_kwargs: dict[str, Any], lm_kwargs: dict[str, Any]) -> GroundedEncDecOutput:
        """``encoder_outputs`` (a memory computed before, as ``generate`` passes it) skips the vision and encoder
        work. With ``labels`` the loss is the summed token cross-entropy over ``num_items_in_batch`` (transformers'
        loss keyword: the supervised tokens of the whole optimizer step), else its mean — T5's own loss."""
        vision_outputs = qformer_outputs = None
        labels = lm_kwargs.pop("labels", None)
        num_items = lm_kwargs.pop("num_items_in_batch", None)
        lm_kwargs.pop("return_logits", None)  # the trainer's keyword: the T5 head runs on decoder rows only anyway
        if labels is not None and lm_kwargs.get("decoder_input_ids") is None:
            lm_kwargs["decoder_input_ids"] = self.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
        lm_kwargs["return_dict"] = True
        if encoder_outputs is None:
            rows, vision_outputs, qformer_outputs = self._vision_rows(pixel_values, **vision_kwargs)
            embeds, vision_mask = self._embed(input_ids, inputs_embeds, rows)
            if self.config.bypass_encoder:
                encoder_outputs = bypass_memory(
                    self.language_model.get_encoder(), embeds, vision_mask, attention_mask,
                    output_hidden_states=bool(lm_kwargs.get("output_hidden_states")),
                    output_attentions=bool(lm_kwargs.get("output_attentions")))
            else:
                lm_kwargs["inputs_embeds"] = embeds
        out = self.language_model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, **lm_kwargs)
        loss = None
        if labels is not None:
            labels = labels.to(out.logits.device)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
            loss = loss / (num_items if num_items is not None else (labels != -100).sum().clamp_min(1))
            out.loss = loss
        return GroundedEncDecOutput(loss=loss, logits=out.logits, vision_outputs=vision_outputs,
                                    qformer_outputs=qformer_outputs, language_model_outputs=out)

    def _lm_generate(self, pixel_values, input_ids, attention_mask, inputs_embeds,
                     vision_kwargs: dict[str, Any], generate_kwargs: dict[str, Any]) -> torch.LongTensor:
        rows = self._vision_rows(pixel_values, **vision_kwargs)[0]
        if rows is not None and input_ids is None and inputs_embeds is None:  # as HF's BLIP: the image alone
            input_ids = torch.full(rows.shape[:2], self.config.image_token_index, dtype=torch.long,
                                   device=rows.device)
        embeds, vision_mask = self._embed(input_ids, inputs_embeds, rows)
        if attention_mask is None:
            attention_mask = torch.ones(vision_mask.shape, dtype=torch.long, device=vision_mask.device)
        if not self.config.bypass_encoder:
            return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                                **generate_kwargs)
        memory = bypass_memory(self.language_model.get_encoder(), embeds, vision_mask, attention_mask)
        return self.language_model.generate(encoder_outputs=memory, attention_mask=attention_mask,
                                            **generate_kwargs)


class GroundedBlip2ForConditionalGeneration(_EncoderBypass, Blip2ForConditionalGeneration):
    """BLIP-2 whose query rows bypass the T5 encoder (``config.bypass_encoder``; False: HF's BLIP-2)."""

    config_class = GroundedBlip2Config

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_query_tokens

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The frozen part: ``pixel_values`` → the vision model's last hidden state ``[n_images, P, D_v]`` (what
        the Q-Former cross-attends to; a trainer may store it)."""
        weight = self.vision_model.embeddings.patch_embedding.weight
        return self.vision_model(pixel_values.to(weight.device, weight.dtype), return_dict=True,
                                 interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The trained part: the Q-Former's queries over ``vision_features [n_images, P, D_v]``, projected →
        ``[n_images, Q, d]`` (what ``get_image_features`` returns as ``pooler_output``)."""
        query = self.query_tokens.expand(vision_features.shape[0], -1, -1)
        mask = torch.ones(vision_features.shape[:-1], dtype=torch.long, device=vision_features.device)
        out = self.qformer(query_embeds=query, encoder_hidden_states=vision_features, encoder_attention_mask=mask,
                           return_dict=True).last_hidden_state
        weight = self.language_projection.weight
        return self.language_projection(out.to(weight.dtype))

    def _vision_rows(self, pixel_values, interpolate_pos_encoding: bool = False, vision_features=None):
        if pixel_values is not None and vision_features is not None:
            raise GroundingError("give pixel_values or vision_features, not both")
        if vision_features is not None:
            return self.project(vision_features), None, None
        if pixel_values is None:
            return None, None, None
        out = self.get_image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                      return_dict=True)
        return out.pooler_output, out.vision_outputs, out.qformer_outputs

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.LongTensor | None = None, decoder_input_ids: torch.LongTensor | None = None,
                decoder_attention_mask: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, interpolate_pos_encoding: bool = False,
                encoder_outputs: Any = None, vision_features: torch.Tensor | None = None,
                **kwargs: Any) -> GroundedEncDecOutput:
        """HF's BLIP-2 forward; with ``bypass_encoder`` the memory is :func:`bypass_memory`'s. ``encoder_outputs``
        (a memory computed before, as ``generate`` passes it) skips the vision and encoder work;
        ``vision_features`` (:meth:`encode_images`' output) stand in for ``pixel_values``."""
        if not self.config.bypass_encoder and vision_features is None and encoder_outputs is None \
                and "num_items_in_batch" not in kwargs:
            return super().forward(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                   decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                   inputs_embeds=inputs_embeds, labels=labels,
                                   interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        return self._lm_forward(pixel_values, input_ids, attention_mask, inputs_embeds, encoder_outputs,
                                {"interpolate_pos_encoding": interpolate_pos_encoding,
                                 "vision_features": vision_features},
                                dict(decoder_input_ids=decoder_input_ids,
                                     decoder_attention_mask=decoder_attention_mask, labels=labels, **kwargs))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None = None, input_ids: torch.LongTensor | None = None,
                 attention_mask: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 interpolate_pos_encoding: bool = False, vision_features: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.LongTensor:
        """HF's BLIP-2 ``generate``; with ``bypass_encoder`` the T5 decodes from the bypass memory."""
        if not self.config.bypass_encoder and vision_features is None:
            return super().generate(pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                    inputs_embeds=inputs_embeds, interpolate_pos_encoding=interpolate_pos_encoding,
                                    **generate_kwargs)
        return self._lm_generate(pixel_values, input_ids, attention_mask, inputs_embeds,
                                 {"interpolate_pos_encoding": interpolate_pos_encoding,
                                  "vision_features": vision_features}, generate_kwargs)


class GroundedInstructBlipForConditionalGeneration(_EncoderBypass, InstructBlipForConditionalGeneration):
    """InstructBLIP whose query rows (instruction-aware: the Q-Former reads ``qformer_input_ids``) bypass the T5
    encoder (``config.bypass_encoder``; False: HF's InstructBLIP)."""

    config_class = GroundedInstructBlipConfig

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_query_tokens

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The frozen part: ``pixel_values`` → the vision model's last hidden state ``[n_images, P, D_v]``."""
        weight = self.vision_model.embeddings.patch_embedding.weight
        return self.vision_model(pixel_values.to(weight.device, weight.dtype), return_dict=True,
                                 interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def project(self, vision_features: torch.Tensor, qformer_input_ids: torch.Tensor,
                qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trained part: the Q-Former's queries, reading the instruction ``qformer_input_ids [n_images, L]``,
        over ``vision_features [n_images, P, D_v]``, projected → ``[n_images, Q, d]`` (``get_image_features``'
        ``pooler_output``)."""
        query = self.query_tokens.expand(vision_features.shape[0], -1, -1)
        query_mask = torch.ones(query.shape[:-1], dtype=torch.long, device=vision_features.device)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        out = self.qformer(input_ids=qformer_input_ids,
                           attention_mask=torch.cat([query_mask, qformer_attention_mask.to(query_mask)], 1),
                           query_embeds=query, encoder_hidden_states=vision_features,
                           encoder_attention_mask=torch.ones(vision_features.shape[:-1], dtype=torch.long,
                                                             device=vision_features.device),
                           return_dict=True).last_hidden_state[:, :query.shape[1]]
        weight = self.language_projection.weight
        return self.language_projection(out.to(weight.dtype))

    def _vision_rows(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None,
                     interpolate_pos_encoding: bool = False, vision_features=None):
        if pixel_values is not None and vision_features is not None:
            raise GroundingError("give pixel_values or vision_features, not both")
        if pixel_values is None and vision_features is None:
            return None, None, None
        if qformer_input_ids is None:
            raise GroundingError("InstructBLIP's Q-Former needs qformer_input_ids (the instruction)")
        if vision_features is not None:
            return self.project(vision_features, qformer_input_ids, qformer_attention_mask), None, None
        out = self.get_image_features(pixel_values, qformer_input_ids=qformer_input_ids,
                                      qformer_attention_mask=qformer_attention_mask,
                                      interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True)
        return out.pooler_output, out.vision_outputs, out.qformer_outputs

    def forward(self, pixel_values: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.LongTensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.LongTensor | None = None, decoder_input_ids: torch.LongTensor | None = None,
                decoder_attention_mask: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, interpolate_pos_encoding: bool = False,
                encoder_outputs: Any = None, vision_features: torch.Tensor | None = None,
                **kwargs: Any) -> GroundedEncDecOutput:
        """HF's InstructBLIP forward; with ``bypass_encoder`` the memory is :func:`bypass_memory`'s;
        ``vision_features`` (:meth:`encode_images`' output) stand in for ``pixel_values``."""
        if not self.config.bypass_encoder and vision_features is None and encoder_outputs is None \
                and "num_items_in_batch" not in kwargs:
            return super().forward(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
                                   qformer_attention_mask=qformer_attention_mask, input_ids=input_ids,
                                   attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                                   decoder_attention_mask=decoder_attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        vision = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask,
                  "interpolate_pos_encoding": interpolate_pos_encoding, "vision_features": vision_features}
        return self._lm_forward(pixel_values, input_ids, attention_mask, inputs_embeds, encoder_outputs, vision,
                                dict(decoder_input_ids=decoder_input_ids,
                                     decoder_attention_mask=decoder_attention_mask, labels=labels, **kwargs))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None = None, qformer_input_ids: torch.LongTensor | None = None,
                 qformer_attention_mask: torch.LongTensor | None = None, input_ids: torch.LongTensor | None = None,
                 attention_mask: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 interpolate_pos_encoding: bool = False, vision_features: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.LongTensor:
        """HF's InstructBLIP ``generate``; with ``bypass_encoder`` the T5 decodes from the bypass memory."""
        if not self.config.bypass_encoder and vision_features is None:
            return super().generate(pixel_values, qformer_input_ids=qformer_input_ids,
                                    qformer_attention_mask=qformer_attention_mask, input_ids=input_ids,
                                    attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                    interpolate_pos_encoding=interpolate_pos_encoding, **generate_kwargs)
        vision = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask,
                  "interpolate_pos_encoding": interpolate_pos_encoding, "vision_features": vision_features}
        return self._lm_generate(pixel_values, input_ids, attention_mask, inputs_embeds, vision, generate_kwargs)


class GroundedVisionT5PreTrainedModel(ProjectorInit, PreTrainedModel):
    config_class = GroundedVisionT5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True


class GroundedVisionT5ForConditionalGeneration(_EncoderBypass, GroundedVisionT5PreTrainedModel, GenerationMixin):
    """A vision tower → LLaVA's plain projector (no Q-Former) → a T5 whose encoder the vision rows bypass
    (``bypass_encoder``; False: they go through the encoder with the prompt). Placeholder tokens in ``input_ids``
    must already be expanded to ``config.num_image_tokens`` per image."""

    main_input_name = "input_ids"

    def __init__(self, config: GroundedVisionT5Config):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VisionProjector(config)
        self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_output_embeddings()

    def get_encoder(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        return self.language_model.get_encoder()

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part: ``[n_images, 3, H, W]`` → selected, pooled tower features ``[n_images, P, D_v]``."""
        tower = self.vision_tower
        hidden = tower(pixel_values.to(tower.device, tower.dtype), output_hidden_states=True,
                       return_dict=True).hidden_states[self.config.vision_feature_layer]
        return select_features(hidden, self.config)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The trained part: ``[n_images, P, D_v]`` → ``[n_images, P, d]``."""
        weight = self.multi_modal_projector.linear_1.weight
        return self.multi_modal_projector(vision_features.to(weight.device, weight.dtype))

    def _vision_rows(self, pixel_values, vision_features=None):
        if pixel_values is not None and vision_features is not None:
            raise GroundingError("give pixel_values or vision_features, not both")
        if pixel_values is not None:
            vision_features = self.encode_images(pixel_values)
        return (None if vision_features is None else self.project(vision_features)), None, None

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.LongTensor | None = None, decoder_input_ids: torch.LongTensor | None = None,
                decoder_attention_mask: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, encoder_outputs: Any = None,
                vision_features: torch.Tensor | None = None, **kwargs: Any) -> GroundedEncDecOutput:
        """``input_ids [B, T]`` with expanded placeholders, ``pixel_values [n_images, 3, H, W]`` or the cached
        ``vision_features [n_images, P, D_v]``; the rest as ``T5ForConditionalGeneration``."""
        return self._lm_forward(pixel_values, input_ids, attention_mask, inputs_embeds, encoder_outputs,
                                {"vision_features": vision_features},
                                dict(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                     labels=labels, **kwargs))

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 vision_features: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.LongTensor:
        """The T5's ``generate`` from the bypass memory (or from the prompt with its vision rows encoded)."""
        return self._lm_generate(pixel_values, input_ids, attention_mask, inputs_embeds,
                                 {"vision_features": vision_features}, generate_kwargs)


GroundedBlip2Config.register_for_auto_class()
GroundedInstructBlipConfig.register_for_auto_class()
GroundedVisionT5Config.register_for_auto_class()
GroundedBlip2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
GroundedInstructBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
GroundedVisionT5ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
