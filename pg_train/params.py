"""Which parameters a stage trains, and LoRA (peft) on the LM layers a grounded model trains.

Stage 0/1: the projector. Stage 2: + LM decoder layers ``>= L`` and the final norm (full) — or only LoRA adapters
on those layers. Layers below L never see a vision row, so they stay frozen; embeddings, LM head and vision tower
always stay frozen.

Encoder–decoder VLMs (T5 LM): the projector is LLaVA's plain projector, or BLIP's Q-Former with its query tokens
and language projection; stage 2 adds every encoder and decoder block and both final norms (the encoder reads the
prompt, which the answer depends on, even where the vision rows bypass it).
"""

from __future__ import annotations

from typing import Any

import torch

from pg_analysis.errors import InputError


def grad_norms(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """L2 norm of the gradients of each named optimizer group (``{"projector": …, "lm": …}``)."""
    out = {}
    for g in param_groups:
        gs = [p.grad.detach().float().norm() for p in g["params"] if p.grad is not None]
        out[g["name"]] = float(torch.stack(gs).norm()) if gs else 0.0
    return out


def set_trainable(model: Any, stage: int, insert_layer: int, lora: bool = False) -> dict[str, list[torch.nn.Parameter]]:
    """Freeze everything, then unfreeze what ``stage`` trains. Returns the parameter groups
    ``{"projector": [...], "lm": [...]}``.

    Stage 0/1: the projector. Stage 2: + LM decoder layers ``≥ insert_layer`` and the final norm (full) — or only
    the LoRA adapters (``lora=True``, already added by :func:`add_lora`). Layers below L never see a vision row, so
    they stay frozen; embeddings, LM head and vision tower always stay frozen.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if is_encoder_decoder(model):
        groups = {"projector": projector_parameters(model), "lm": []}
        if stage == 2:
            lm = model.language_model
            if lora:
                groups["lm"] = [p for n, p in lm.named_parameters() if "lora_" in n]
            else:
                for stack in (lm.encoder, lm.decoder):
                    groups["lm"] += [p for block in stack.block for p in block.parameters()]
                    groups["lm"] += list(stack.final_layer_norm.parameters())
        for ps in groups.values():
            for p in ps:
                p.requires_grad_(True)
        return groups
    groups = {"projector": projector_parameters(model), "lm": []}
    if stage == 2:
        lm = model.model.language_model
        if lora:
            groups["lm"] = [p for n, p in lm.named_parameters() if "lora_" in n]
        else:
            for layer in lm.layers[insert_layer:]:
                groups["lm"] += list(layer.parameters())
            groups["lm"] += list(lm.norm.parameters())
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    return groups


def is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(model.config.text_config, "is_encoder_decoder", False))


def projector_parameters(model: Any) -> list[torch.nn.Parameter]:
    """What carries the vision rows into the LM: LLaVA's projector, or BLIP's query tokens, Q-Former and language
    projection."""
    if hasattr(model, "qformer"):
        return [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters()]
    if hasattr(model, "multi_modal_projector"):
        return list(model.multi_modal_projector.parameters())
    return list(model.model.multi_modal_projector.parameters())


#: T5's attention and feed-forward projections (gated variants: wi_0 / wi_1).
_T5_LORA = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


def add_lora(model: Any, insert_layer: int, r: int, alpha: int) -> None:
    """Add LoRA adapters (peft) to the attention and MLP projections of LM layers ``≥ insert_layer`` (an
    encoder–decoder LM: of every encoder and decoder block)."""
    from peft import LoraConfig, inject_adapter_in_model

    if is_encoder_decoder(model):
        lm = model.language_model
        targets = [name for name, _ in lm.named_modules()
                   if name.startswith(("encoder.block.", "decoder.block.")) and name.rsplit(".", 1)[-1] in _T5_LORA]
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), lm)
        return
    lm = model.model.language_model
    n = len(lm.layers)
    if insert_layer >= n:
        raise InputError(f"LoRA needs at least one layer at or above L={insert_layer} (the LM has {n})")
    targets = [name for name, _ in lm.named_modules()
               if name.startswith("layers.") and int(name.split(".")[1]) >= insert_layer
               and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")]
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), lm)


def merge_lora(model: Any) -> None:
    """Fold LoRA weights into the base linears so the saved model is a plain HF model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.get_base_layer())
