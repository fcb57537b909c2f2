"""Interpretability handles on loaded models: nnsight and TransformerLens (TransformerBridge).

- :func:`as_nnsight` wraps any torch module (a causal LM, a VLM) in ``nnsight.NNsight``: ``with h.trace(**inputs):``
  reads or edits module outputs by their HF names (``h.model.layers[3].output``), in execution order.
- :func:`as_transformer_lens` boots a ``TransformerBridge`` on an already-loaded HF causal LM of a supported
  architecture (Llama-family included): ``run_with_cache`` gives ``blocks.{i}.hook_resid_pre``,
  ``blocks.{i}.attn.hook_pattern`` … with HF's numerics (the bridge's default; it forces eager attention).
  TransformerLens inserts its hook modules into the model's module tree, so by default the model is copied first
  (``copy=False`` wraps it in place: cheaper for a 7B model, but the original then runs through the bridge).
- :func:`language_model_of` gives the causal LM inside a LLaVA-format VLM (shared weights, no copy) for either.

Both are tested equal to HF's own outputs (hidden states, attention patterns) on tiny models.
"""

from __future__ import annotations

import copy as _copy
from typing import Any

from .errors import InputError


def as_nnsight(model: Any) -> Any:
    """``nnsight.NNsight(model)``: module access by HF attribute names inside ``.trace(...)``."""
    from nnsight import NNsight

    return NNsight(model)


def language_model_of(vlm_model: Any) -> Any:
    """The ``*ForCausalLM`` of a LLaVA-format VLM's language model and head (the same modules, no copy)."""
    from transformers import AutoModelForCausalLM

    inner = getattr(vlm_model, "model", None)
    if inner is None or not hasattr(inner, "language_model") or not hasattr(vlm_model, "lm_head"):
        raise InputError(f"{type(vlm_model).__name__} is not a LLaVA-format VLM (model.language_model + lm_head)")
    import torch

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(vlm_model.config.text_config)
    lm.model = inner.language_model
    lm.lm_head = vlm_model.lm_head
    return lm.eval()


def as_transformer_lens(model: Any, tokenizer: Any, copy: bool = True) -> Any:
    """A TransformerLens ``TransformerBridge`` over a loaded HF causal LM (see module docstring)."""
    from transformer_lens.model_bridge import TransformerBridge

    if not hasattr(model, "config") or not hasattr(model, "lm_head"):
        raise InputError(f"{type(model).__name__}: a loaded HF causal LM is needed")
    if not getattr(tokenizer, "name_or_path", ""):
        raise InputError("TransformerLens re-reads the tokenizer by name: pass one loaded with from_pretrained")
    target = _copy.deepcopy(model) if copy else model
    if not getattr(target.config, "architectures", None):
        target.config.architectures = [type(target).__name__]
    name = getattr(target.config, "_name_or_path", "") or type(target).__name__
    try:
        return TransformerBridge.boot_transformers(name, hf_model=target, tokenizer=tokenizer)
    except (ValueError, NotImplementedError) as e:
        raise InputError(f"TransformerLens cannot bridge {type(target).__name__}: {e}") from None
