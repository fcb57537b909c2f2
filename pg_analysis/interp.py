"""Interpretability handles on loaded models: nnsight and TransformerLens (TransformerBridge).

- :func:`as_nnsight` wraps any torch module (a causal LM, a VLM) for nnsight: ``with h.trace(...):`` reads or edits
  module outputs by their HF names (``h.model.layers[3].output``), in execution order. Given the tokenizer, the
  handle is an ``nnsight.TransformersModel`` for text generation (what ``nnsight.LanguageModel`` was) and takes
  strings (``h.trace("a red kangaroo")``), as one loaded by name would; without it, a plain ``NNsight`` that takes
  the model's own keyword inputs.
- :func:`as_transformer_lens` boots a ``TransformerBridge`` on an already-loaded HF causal LM of a supported
  architecture (Llama-family included): ``run_with_cache`` gives ``blocks.{i}.hook_resid_pre``,
  ``blocks.{i}.attn.hook_pattern`` … with HF's numerics (the bridge's default; it forces eager attention).
  TransformerLens inserts its hook modules into the model's module tree, so by default the model is copied first
  (``copy=False`` wraps it in place: cheaper for a 7B model, but the original then runs through the bridge).
  BOS: TransformerLens prepends a BOS token to strings by default, HF tokenizers only where their template says
  so (SmolLM2's adds none, LLaMA's adds ``<s>``). The bridge is set to do what the HF tokenizer does
  (``prepend_bos=None``), so ``bridge.to_tokens(text)`` equals ``tokenizer(text).input_ids`` and the two handles
  see the same sequence; pass ``prepend_bos=True/False`` to force it.
- :func:`language_model_of` gives the causal LM inside a LLaVA-format VLM (shared weights, no copy) for either.
- :func:`capture_outputs`: the one forward-hook capture in the toolkit — module outputs kept while a block runs,
  hooks always removed (the attention maps and the trainer's distillation read layers through it).

Both are tested equal to HF's own outputs (hidden states, attention patterns) on tiny models.
"""

from __future__ import annotations

import copy as _copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from .errors import InputError
from .models import tokenizer_adds_bos


@contextmanager
def capture_outputs(modules: Sequence[Any], pick: Callable[[int, Any], Any] | None = None,
                    active: bool = True) -> Iterator[dict[int, Any]]:
    """Keep what ``modules[i]`` returns while the block runs: ``captured[i] = pick(i, output)``.

    ``pick`` defaults to the first element of a tuple output (a decoder layer's hidden states ``[B, T, d]``). The
    first call of each module wins (gradient checkpointing runs a layer again in the backward pass). Hooks are
    removed on exit, also on error; ``active=False`` registers none (the dict stays empty).

    >>> with capture_outputs(model.model.layers, active=True) as out:  # doctest: +SKIP
    ...     model(**batch)
    >>> out[3].shape  # doctest: +SKIP
    """
    captured: dict[int, Any] = {}
    pick = pick or (lambda _i, output: output[0] if isinstance(output, tuple) else output)
    handles = []
    if active:
        for i, module in enumerate(modules):
            def hook(_module: Any, _args: Any, output: Any, i: int = i) -> None:
                if i not in captured:
                    captured[i] = pick(i, output)
            handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def as_nnsight(model: Any, tokenizer: Any = None) -> Any:
    """An nnsight handle on a loaded model: ``nnsight.TransformersModel(task="text-generation")`` (strings in)
    when ``tokenizer`` is given, else ``nnsight.NNsight``. Module access by HF attribute names in ``.trace(...)``."""
    from nnsight import NNsight, TransformersModel
    from transformers.utils import logging as hf_logging

    if tokenizer is None:
        return NNsight(model)
    level = hf_logging.get_verbosity()
    try:  # nnsight checks the model against HF's text-generation pipeline, which logs every class it knows
        hf_logging.set_verbosity(hf_logging.CRITICAL)
        return TransformersModel(model, task="text-generation", tokenizer=tokenizer)
    finally:
        hf_logging.set_verbosity(level)


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


def as_transformer_lens(model: Any, tokenizer: Any, copy: bool = True, prepend_bos: bool | None = None) -> Any:
    """A TransformerLens ``TransformerBridge`` over a loaded HF causal LM (see module docstring).

    ``prepend_bos``: None follows the HF tokenizer (:func:`tokenizer_adds_bos`); True/False forces it.
    """
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
        bridge = TransformerBridge.boot_transformers(name, hf_model=target, tokenizer=tokenizer)
    except (ValueError, NotImplementedError) as e:
        raise InputError(f"TransformerLens cannot bridge {type(target).__name__}: {e}") from None
    bridge.cfg.default_prepend_bos = tokenizer_adds_bos(tokenizer) if prepend_bos is None else bool(prepend_bos)
    return bridge
