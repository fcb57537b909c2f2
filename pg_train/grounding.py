"""The grounded forward pass: vision rows skip the first ``L`` decoder layers (the paper's Sec. 4, Fig. 4).

:func:`grounded_forward` runs an HF causal LM of the LLaMA family (Llama, Mistral, Qwen2) layer by layer, using
the model's own decoder layers, rotary embedding, norm and head — nothing is re-implemented:

- position ids are those of the full sequence (cumulative count of attended rows), for every row in every layer,
  so RoPE sees the true relative distances even where vision rows are absent;
- layers ``0 … L−1`` run on the text rows only (``mode="splice"``: the vision rows are removed, not masked);
- at the input of layer ``L`` the vision rows enter with their ``inputs_embeds`` values at their positions, and
  layers ``L … N−1`` run causally on the whole sequence;
- ``mode="mask"`` is the equivalent "dummy token" variant: every layer sees the whole sequence, text→vision
  attention is masked out below ``L``, and the vision rows' hidden states are overwritten with ``inputs_embeds`` at
  the input of layer ``L``. Same logits at text rows; costs the full compute. Useful as a check and for tools that
  need fixed sequence shapes.

KV cache (:class:`GroundedCache`): layers ``< L`` cache the text rows only, layers ``≥ L`` all rows, so the
per-layer cache lengths differ. The cache remembers each segment's key padding mask and the next position id, so a
continuation call passes only the *new* rows and their own ``attention_mask`` ``[B, T_new]``.

>>> out = grounded_forward(model, embeds, vision_mask, insert_layer=4, attention_mask=mask, use_cache=True)  # doctest: +SKIP
>>> step = grounded_forward(model, next_embeds, None, 4, past_key_values=out.past_key_values, use_cache=True)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from pg_analysis.errors import InputError

#: ``config.model_type`` of decoders whose layers share LLaMA's call signature (rotary embeddings passed in).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

MODES = ("splice", "mask")


# ----------------------------------------------------------------------------------------------------------------
# pure helpers: positions, packing, masks


def full_positions(attention_mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` position ids: cumulative count of attended rows minus one (+ ``start [B]``); pads get the
    position of the previous attended row (0 before any)."""
    pos = attention_mask.long().cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return pos.clamp_min(0)


