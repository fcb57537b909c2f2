"""The grounded forward pass: vision rows skip the first ``L`` decoder layers (the paper's Sec. 4, Fig. 4).

:func:`grounded_forward` runs an HF causal LM of the LLaMA family (Llama, Mistral, Qwen2, Qwen3, Phi-3) layer by
layer, using the model's own decoder layers, rotary embedding, norm and head — nothing is re-implemented:

- position ids are those of the full sequence (cumulative count of attended rows), for every row in every layer,
  so RoPE sees the true relative distances even where vision rows are absent;
- layers ``0 … L−1`` run on the text rows only (``mode="splice"``: the vision rows are removed, not masked);
- at the input of layer ``L`` the vision rows enter with their ``inputs_embeds`` values at their positions, and
  layers ``L … N−1`` run causally on the whole sequence;
- ``exit_layer=K`` (``L ≤ K ≤ N``, default N) closes the window at the other end, as VTW withdraws vision tokens:
  layers ``K … N−1`` run on the text rows only again, so vision rows enter at L and leave after K−1.

      layer:    0 … L−1   │ L … K−1        │ K … N−1
      text:     ██████████│████████████████│██████████
      vision:   (absent)  │████████████████│(absent: left)

- ``mode="mask"`` is the equivalent "dummy token" variant: every layer sees the whole sequence, text→vision
  attention is masked out outside the window, and the vision rows' hidden states are overwritten with
  ``inputs_embeds`` at the input of layer ``L`` (and kept at their layer-K state from K on). Same logits at text
  rows; costs the full compute. Useful as a check and for tools that need fixed sequence shapes.

KV cache (:class:`GroundedCache`): layers outside the window cache the text rows only, layers inside it all rows,
so the per-layer cache lengths differ. The cache remembers each segment's key padding mask and the next position
id, so a continuation call passes only the *new* rows and their own ``attention_mask`` ``[B, T_new]``.

Sliding-window layers (Mistral; Qwen2's ``layer_types``) get their window in every segment, counted in rows of the
full sequence as transformers counts it (:func:`layer_windows`; :func:`causal_key_mask` composes transformers'
own causal, padding and sliding-window mask rules).

What the optional outputs hold (identical in both modes):

- ``hidden_states``: ``N + 1`` tensors ``[B, T, d]`` over the rows of this call — index 0 the embeddings (vision
  rows: the projected rows), index ``i`` the output of block ``i``, the last one after the final norm (HF's
  convention). At indices ``0 … L`` the vision rows hold the rows they enter layer ``L`` with (they wait,
  unchanged); from index ``K + 1`` on they hold their state at index ``K`` (they have left).
- ``attentions``: ``N`` tensors ``[B, heads, T, S]`` (``S`` = all rows so far, in full-sequence order), eager
  attention only. Outside the window (layers ``< L`` and ``≥ K``) the columns of vision rows are exactly 0 (text
  cannot see them) and so are the rows of vision queries (they are not computed). Padding query rows are 0 in
  every layer.

This module imports only torch and transformers: it travels inside saved checkpoints with the grounded model's
code (``trust_remote_code``). Errors are :class:`GroundingError`, a plain ``ValueError``.

>>> out = grounded_forward(model, embeds, vision_mask, insert_layer=4, attention_mask=mask, use_cache=True)  # doctest: +SKIP
>>> step = grounded_forward(model, next_embeds, None, 4, cache=out.cache, use_cache=True)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import DynamicCache
from transformers.masking_utils import and_masks, causal_mask_function, padding_mask_function, sliding_window_overlay
from transformers.modeling_outputs import CausalLMOutputWithPast

#: ``config.model_type`` of decoders whose layers share LLaMA's call signature (rotary embeddings passed in); each
#: is tested equal to its HF model at L = 0 and splice equal to mask at L > 0.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")

MODES = ("splice", "mask")

#: The name under which the installed transformers passes and returns the KV cache: ``cache`` since 5.24,
#: ``past_key_values`` before. Read from transformers' own output class, never from its version number.
CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
               else "past_key_values")


class GroundingError(ValueError):
    """Bad arguments to the grounded model or its forward (shapes, ranges, modes, a foreign cache)."""


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


def causal_key_mask(key_mask: torch.Tensor, n_query: int, dtype: torch.dtype, window: int | None = None,
                    key_rows: torch.Tensor | None = None, query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask ``[B, 1, Q, S]`` for the last ``Q`` rows of a segment whose keys are ``key_mask [B, S]``,
    composed from transformers' own mask rules (``transformers.masking_utils``: causal, padding, sliding-window
    overlay), evaluated on the segment's index grid.

    Query ``i`` sits at key index ``S − Q + i`` and may attend key ``j`` iff ``j ≤ S − Q + i`` and ``key_mask[j]``.
    With a sliding ``window`` W, also iff ``key_rows[j] > query_rows[i] − W``: the window rule applied to the rows'
    indices in the full sequence (``[B, S]`` and ``[B, Q]``) — so a packed segment without the vision rows keeps
    the window the full sequence has. Rows that may attend nothing (padding queries) get a finite minimum
    everywhere: no NaNs, outputs ignored.
    """
    b, s = key_mask.shape
    offset = s - n_query
    rules = [lambda bi, h, q, kv: causal_mask_function(bi, h, q + offset, kv), padding_mask_function(key_mask.bool())]
    if window is not None:
        overlay = sliding_window_overlay(window)
        rules.append(lambda bi, h, q, kv: overlay(bi, h, query_rows[bi, q], key_rows[bi, kv]))
    device = key_mask.device
    allowed = and_masks(*rules)(torch.arange(b, device=device)[:, None, None, None], 0,
                                torch.arange(n_query, device=device)[None, None, :, None],
                                torch.arange(s, device=device)[None, None, None, :])
    allowed = allowed.expand(b, 1, n_query, s)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class _SegmentKeys:
    """What a segment's queries may see: padding mask of its keys ``[B, S]``, the keys' and queries' rows in the
    full sequence (``[B, S]``, ``[B, Q]``); one additive mask per window size, made once."""

    key_mask: torch.Tensor
    key_rows: torch.Tensor
    query_rows: torch.Tensor
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            self._masks[window] = causal_key_mask(self.key_mask, self.query_rows.shape[1], self.dtype, window,
                                                  self.key_rows, self.query_rows)
        return self._masks[window]


