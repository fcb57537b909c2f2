"""Language → vision attention per LLM layer (the paper's Fig. 3 and Fig. 6) — ``pg-attnmap``.

Core (pure, over tensors): :func:`query_rows` picks the language query rows of each prompt (the text after the
image, or the answer position only); :func:`vision_attention` reduces one layer's head-averaged attention to the
mean attention each vision row receives from those queries, ``[B, V]`` in positional order.

Capture (two backends over the same forward, tested equal): ``"hf"`` registers forward hooks on the LM's HF
attention modules (eager attention returns its weights; sdpa returns none, which is an error here); ``"nnsight"``
reads the same module outputs inside an nnsight trace. Either runs the VLM's own forward. For a grounded model
(L > 0) the "mask" grounding mode is used, so every layer sees the whole sequence and layers below L give exactly
zero attention to the vision rows they never see.

Pipeline (``run_attnmap``, beside the code that loads VLMs): a LLaVA-format VLM (a pg-train run or an HF
LLaVA checkpoint) answers 4-way multiple-choice questions built from image–caption pairs (one forward pass each,
the answer is one letter); :func:`attention_map` gives the per-layer ``[layers, V]`` mean over prompts, saved by
:func:`save_attnmap` with a seeded sample of the vision tokens to show.
The image span is found from the image-token id, never hard-coded.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError

QUERIES = ("text", "last")
BACKENDS = ("hf", "nnsight")


# ----------------------------------------------------------------------------------------------------------------
# pure core


def query_rows(attention_mask: torch.Tensor, vision_mask: torch.Tensor, query: str = "text") -> torch.Tensor:
    """``[B, T]`` bool: the language query rows of each prompt.

    ``"text"``: attended rows after the last vision row (the question and the answer prompt); ``"last"``: the
    last attended row only (the answer position). A prompt without vision rows, or with no row after them, is
    an error.
    """
    if query not in QUERIES:
        raise InputError(f"query must be one of {QUERIES}, got {query!r}")
    attn = attention_mask.bool()
    t = attn.shape[1]
    pos = torch.arange(t, device=attn.device).expand_as(attn)
    if not vision_mask.any(1).all():
        raise InputError("every prompt needs vision rows (image tokens) to measure attention to them")
    last_vision = torch.where(vision_mask, pos, -1).max(1).values
    last_row = torch.where(attn, pos, -1).max(1).values
    if query == "last":
        rows = pos == last_row[:, None]
    else:
        rows = attn & (pos > last_vision[:, None])
    if not rows.any(1).all():
        raise InputError("a prompt has no text rows after its image: nothing attends to the vision rows")
    return rows


def vision_attention(weights: torch.Tensor, queries: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention each vision row receives from the query rows: ``[B, V]`` (vision rows in positional order).

    ``weights``: one layer's attention probabilities ``[B, H, T, T]`` (averaged over heads here) or already
    head-averaged ``[B, T, T]`` (query rows × key rows). Every prompt must hold the same number V of vision rows.
    """
    if weights.ndim == 4:
        weights = weights.float().mean(1)
    if weights.ndim != 3 or weights.shape[0] != queries.shape[0] or weights.shape[1:] != (queries.shape[1],) * 2:
        raise InputError(f"attention weights must be [B, (H,) T, T] matching queries {tuple(queries.shape)}, "
                         f"got {tuple(weights.shape)}")
    counts = vision_mask.sum(1)
    if not (counts == counts[0]).all():
        raise InputError(f"prompts hold different numbers of vision rows ({sorted(set(counts.tolist()))})")
    q = queries.to(weights.dtype)
    per_key = (weights.float() * q[..., None]).sum(1) / q.sum(1, keepdim=True)  # [B, T] mean over queries
    return per_key[vision_mask].view(len(counts), int(counts[0]))