def pack_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept rows of each sample, in order, right-aligned.

    ``keep: [B, T]`` bool → ``index [B, T_s]`` (long, a subset of each row's positions, unique per row) and
    ``valid [B, T_s]`` (False on the left fill of samples with fewer kept rows), ``T_s = max kept count``.
    """
    t = keep.shape[1]
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # dropped rows first, kept rows after, in order
    t_s = int(keep.sum(1).max()) if keep.numel() else 0
    index = order[:, t - t_s:]
    return index, keep.gather(1, index)


def causal_key_mask(key_mask: torch.Tensor, n_query: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, Q, S]`` for the last ``Q`` rows of a segment whose keys are ``key_mask [B, S]``.

    Query ``i`` sits at key index ``S − Q + i`` and may attend key ``j`` iff ``j ≤ S − Q + i`` and ``key_mask[j]``.
    Rows that may attend nothing (padding queries) get a finite minimum everywhere: no NaNs, outputs ignored.
    """
    s = key_mask.shape[1]
    q_idx = torch.arange(s - n_query, s, device=key_mask.device)[:, None]
    k_idx = torch.arange(s, device=key_mask.device)[None, :]
    allowed = (k_idx <= q_idx)[None, None] & key_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# cache


class GroundedCache(DynamicCache):
    """A ``DynamicCache`` whose layers below ``insert_layer`` hold fewer rows, plus what a continuation needs.

    ``key_masks["low"] [B, S_low]`` and ``key_masks["high"] [B, S_high]`` are the padding masks of the cached keys
    of layers ``< L`` and ``≥ L``; ``next_position [B]`` is the position id of the next row.
    """

    def __init__(self, insert_layer: int, mode: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.insert_layer = insert_layer
        self.mode = mode
        self.key_masks: dict[str, torch.Tensor] = {}
        self.next_position: torch.Tensor | None = None

    def repeat_rows(self, repeats: int) -> "GroundedCache":
        """Repeat every sample ``repeats`` times in place (score many continuations of one prefix)."""
        self.batch_repeat_interleave(repeats)
        self.key_masks = {seg: m.repeat_interleave(repeats, 0) for seg, m in self.key_masks.items()}
        if self.next_position is not None:
            self.next_position = self.next_position.repeat_interleave(repeats, 0)
        return self

    def layer_lengths(self) -> list[int]:
        return [self.get_seq_length(i) for i in range(len(self.layers))]

    def nbytes(self) -> int:
        """Bytes held by cached keys and values (all layers)."""
        total = 0
        for layer in self.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


# ----------------------------------------------------------------------------------------------------------------
# the forward


@dataclass(frozen=True)
class DecoderParts:
    """What :func:`grounded_forward` drives: the text config, the decoder (``.layers``, ``.rotary_emb``, ``.norm``)
    and the head. A ``*ForCausalLM`` provides them as ``.config``, ``.model``, ``.lm_head``; a VLM passes its
    language model's parts explicitly."""

    config: Any
    model: Any
    lm_head: Any


def decoder_parts(model: Any) -> DecoderParts:
    """The :class:`DecoderParts` of a supported causal LM (or ``model`` itself if it already is one)."""
    parts = model if isinstance(model, DecoderParts) else DecoderParts(
        getattr(model, "config", None), getattr(model, "model", None), getattr(model, "lm_head", None))
    model_type = getattr(parts.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"grounded_forward supports {', '.join(SUPPORTED_MODEL_TYPES)} decoders, "
                         f"not model_type {model_type!r}")
    if parts.model is None or not hasattr(parts.model, "layers") or parts.lm_head is None:
        raise InputError(f"{type(model).__name__}: expected a *ForCausalLM with .model.layers and .lm_head")
    return parts


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits [B, T, V]`` at ``t`` predict ``labels [B, T]`` at ``t+1``; -100 ignored."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def _check_sliding_window(config: Any, length: int) -> None:
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", True)
    if window is not None and uses and length > window:
        raise InputError(f"sequence length {length} exceeds the model's sliding window {window}, "
                         "which grounded_forward does not implement")


def _run_layers(layers: Any, hidden: torch.Tensor, mask4d: torch.Tensor, positions: torch.Tensor, rotary: Any,
                cache: GroundedCache | None, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    if not len(layers):
        return hidden
    if cos_sin is None:
        cos_sin = rotary(hidden, position_ids=positions)
    for layer in layers:
        out = layer(hidden, attention_mask=mask4d, position_ids=positions, past_key_values=cache,
                    use_cache=cache is not None, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def grounded_forward(model: Any, inputs_embeds: torch.Tensor, vision_mask: torch.Tensor | None, insert_layer: int,
                     attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                     past_key_values: GroundedCache | None = None, use_cache: bool = False,
                     mode: str = "splice", logits_to_keep: int = 0,
                     return_logits: bool = True) -> CausalLMOutputWithPast:
    """Run ``model`` with the rows marked by ``vision_mask`` entering at layer ``insert_layer``.

    Args:
        model: an HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``, or the
            :class:`DecoderParts` of one (as a VLM passes its language model).
        inputs_embeds: ``[B, T, d]`` the full sequence, projected vision rows already in place.
        vision_mask: ``[B, T]`` bool, True at vision rows (any count per sample, zero included); None = no vision.
        insert_layer: ``L`` in ``[0, N]``. 0 is the ordinary model; N sends vision rows to the final norm only.
        attention_mask: ``[B, T]`` 1 = attend, 0 = padding (left or right). With ``past_key_values`` it covers
            the new rows only; the cache remembers the past.
        labels: ``[B, T]`` token ids, -100 = ignored; the usual shifted cross-entropy is returned as ``loss``.
        past_key_values: a :class:`GroundedCache` from a previous call (new rows must be text rows).
        use_cache: return a :class:`GroundedCache` in ``past_key_values``.
        mode: ``"splice"`` (vision rows absent below L) or ``"mask"`` (present but masked; same text outputs).
        logits_to_keep: ``k > 0`` computes logits for the last ``k`` rows only (``[B, k, V]``; no loss then).
        return_logits: False with ``labels`` runs the head only on the rows that predict a label (the loss is the
            same; ``logits`` is None) — in instruction tuning most rows are unsupervised, so this saves most of the
            head's cost.

    Returns:
        ``CausalLMOutputWithPast`` with ``logits [B, T, V]`` and ``loss`` when ``labels`` is given.
    """
    parts = decoder_parts(model)
    base, lm_head, config = parts.model, parts.lm_head, parts.config
    n_layers = len(base.layers)
    if isinstance(insert_layer, bool) or not isinstance(insert_layer, int) or not 0 <= insert_layer <= n_layers:
        raise InputError(f"insert_layer must be an integer in [0, {n_layers}], got {insert_layer!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise InputError(f"inputs_embeds must be [B, T, {config.hidden_size}], got {tuple(inputs_embeds.shape)}")
    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if vision_mask is None:
        vision_mask = torch.zeros(b, t, dtype=torch.bool, device=device)
    if tuple(vision_mask.shape) != (b, t):
        raise InputError(f"vision_mask must be [B, T] = {(b, t)}, got {tuple(vision_mask.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
    if tuple(attention_mask.shape) != (b, t):
        raise InputError(f"attention_mask must be [B, T] = {(b, t)} (new rows only when continuing a cache), "
                         f"got {tuple(attention_mask.shape)}")
    if labels is not None and tuple(labels.shape) != (b, t):
        raise InputError(f"labels must be [B, T] = {(b, t)}, got {tuple(labels.shape)}")
    vision_mask = vision_mask.bool()
    attn = attention_mask.bool()
    layers = base.layers
    low, high = layers[:insert_layer], layers[insert_layer:]
    dtype = inputs_embeds.dtype

    if past_key_values is not None:
        cache = past_key_values
        if not isinstance(cache, GroundedCache):
            raise InputError("past_key_values must be the GroundedCache returned by grounded_forward")
        if cache.insert_layer != insert_layer or cache.mode != mode:
            raise InputError(f"cache was built with insert_layer={cache.insert_layer}, mode={cache.mode!r}; "
                             f"got insert_layer={insert_layer}, mode={mode!r}")
        if vision_mask.any():
            raise InputError("vision rows can only be given in the first (prefill) call, not with a cache")
        positions = full_positions(attn, cache.next_position)
        _check_sliding_window(config, int(cache.next_position.max()) + t)
        masks = {seg: torch.cat([cache.key_masks[seg], attn], 1) for seg in ("low", "high")}
        cos_sin = base.rotary_emb(inputs_embeds, position_ids=positions)  # the same rows in both segments
        hidden = _run_layers(low, inputs_embeds, causal_key_mask(masks["low"], t, dtype), positions,
                             base.rotary_emb, cache, cos_sin)
        hidden = _run_layers(high, hidden, causal_key_mask(masks["high"], t, dtype), positions, base.rotary_emb,
                             cache, cos_sin)
        cache.key_masks = masks
    else:
        cache = GroundedCache(insert_layer, mode) if use_cache else None
        positions = full_positions(attn)
        _check_sliding_window(config, t)
        hidden = inputs_embeds
        if insert_layer > 0 and mode == "splice":
            index, valid = pack_rows(~vision_mask)
            expand = index[..., None].expand(-1, -1, inputs_embeds.shape[-1])
            stream = inputs_embeds.gather(1, expand)
            low_keys = attn.gather(1, index) & valid
            stream = _run_layers(low, stream, causal_key_mask(low_keys, stream.shape[1], dtype),
                                 positions.gather(1, index), base.rotary_emb, cache)
            # splice: text rows take their layer-L input from the stream; vision rows keep inputs_embeds
            src = torch.where(valid[..., None], stream, inputs_embeds.gather(1, expand))
            hidden = inputs_embeds.scatter(1, expand, src)
        elif insert_layer > 0:
            low_keys = attn & ~vision_mask
            hidden = _run_layers(low, inputs_embeds, causal_key_mask(low_keys, t, dtype), positions,
                                 base.rotary_emb, cache)
            hidden = torch.where(vision_mask[..., None], inputs_embeds, hidden)
        else:
            low_keys = attn[:, :0]
        hidden = _run_layers(high, hidden, causal_key_mask(attn, t, dtype), positions, base.rotary_emb, cache)
        if cache is not None:
            cache.key_masks = {"low": low_keys, "high": attn}
    if cache is not None:
        start = past_key_values.next_position if past_key_values is not None else 0
        cache.next_position = start + attn.long().sum(1)  # positions count attended rows only

    if logits_to_keep:
        if labels is not None:
            raise InputError("logits_to_keep cannot be combined with labels")
        hidden = hidden[:, -logits_to_keep:]
    if labels is not None and not return_logits:
        predicts = labels[:, 1:] != -100  # row t predicts label t+1
        rows = base.norm(hidden[:, :-1][predicts])
        loss = torch.nn.functional.cross_entropy(lm_head(rows).float(), labels[:, 1:][predicts])
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=cache if use_cache else None)
    logits = lm_head(base.norm(hidden))
    loss = None
    if labels is not None:
        loss = causal_lm_loss(logits, labels)
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
