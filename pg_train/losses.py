"""The training objective: every loss term, and their sum in one place (:class:`Objective`).

- **LM term** — next-token cross-entropy summed over the supervised tokens and divided by the *global* number of
  supervised tokens of the optimizer step (all processes, all micro-batches): the HF ``num_items_in_batch``
  convention. The trainer scales it by processes × micro-batches, which DDP's gradient mean and accelerate's
  accumulation divide out again, so the gradient is that of the global token mean: a run on 2 processes takes the
  same steps as one process at the same global batch.
- **InfoNCE** (:func:`info_nce`) — stage 0 (the Platonic warm-up over the whole training set) and the auxiliary
  term of stages 1–2 (``aux_weight``): projected images against their captions' LM states at the insertion point.
- **text-twin distillation** (:func:`state_match_loss`, ``distill_weight``) — stage 2: an image example's states
  after the image pulled towards those of the same model reading the caption as text in place of the image.

The InfoNCE terms run in fp32 even under bf16 autocast (:func:`info_nce`, :meth:`Objective.pooled`): cosines divided by ``tau`` = 0.07
amplify bf16's rounding of the projected rows, and centring subtracts the LM's mean token state, a component the
rows share. The InfoNCE and distillation terms are batch statistics (in-batch negatives, the teacher rows' spread): on several
processes each process computes them over its own share of the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pg_analysis.interp import capture_outputs


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a [N, d]`` and ``b [N, d]`` (cosine similarity / ``tau``), in
    fp32 even under autocast."""
    with fp32(a):
        a = nn.functional.normalize(a.float(), dim=-1)
        b = nn.functional.normalize(b.float(), dim=-1)
        logits = a @ b.T / tau
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def fp32(like: torch.Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: what runs inside keeps its inputs' precision."""
    return torch.autocast(like.device.type, enabled=False)


def common_suffix_length(a: list[int], b: list[int]) -> int:
    """Number of trailing tokens ``a`` and ``b`` share (the tokens after the image in an image example and its
    text twin)."""
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def suffix_rows(hidden: torch.Tensor, lengths: list[int], suffix: list[int]) -> torch.Tensor:
    """The last ``suffix[i]`` of the first ``lengths[i]`` rows of each sample of right-padded ``hidden [B, T, d]``,
    stacked: ``[sum(suffix), d]``."""
    idx = [(i, t) for i, (n, s) in enumerate(zip(lengths, suffix)) for t in range(n - s, n)]
    b = torch.tensor([i for i, _ in idx], device=hidden.device)
    t = torch.tensor([t for _, t in idx], device=hidden.device)
    return hidden[b, t]


def state_match_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error of ``student [n, d]`` to ``teacher [n, d]`` relative to the teacher rows' spread around their
    mean: 0 when they match, ~2 for unrelated rows of the same spread. The shared component of the states (large
    in a small LM's middle layers) cancels in both the error and the spread."""
    teacher = teacher.float()
    err = (student.float() - teacher).pow(2).sum(-1).mean()
    spread = (teacher - teacher.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-6)
    return err / spread


def distill_layer_indices(insert_layer: int, n_layers: int, count: int) -> list[int]:
    """``count`` decoder layers evenly spaced over ``[insert_layer, n_layers)``, the last one included."""
    span = n_layers - insert_layer
    if span <= 0:
        return []
    picks = {insert_layer + max(1, round(span * k / count)) - 1 for k in range(1, count + 1)}
    return sorted(picks)


class Objective(nn.Module):
    """The grounded VLM with its training loss: ``forward`` returns every term and ``total``, the one that is
    back-propagated. Wrapping the model in one module keeps each step a single forward call, which is what DDP,
    FSDP and DeepSpeed wrap.

    ``targets [n_images, d]`` and ``token_mean [d]``: the InfoNCE targets (each training image's caption state at
    the insertion point) and the LM's mean token state there — the offline recipe's warm-up statistics; None when
    the run has no InfoNCE term.
    """

    def __init__(self, model: nn.Module, tau: float = 0.07, aux_weight: float = 0.0, distill_weight: float = 0.0,
                 distill_layers: list[int] | None = None, targets: torch.Tensor | None = None,
                 token_mean: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.tau, self.aux_weight, self.distill_weight = tau, aux_weight, distill_weight
        self.distill_layers = list(distill_layers or [])
        self.targets, self.token_mean = targets, token_mean

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Each image's mean projected row, centred by the LM's mean token state at L when the targets are (the
        shared component would otherwise dominate every cosine). In fp32, autocast or not (see the module's doc)."""
        with fp32(features):
            pooled = self.model.project(features.float()).mean(1)
        return pooled - self.token_mean.to(pooled) if self.token_mean is not None else pooled

    def forward(self, stage: int, inputs: dict[str, torch.Tensor] | None = None, num_items: float = 1.0,
                lm_scale: float = 1.0, image_rows: torch.Tensor | None = None,
                twins: dict[str, Any] | None = None, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch's terms.

        - stage 0: ``features [N, P, D_v]`` of every training image (row i ↔ ``targets[i]``): InfoNCE only;
        - stages 1–2: ``inputs`` for the model (ids, mask, labels, vision features or pixels; None: a micro-batch
          whose records were all skipped — a zero total that still reaches every trained parameter); ``num_items``: the
          supervised tokens of the whole optimizer step; ``lm_scale``: processes × micro-batches;
          ``image_rows``: each image's row in ``targets`` (the InfoNCE term; each image counted once);
          ``twins``: the distillation pairs (``inputs`` of the text twins, ``rows`` of their image examples,
          ``suffix`` lengths, student and teacher ``lengths``).
        """
        if stage == 0:
            loss = info_nce(self.pooled(features), self.targets.to(features.device), self.tau)
            return {"total": loss, "infonce": loss.detach()}
        if inputs is None:  # a micro-batch with no records left: zero, but through every trained parameter
            return {"total": sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)}
        picked = ([self.model.model.language_model.layers[i] for i in self.distill_layers]
                  if self.distill_weight and twins else [])
        distill_on = bool(self.distill_weight and twins and picked)
        with capture_outputs(picked, active=distill_on) as student:
            out = self.model(**inputs, return_logits=False, num_items_in_batch=num_items)
        terms = {"lm_sum": out.loss.detach() * num_items}
        total = out.loss * lm_scale
        if distill_on:
            d = self._distill(picked, student, twins)
            terms["distill"] = d.detach()
            total = total + self.distill_weight * d
        if self.aux_weight and image_rows is not None and "vision_features" in inputs:
            a = self._aux(inputs["vision_features"], image_rows)
            terms["aux_infonce"] = a.detach()
            total = total + self.aux_weight * a
        terms["total"] = total
        return terms

    def _distill(self, picked: list[nn.Module], student: dict[int, torch.Tensor], twins: dict[str, Any]) -> torch.Tensor:
        """Text-twin distillation over the layers ``picked``: the teacher is the same model on the twins, without
        gradient. The LM answers from text almost perfectly; this gives each image example a dense target — every
        row after the image at several depths — where the answer letter alone gives about two bits."""
        with torch.no_grad(), capture_outputs(picked) as teacher:
            self.model(**twins["inputs"], return_logits=False)
        rows = twins["rows"]
        losses = [state_match_loss(suffix_rows(student[j][rows], twins["student_lengths"], twins["suffix"]),
                                   suffix_rows(teacher[j], twins["teacher_lengths"], twins["suffix"]))
                  for j in range(len(picked))]
        return torch.stack(losses).mean()

    def _aux(self, vision_features: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """InfoNCE of the batch's projected images against their captions' targets. Each image counts once: a batch
        can hold two questions about one picture, and a repeated image would be its own negative."""
        first: dict[int, int] = {}
        for row, img in enumerate(image_rows.tolist()):
            first.setdefault(img, row)
        if len(first) < 2:
            return vision_features.new_zeros(())
        rows = sorted(first.values())
        return info_nce(self.pooled(vision_features[rows]),
                        self.targets[image_rows[rows].cpu()].to(vision_features.device), self.tau)