def sample_tokens(n_tokens: int, n_show: int, seed: int = 0) -> np.ndarray:
    """``min(n_show, n_tokens)`` vision-token indices drawn by ``default_rng(seed)``, in positional order."""
    if n_show < 1:
        raise InputError(f"tokens to show must be >= 1, got {n_show}")
    if n_show >= n_tokens:
        return np.arange(n_tokens)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, size=n_show, replace=False))


# ----------------------------------------------------------------------------------------------------------------
# capture


def _attention_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in model.model.language_model.layers]


@contextmanager
def eager_full_sequence(model: Any) -> Iterator[None]:
    """Eager attention (weights returned) and the "mask" grounding mode for the duration of the block.

    Afterwards the kernel goes back to ``model.attention_kernel`` (recorded by whoever chose it, e.g.
    ``pg_train.vlm.use_attention``; transformers exposes no public getter), else to sdpa."""
    impl = getattr(model, "attention_kernel", None)
    mode = model.config.grounding_mode
    model.set_attn_implementation("eager")
    model.config.grounding_mode = "mask"
    try:
        yield
    finally:
        model.config.grounding_mode = mode
        model.set_attn_implementation(impl or "sdpa")


def _weights_of(output: Any, layer: int) -> torch.Tensor:
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise InputError(f"layer {layer}'s attention returned no weights: the model has no attention output "
                         "(eager attention is needed; sdpa and flash kernels return none)")
    return weights


@torch.no_grad()
def capture_hf(model: Any, batch: dict[str, torch.Tensor], queries: torch.Tensor,
               vision_mask: torch.Tensor) -> torch.Tensor:
    """``[layers, B, V]`` via forward hooks on the HF attention modules during the VLM's own forward."""
    from .interp import capture_outputs

    modules = _attention_modules(model)
    reduce = lambda i, output: vision_attention(_weights_of(output, i), queries, vision_mask)  # noqa: E731
    with capture_outputs(modules, reduce) as found:
        model(**batch, logits_to_keep=1)
    return torch.stack([found[i] for i in range(len(modules))])


@torch.no_grad()
def capture_nnsight(model: Any, batch: dict[str, torch.Tensor], queries: torch.Tensor,
                    vision_mask: torch.Tensor) -> torch.Tensor:
    """``[layers, B, V]`` read from the attention modules' outputs in an nnsight trace of the same forward."""
    from .interp import as_nnsight

    traced = as_nnsight(model)
    n = len(_attention_modules(model))
    saved: list[Any] = []
    with traced.trace(**batch, logits_to_keep=1):
        for i in range(n):
            saved.append(traced.model.language_model.layers[i].self_attn.output[1].save())
    out = []
    for i, w in enumerate(saved):
        out.append(vision_attention(_weights_of((None, w), i), queries, vision_mask))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# pipeline


