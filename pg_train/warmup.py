"""The offline recipe's warm-up statistics: the LM's caption states at the insertion point, and scale matching.

Only a run that uses them computes them (``TrainConfig.uses_warmup_features``): they read every training image's
features from the feature store and run the LM over every training caption before step 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .datasets import pad_rows


class CaptionStates(NamedTuple):
    """The LM's hidden states of captions at the input of one layer."""

    means: torch.Tensor  # [N, d] each caption's mean over its tokens
    median_norm: float  # median token-state norm
    token_mean: torch.Tensor  # [d] mean over all caption tokens: the component every token state shares
    centred_median_norm: float  # median norm of (token state - token_mean)


@torch.no_grad()
def caption_targets(vlm: Any, captions: list[str], layer: int, prefix: list[int] | None = None,
                    batch_size: int = 64) -> CaptionStates:
    """Each caption's mean hidden state at the input of layer ``layer``, and the statistics of its token states
    there (:class:`CaptionStates`): the norm and mean the vision rows should have where they are inserted.
    Above layer 0 the shared mean is most of a token state (SmolLM2-135M, layer 4: median norm 86, mean 78).

    ``prefix``: token ids run before each caption — the prompt text that precedes the image — so the caption is
    seen where the vision rows sit, not at position 0, whose state is an attention sink with an outsized norm.
    Only the caption's own positions are averaged.
    """
    lm = vlm.model.model.language_model
    tok = vlm.tokenizer
    prefix = list(prefix or [])
    means, tokens = [], []
    for start in range(0, len(captions), batch_size):
        rows = [prefix + tok(c, add_special_tokens=False)["input_ids"] for c in captions[start:start + batch_size]]
        ids, mask = (t.to(lm.device) for t in pad_rows(rows, tok.pad_token_id))
        if layer == 0:
            h = lm.embed_tokens(ids)
        else:
            h = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        caption = mask.clone()
        caption[:, :len(prefix)] = 0
        m = caption[..., None].to(h.dtype)
        means.append(((h * m).sum(1) / m.sum(1)).float().cpu())
        tokens.append(h[caption.bool()].float().cpu())
    states = torch.cat(tokens)
    token_mean = states.mean(0)
    return CaptionStates(torch.cat(means), float(states.norm(dim=-1).median()), token_mean,
                         float((states - token_mean).norm(dim=-1).median()))


def image_prefix(examples: list[Any], image_token_id: int) -> list[int]:
    """The token ids before the first image token of the first example that has one."""
    for e in examples:
        if image_token_id in e.input_ids:
            return e.input_ids[:e.input_ids.index(image_token_id)]
    return []


@torch.no_grad()
def match_scale(model: Any, features: torch.Tensor, states: CaptionStates, match_mean: bool) -> dict[str, float]:
    """Set the projector's ``gain`` (and, with ``match_mean``, its ``offset``) from ``features [N, P, D_v]``:

    - ``match_mean=False``: median output-row norm = the LM's median token norm at L; offset 0;
    - ``match_mean=True``: the rows' mean = the LM's mean token state at L (``offset``), and the median norm of the
      rows minus their mean = that of the token states minus theirs (``gain``). Above layer 0 most of a token
      state is a component all tokens share; rows without it are unlike any token the layers above have seen.
    """
    proj = model.model.multi_modal_projector
    proj.gain.fill_(1.0)
    proj.offset.zero_()
    out = model.project(features.to(proj.gain.device)).float().flatten(0, 1)
    if not match_mean:
        before = float(out.norm(dim=-1).median())
        proj.gain.fill_(states.median_norm / before)
        return {"projector_median_norm_before": before, "gain": float(proj.gain)}
    mean = out.mean(0)
    before = float((out - mean).norm(dim=-1).median())
    gain = states.centred_median_norm / before
    proj.gain.fill_(gain)
    proj.offset.copy_(states.token_mean.to(proj.offset) - gain * mean.to(proj.offset))
    return {"projector_centred_median_norm_before": before, "gain": gain, "offset_norm": float(proj.offset.norm())}