def layer_windows(config: Any, n_layers: int) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), from the config as transformers reads it:
    ``layer_types`` where the config has them (Qwen2: ``max_window_layers``), else ``sliding_window`` for every
    layer (Mistral) unless ``use_sliding_window`` is off."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types[:n_layers]]
    if window is None or not getattr(config, "use_sliding_window", True):
        return [None] * n_layers
    return [window] * n_layers


def scatter_rows(full: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``full [B, T, d]`` with ``rows [B, T_s, d]`` written at ``index [B, T_s]`` (out of place)."""
    return full.scatter(1, index[..., None].expand(-1, -1, full.shape[-1]), rows)


def scatter_attention(weights: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                      n_query: int, n_key: int) -> torch.Tensor:
    """Attention over packed rows ``[B, H, Q_s, S_s]`` placed in a zero ``[B, H, n_query, n_key]`` at the rows
    ``query_index [B, Q_s]`` and columns ``key_index [B, S_s]`` (each unique per sample)."""
    b, h, q_s, s_s = weights.shape
    cols = torch.zeros(b, h, q_s, n_key, dtype=weights.dtype, device=weights.device)
    cols = cols.scatter(3, key_index[:, None, None, :].expand(b, h, q_s, s_s), weights)
    out = torch.zeros(b, h, n_query, n_key, dtype=weights.dtype, device=weights.device)
    return out.scatter(2, query_index[:, None, :, None].expand(b, h, q_s, n_key), cols)


# ----------------------------------------------------------------------------------------------------------------
# cache


class GroundedCache(DynamicCache):
    """A ``DynamicCache`` whose layers outside the window ``[insert_layer, exit_layer)`` hold the text rows only,
    plus what a continuation needs.

    ``key_masks["low"] [B, S_low]`` and ``key_masks["high"] [B, S_high]`` are the padding masks of the cached keys
    of the text-only layers (``< L`` and ``≥ K``, which hold the same rows) and of the window's layers;
    ``low_index [B, S_low]`` the full-sequence row of each text-only key;
    ``next_position [B]`` the position id of the next row. Beam search reorders, and batch expansion repeats,
    all of them with the keys and values.
    """

    def __init__(self, insert_layer: int, mode: str, exit_layer: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.insert_layer = insert_layer
        self.exit_layer = exit_layer
        self.mode = mode
        self.key_masks: dict[str, torch.Tensor] = {}
        self.low_index: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None

    def _rows(self, pick: Any) -> None:
        """Apply ``pick`` (a function of a ``[B, …]`` tensor) to every per-sample tensor the cache keeps."""
        self.key_masks = {seg: pick(m) for seg, m in self.key_masks.items()}
        if self.low_index is not None:
            self.low_index = pick(self.low_index)
        if self.next_position is not None:
            self.next_position = pick(self.next_position)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])

    def crop(self, *args: Any, **kwargs: Any) -> None:
        raise GroundingError("a GroundedCache cannot be cropped (assisted or speculative decoding is not supported)")

    def repeat_rows(self, repeats: int) -> "GroundedCache":
        """Repeat every sample ``repeats`` times in place (score many continuations of one prefix)."""
        self.batch_repeat_interleave(repeats)
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


@dataclass
class GroundedOutput:
    """What :func:`grounded_forward` returns (shapes in the module docstring)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: GroundedCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def decoder_parts(model: Any) -> DecoderParts:
    """The :class:`DecoderParts` of a supported causal LM (or ``model`` itself if it already is one)."""
    parts = model if isinstance(model, DecoderParts) else DecoderParts(
        getattr(model, "config", None), getattr(model, "model", None), getattr(model, "lm_head", None))
    model_type = getattr(parts.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GroundingError(f"grounded_forward supports {', '.join(SUPPORTED_MODEL_TYPES)} decoders, "
                             f"not model_type {model_type!r}")
    if getattr(parts.config, "use_bidirectional_attention", False):
        raise GroundingError(f"{type(model).__name__} attends bidirectionally (an embedding model): grounding "
                             "needs a causal decoder")
    if parts.model is None or not hasattr(parts.model, "layers") or parts.lm_head is None:
        raise GroundingError(f"{type(model).__name__}: expected a *ForCausalLM with .model.layers and .lm_head")
    return parts


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Next-token cross-entropy: ``logits [B, T, V]`` at ``t`` predict ``labels [B, T]`` at ``t+1``; -100 ignored.
    The mean over the supervised tokens, or with ``num_items_in_batch`` (transformers' convention for gradient
    accumulation and several processes) their sum divided by that count."""
    logits, labels = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch


@functools.lru_cache(maxsize=None)
def _layer_cache_kwarg(layer_type: type) -> str:
    """The keyword the installed decoder layer takes its cache by (``cache``, or ``past_key_values`` before 5.24)."""
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def _attention_weights(layers: Any, sink: list | None) -> Iterator[None]:
    """Append each layer's attention weights ``[B, H, Q, S]`` to ``sink`` (None: record nothing)."""
    if sink is None:
        yield
        return

    def hook(module: Any, args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise GroundingError("output_attentions needs eager attention: "
                                 "model.set_attn_implementation('eager') (sdpa and flash return no weights)")
        sink.append(weights)

    handles = [layer.self_attn.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_rotary_types(config: Any, rotary: Any, n_layers: int) -> list[str | None]:
    """Which rotary embedding each decoder layer takes: the layer's type where the model's rotary embedding is
    per layer type (Gemma 3: local sliding layers and global layers have their own bases), else None (one for all)."""
    if "layer_type" not in inspect.signature(type(rotary).forward).parameters:
        return [None] * n_layers
    return list(config.layer_types[:n_layers])


def rotary_embeddings(rotary: Any, x: torch.Tensor, positions: torch.Tensor,
                      types: list[str | None]) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """``(cos, sin)`` at ``positions`` for each rotary type in ``types``."""
    return {kind: rotary(x, positions) if kind is None else rotary(x, positions, kind) for kind in set(types)}


def _run_layers(layers: Any, hidden: torch.Tensor, keys: _SegmentKeys, windows: list[int | None],
                types: list[str | None], positions: torch.Tensor, rotary: Any, cache: GroundedCache | None,
                cos_sin: dict[str | None, tuple[torch.Tensor, torch.Tensor]] | None = None,
                states: list | None = None, weights: list | None = None) -> torch.Tensor:
    """Run ``layers`` in order, each with the mask of its own window and its own rotary type; append each output
    to ``states`` and each attention map to ``weights``."""
    if not len(layers):
        return hidden
    if cos_sin is None:
        cos_sin = rotary_embeddings(rotary, hidden, positions, types)
    with _attention_weights(layers, weights):
        for layer, window, kind in zip(layers, windows, types):
            out = layer(hidden, attention_mask=keys.mask(window), position_ids=positions, use_cache=cache is not None,
                        position_embeddings=cos_sin[kind], **{_layer_cache_kwarg(type(layer)): cache})
            hidden = out[0] if isinstance(out, tuple) else out
            if states is not None:
                states.append(hidden)
    return hidden


def grounded_forward(model: Any, inputs_embeds: torch.Tensor, vision_mask: torch.Tensor | None, insert_layer: int,
                     attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                     cache: GroundedCache | None = None, use_cache: bool = False, mode: str = "splice",
                     logits_to_keep: int = 0, return_logits: bool = True, output_hidden_states: bool = False,
                     output_attentions: bool = False, exit_layer: int | None = None,
                     num_items_in_batch: Any = None) -> GroundedOutput:
    """Run ``model`` with the rows marked by ``vision_mask`` entering at layer ``insert_layer``.

    Args:
        model: an HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``, or the
            :class:`DecoderParts` of one (as a VLM passes its language model).
        inputs_embeds: ``[B, T, d]`` the full sequence, projected vision rows already in place.
        vision_mask: ``[B, T]`` bool, True at vision rows (any count per sample, zero included); None = no vision.
        insert_layer: ``L`` in ``[0, N]``. 0 is the ordinary model; N sends vision rows to the final norm only.
        exit_layer: ``K`` in ``[L, N]`` (None = N): from layer K on the vision rows are gone again — absent from
            the stream (splice) or unseen (mask); text rows keep what they read from them in layers L … K−1.
        attention_mask: ``[B, T]`` 1 = attend, 0 = padding (left or right). With ``cache`` it covers the new rows
            only; the cache remembers the past.
        labels: ``[B, T]`` token ids, -100 = ignored; the usual shifted cross-entropy is returned as ``loss``.
        num_items_in_batch: with ``labels``, the loss is the cross-entropy summed over the supervised tokens and
            divided by this count (transformers' convention: the tokens of the whole optimizer step).
        cache: a :class:`GroundedCache` from a previous call (new rows must be text rows).
        use_cache: return a :class:`GroundedCache` in ``cache``.
        mode: ``"splice"`` (vision rows absent below L) or ``"mask"`` (present but masked; same text outputs).
        logits_to_keep: ``k > 0`` computes logits for the last ``k`` rows only (``[B, k, V]``; no loss then).
        return_logits: False with ``labels`` runs the head only on the rows that predict a label (the loss is the
            same; ``logits`` is None) — in instruction tuning most rows are unsupervised, so this saves most of the
            head's cost.
        output_hidden_states / output_attentions: return per-layer states / attention maps (module docstring).

    Returns:
        :class:`GroundedOutput` with ``logits [B, T, V]``, ``loss`` when ``labels`` is given, ``cache``.
    """
    parts = decoder_parts(model)
    base, lm_head, config = parts.model, parts.lm_head, parts.config
    n_layers = len(base.layers)
    if isinstance(insert_layer, bool) or not isinstance(insert_layer, int) or not 0 <= insert_layer <= n_layers:
        raise GroundingError(f"insert_layer must be an integer in [0, {n_layers}], got {insert_layer!r}")
    exit_layer = n_layers if exit_layer is None else exit_layer
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not insert_layer <= exit_layer <= n_layers:
        raise GroundingError(f"exit_layer must be an integer in [insert_layer, {n_layers}] = [{insert_layer}, "
                             f"{n_layers}], got {exit_layer!r}")
    if mode not in MODES:
        raise GroundingError(f"mode must be one of {MODES}, got {mode!r}")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise GroundingError(f"inputs_embeds must be [B, T, {config.hidden_size}], got {tuple(inputs_embeds.shape)}")
    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if vision_mask is None:
        vision_mask = torch.zeros(b, t, dtype=torch.bool, device=device)
    if tuple(vision_mask.shape) != (b, t):
        raise GroundingError(f"vision_mask must be [B, T] = {(b, t)}, got {tuple(vision_mask.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
    if tuple(attention_mask.shape) != (b, t):
        raise GroundingError(f"attention_mask must be [B, T] = {(b, t)} (new rows only when continuing a cache), "
                             f"got {tuple(attention_mask.shape)}")
    if labels is not None and tuple(labels.shape) != (b, t):
        raise GroundingError(f"labels must be [B, T] = {(b, t)}, got {tuple(labels.shape)}")
    vision_mask = vision_mask.bool()
    attn = attention_mask.bool()
    layers = base.layers
    # three segments: text only below L, every row from L to K, text only again from K
    low, mid, top = layers[:insert_layer], layers[insert_layer:exit_layer], layers[exit_layer:]
    windows = layer_windows(config, n_layers)
    w_low, w_mid, w_top = windows[:insert_layer], windows[insert_layer:exit_layer], windows[exit_layer:]
    types = layer_rotary_types(config, base.rotary_emb, n_layers)
    r_low, r_mid, r_top = types[:insert_layer], types[insert_layer:exit_layer], types[exit_layer:]
    dtype = inputs_embeds.dtype
    record = {seg: ([] if output_hidden_states else None) for seg in ("low", "mid", "top")}
    weights = {seg: ([] if output_attentions else None) for seg in ("low", "mid", "top")}
    rows = torch.arange(t, device=device).expand(b, t)

    if cache is not None:
        if not isinstance(cache, GroundedCache):
            raise GroundingError("the cache must be the GroundedCache returned by grounded_forward")
        if (cache.insert_layer, cache.exit_layer, cache.mode) != (insert_layer, exit_layer, mode):
            raise GroundingError(f"cache was built with insert_layer={cache.insert_layer}, exit_layer="
                                 f"{cache.exit_layer}, mode={cache.mode!r}; got insert_layer={insert_layer}, "
                                 f"exit_layer={exit_layer}, mode={mode!r}")
        if vision_mask.any():
            raise GroundingError("vision rows can only be given in the first (prefill) call, not with a cache")
        positions = full_positions(attn, cache.next_position)
        s_past = cache.key_masks["high"].shape[1]
        masks = {seg: torch.cat([cache.key_masks[seg], attn], 1) for seg in ("low", "high")}
        low_index = torch.cat([cache.low_index, rows + s_past], 1)
        cos_sin = rotary_embeddings(base.rotary_emb, inputs_embeds, positions, types)  # the same rows everywhere
        new_rows = rows + s_past
        text_keys = _SegmentKeys(masks["low"], low_index, new_rows, dtype)
        full_keys = _SegmentKeys(masks["high"], torch.arange(s_past + t, device=device).expand(b, -1), new_rows,
                                 dtype)
        hidden = _run_layers(low, inputs_embeds, text_keys, w_low, r_low, positions, base.rotary_emb, cache,
                             cos_sin, record["low"], weights["low"])
        hidden = _run_layers(mid, hidden, full_keys, w_mid, r_mid, positions, base.rotary_emb, cache, cos_sin,
                             record["mid"], weights["mid"])
        hidden = _run_layers(top, hidden, text_keys, w_top, r_top, positions, base.rotary_emb, cache, cos_sin,
                             record["top"], weights["top"])
        for seg in ("low", "top"):  # text-segment keys are a subset of the full sequence's rows
            if weights[seg]:
                weights[seg] = [scatter_attention(w, rows, low_index, t, s_past + t) for w in weights[seg]]
    else:
        cache = GroundedCache(insert_layer, mode, exit_layer=exit_layer) if use_cache else None
        positions = full_positions(attn)
        text_segments = insert_layer > 0 or exit_layer < n_layers
        if text_segments and mode == "splice":
            index, valid = pack_rows(~vision_mask)
            low_keys, low_index = attn.gather(1, index) & valid, index
            text_keys = _SegmentKeys(low_keys, index, index, dtype)
        elif text_segments:
            low_keys, low_index = attn & ~vision_mask, rows
            text_keys = _SegmentKeys(low_keys, rows, rows, dtype)
        else:
            low_keys, low_index = attn[:, :0], rows[:, :0]

        def text_only(segment: str, stack: Any, stack_windows: list[int | None], stack_types: list[str | None],
                      full: torch.Tensor) -> torch.Tensor:
            """Run ``stack`` on the text rows; vision rows keep their values in ``full`` (they wait, or have left)."""
            if not len(stack):
                return full
            states, maps = record[segment], weights[segment]
            if mode == "splice":  # the vision rows are absent: no compute spent on them
                expand = index[..., None].expand(-1, -1, full.shape[-1])
                waiting = full.gather(1, expand)
                out = _run_layers(stack, waiting, text_keys, stack_windows, stack_types, positions.gather(1, index),
                                  base.rotary_emb, cache, None, states, maps)

                def place(s: torch.Tensor) -> torch.Tensor:
                    return scatter_rows(full, index, torch.where(valid[..., None], s, waiting))

                if maps is not None:
                    weights[segment] = [scatter_attention(w * valid[:, None, :, None], index, index, t, t)
                                        for w in maps]
            else:  # present but unseen: text cannot attend to them, their own outputs are discarded
                out = _run_layers(stack, full, text_keys, stack_windows, stack_types, positions, base.rotary_emb,
                                  cache, None, states, maps)

                def place(s: torch.Tensor) -> torch.Tensor:
                    return torch.where(vision_mask[..., None], full, s)

                if maps is not None:
                    weights[segment] = [w * (~vision_mask)[:, None, :, None] for w in maps]
            if states is not None:
                record[segment] = [place(s) for s in states]
            return place(out)

        hidden = text_only("low", low, w_low, r_low, inputs_embeds)
        hidden = _run_layers(mid, hidden, _SegmentKeys(attn, rows, rows, dtype), w_mid, r_mid, positions,
                             base.rotary_emb, cache, None, record["mid"], weights["mid"])
        hidden = text_only("top", top, w_top, r_top, hidden)
        masks = {"low": low_keys, "high": attn}
    if cache is not None:
        start = cache.next_position if cache.next_position is not None else 0
        cache.key_masks, cache.low_index = masks, low_index
        cache.next_position = start + attn.long().sum(1)  # positions count attended rows only

    hidden_states = attentions = None
    if output_hidden_states:
        hidden_states = (inputs_embeds, *record["low"], *record["mid"], *record["top"])
        hidden_states = (*hidden_states[:-1], base.norm(hidden_states[-1]))  # HF: the last one after the norm
    if output_attentions:  # padding queries attend nowhere
        attentions = tuple(w * attn[:, None, :, None] for w in (*weights["low"], *weights["mid"], *weights["top"]))
    cap = getattr(config, "final_logit_softcapping", None)

    def head(x: torch.Tensor) -> torch.Tensor:  # the LM head, with the final soft cap where the family has one
        logits = lm_head(x)
        return logits if not cap else torch.tanh(logits / cap) * cap

    if logits_to_keep:
        if labels is not None:
            raise GroundingError("logits_to_keep cannot be combined with labels")
        hidden = hidden[:, -logits_to_keep:]
    out = GroundedOutput(cache=cache if use_cache else None, hidden_states=hidden_states, attentions=attentions)
    if labels is not None and not return_logits:
        predicts = labels[:, 1:] != -100  # row t predicts label t+1
        supervised = base.norm(hidden[:, :-1][predicts])
        ce = torch.nn.functional.cross_entropy(head(supervised).float(), labels[:, 1:][predicts],
                                               reduction="mean" if num_items_in_batch is None else "sum")
        out.loss = ce if num_items_in_batch is None else ce / num_items_in_batch
        return out
    out.logits = head(base.norm(hidden))
    if labels is not None:
        out.loss = causal_lm_loss(out.logits, labels, num_items_in_batch)
    return out