@dataclass
class AttnmapConfig:
    """Options of one ``pg-attnmap`` run. Validates itself; no I/O."""

    vlm: str = "runs/train-L0"  # a pg-train run / model folder, or an HF LLaVA checkpoint (alias "llava", hub id)
    data: str = "tuxpaint"  # image–caption pairs: tuxpaint, coco (with coco_root), .jsonl/.csv
    coco_root: str | None = None
    n: int = 1000  # pairs (capped at what the data holds)
    query: str = "text"
    backend: str = "hf"
    show_tokens: int = 80
    skip_layers: int = 2  # the second figure leaves out the first layers (the paper's Fig. 3)
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.query not in QUERIES:
            raise InputError(f"query must be one of {QUERIES}, got {self.query!r}")
        if self.backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("n", "show_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_layers < 0:
            raise InputError(f"skip_layers must be >= 0, got {self.skip_layers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttnmapResult:
    """``attention [layers, V]``: mean over prompts and query rows of head-averaged attention to each vision row."""

    config: AttnmapConfig
    attention: np.ndarray
    shown: np.ndarray  # indices of the vision tokens shown in the figures
    n_prompts: int
    insert_layer: int
    info: dict[str, Any]

    @property
    def profile(self) -> np.ndarray:
        """Total attention to the vision rows per layer (sum over all V)."""
        return self.attention.sum(1)

    def summary(self) -> dict[str, Any]:
        return {"vlm": self.config.vlm, "data": self.config.data, "n_prompts": self.n_prompts,
                "query": self.config.query, "backend": self.config.backend, "insert_layer": self.insert_layer,
                "shape": list(self.attention.shape),
                "axes": {"rows": "LM layer (block index, 0 = first block)", "cols": "vision token (positional)"},
                "profile": self.profile.tolist(), "shown_tokens": self.shown.tolist(),
                "skip_layers": self.config.skip_layers, "peak_layer": int(np.argmax(self.profile)),
                "peak_layer_after_skip": self._peak_after_skip()}

    def _peak_after_skip(self) -> int | None:
        k = self.config.skip_layers
        return int(k + np.argmax(self.profile[k:])) if k < len(self.profile) else None


def attention_map(pm: Any, prompts: Any, query: str = "text", backend: str = "hf", batch_size: int = 8,
                  progress: bool = True) -> np.ndarray:
    """``[layers, V]`` mean over the prompts of :func:`vision_attention` per layer (see module docstring)."""
    model = pm.model
    image_id = model.config.image_token_index
    capture = capture_hf if backend == "hf" else capture_nnsight
    total, count = None, 0
    with eager_full_sequence(model):
        bar = tqdm(total=len(prompts.examples), desc=f"attention ({backend})", disable=not progress)
        for exs, batch in prompts.batches(pm, batch_size):
            vision_mask = batch["input_ids"] == image_id
            queries = query_rows(batch["attention_mask"], vision_mask, query)
            per = capture(model, batch, queries, vision_mask).double()  # [layers, B, V]
            total = per.sum(1) if total is None else total + per.sum(1)
            count += len(exs)
            bar.update(len(exs))
        bar.close()
    if total is None:
        raise InputError("no prompts to measure attention on")
    return (total / count).float().numpy()


def save_attnmap(result: AttnmapResult, out_dir: Path) -> Path:
    """``attention.npy [layers, V]``, ``attnmap.json`` (summary), ``run.json``, and the figures
    ``attention_all.png`` (Fig. 6), ``attention_skip{k}.png`` (Fig. 3) and ``profile.png``; atomically."""
    import io

    from .plots import attention_heatmap, attention_profile_figure
    from .runinfo import atomic_output_dir, atomic_write_bytes, atomic_write_json
    from .runs import ATTENTION_ARRAY, ATTNMAP_RESULT, write_run_record

    out_dir = Path(out_dir)
    summary = result.summary()
    with atomic_output_dir(out_dir) as tmp:
        buf = io.BytesIO()
        np.save(buf, result.attention.astype(np.float32))
        atomic_write_bytes(tmp / ATTENTION_ARRAY, buf.getvalue())
        atomic_write_json(tmp / ATTNMAP_RESULT, summary)
        write_run_record(tmp, "pg-attnmap", result.config.to_dict(), **result.info)
        attention_heatmap(result.attention, result.shown, tmp / "attention_all.png", skip=0, title=result.config.vlm)
        k = result.config.skip_layers
        if 0 < k < result.attention.shape[0]:
            attention_heatmap(result.attention, result.shown, tmp / f"attention_skip{k}.png", skip=k,
                              title=result.config.vlm)
        attention_profile_figure(summary, tmp / "profile.png")
    return out_dir


def load_attnmap(out_dir: Path) -> dict[str, Any]:
    """A saved result's summary (``attnmap.json``) with the array under ``"attention"``; no model is loaded."""
    from .runs import ATTENTION_ARRAY, ATTNMAP_RESULT, read_result_json

    out_dir = Path(out_dir)
    summary = read_result_json(out_dir, ATTNMAP_RESULT, "pg-attnmap")
    if not (out_dir / ATTENTION_ARRAY).is_file():
        raise InputError(f"{out_dir} holds no pg-attnmap result ({ATTENTION_ARRAY} missing)")
    summary["attention"] = np.load(out_dir / ATTENTION_ARRAY)
    return summary
