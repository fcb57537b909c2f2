"""Efficiency of grounding: a sweep over the insert layer L (the paper's Fig. 1 / Table 4).

For a prompt of ``T`` text rows and ``V`` vision rows, at each L it measures prefill latency, per-token decode
latency with the KV cache, training-step (forward + backward) latency, KV-cache bytes (counted from the cache
tensors) and, on CUDA, peak allocated memory — and beside each timing the FLOP-proportional prediction and the
fraction of the predicted saving achieved.

FLOP model (what "predicted" means): a decoder layer over ``n`` rows costs ``2·n·P_layer`` (its matmuls) plus
``4·n²·d`` (scores and weighted sum over the full masked square, as the kernels compute it); the head costs
``2·n_total·d·vocab``. Grounded at L: L layers over T rows, N−L layers over T+V rows. A decode step over a cache of
S rows costs ``2·P_layer + 4·S·d`` per layer. Training is taken as 3× the forward FLOPs at every L, so its predicted
ratio equals the prefill one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from pg_analysis.errors import InputError

from .grounding import grounded_forward

#: random-weight shapes for benchmarking without checkpoints (LLaMA-7B = Vicuna-7B's shape)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}


@dataclass
class BenchConfig:
    """Options of one sweep. Validates itself; no I/O."""

    model: str = "smollm2-135m"
    shape: str | None = None  # a SHAPES key: random weights of that shape instead of ``model``
    text_tokens: int = 88
    vision_tokens: int = 576
    layers: list[int] | None = None  # None: 0, N/8, N/4, N/2, 3N/4, N
    exit_layers: list[int] | None = None  # None: N only (vision rows to the end); else every (L, K) with L <= K
    batch_size: int = 1
    repeats: int = 3
    decode_tokens: int = 16
    train: bool = True
    device: str | None = None
    dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape is not None and self.shape not in SHAPES:
            raise InputError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
        for name in ("text_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vision_tokens < 0 or self.decode_tokens < 0:
            raise InputError("vision_tokens and decode_tokens must be >= 0")
        if self.layers is not None and not self.layers:
            raise InputError("layers must name at least one insert layer")
        if self.exit_layers is not None and not self.exit_layers:
            raise InputError("exit_layers must name at least one exit layer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_layers(n: int) -> list[int]:
    return sorted({0, n // 8, n // 4, n // 2, 3 * n // 4, n})


@dataclass
class FlopModel:
    """Forward FLOPs of a LLaMA-family decoder (see module docstring)."""

    n_layers: int
    hidden: int
    layer_params: int
    vocab: int

    @classmethod
    def of(cls, model: Any) -> "FlopModel":
        layer = model.model.layers[0]
        return cls(len(model.model.layers), model.config.hidden_size,
                   sum(p.numel() for n, p in layer.named_parameters() if p.ndim == 2), model.config.vocab_size)

    def layer(self, n: int) -> float:
        return 2.0 * n * self.layer_params + 4.0 * n * n * self.hidden

    def _window(self, insert_layer: int, exit_layer: int | None) -> tuple[int, int]:
        """``(layers on text rows only, layers on every row)`` of a window ``[L, K)`` (``K`` None: N)."""
        exit_layer = self.n_layers if exit_layer is None else exit_layer
        return self.n_layers - (exit_layer - insert_layer), exit_layer - insert_layer

    def prefill(self, text: int, vision: int, insert_layer: int, exit_layer: int | None = None) -> float:
        total = text + vision
        text_only, full = self._window(insert_layer, exit_layer)
        return text_only * self.layer(text) + full * self.layer(total) + 2.0 * total * self.hidden * self.vocab

    def prefill_ratio(self, text: float, vision: float, insert_layer: int, exit_layer: int | None = None) -> float:
        """``FLOPs(L, K) / FLOPs(0, N)`` of a prefill (the predicted saving is one minus this)."""
        return self.prefill(text, vision, insert_layer, exit_layer) / self.prefill(text, vision, 0)

    def decode_step(self, text: int, vision: int, insert_layer: int, exit_layer: int | None = None) -> float:
        per = lambda s: 2.0 * self.layer_params + 4.0 * s * self.hidden  # noqa: E731
        text_only, full = self._window(insert_layer, exit_layer)
        return text_only * per(text) + full * per(text + vision) + 2.0 * self.hidden * self.vocab


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Any, device: torch.device) -> float:
    """Seconds ``fn()`` takes on ``device``, with the device synchronised before and after (queued GPU kernels
    are counted, earlier ones are not)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@dataclass
class BenchRow:
    insert_layer: int
    exit_layer: int
    prefill_s: float
    prefill_pred: float  # predicted time ratio vs L=0
    decode_token_s: float | None
    decode_pred: float
    train_step_s: float | None
    kv_cache_bytes: int
    peak_mem_bytes: int | None


def build_model(cfg: BenchConfig, runtime: Any) -> tuple[Any, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.shape is not None:
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(**SHAPES[cfg.shape])
        with torch.device(runtime.device):
            model = LlamaForCausalLM(config).to(runtime.dtype).eval()
        return model, f"{cfg.shape} (random weights)"
    from pg_analysis.models import load_causal_lm
    from pg_analysis.registry import resolve_model

    entry = resolve_model(cfg.model, "lm")
    model, _ = load_causal_lm(entry, runtime)
    return model, entry.display


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    from pg_analysis.models import pick_runtime

    runtime = pick_runtime(cfg.device, cfg.dtype)
    dev = runtime.device
    model, label = build_model(cfg, runtime)
    n = len(model.model.layers)
    layers = cfg.layers if cfg.layers is not None else default_layers(n)
    exits = cfg.exit_layers if cfg.exit_layers is not None else [n]
    for kind, values in (("insert", layers), ("exit", exits)):
        for layer in values:
            if not 0 <= layer <= n:
                raise InputError(f"{kind} layer {layer} outside [0, {n}] for {label}")
    # every window [L, K) with L <= K, the ordinary model (0, N) first: the baseline of every ratio
    windows = [(0, n)] + sorted({(a, k) for a in layers for k in exits if a <= k} - {(0, n)})
    flops = FlopModel.of(model)
    b, t, v = cfg.batch_size, cfg.text_tokens, cfg.vision_tokens
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    # the image block sits after a short system/user prefix, as in LLaVA prompts
    prefix = min(t, 35)
    embeds = (torch.randn(b, t + v, model.config.hidden_size, generator=g) * 0.02).to(dev, runtime.dtype)
    vision_mask = torch.zeros(b, t + v, dtype=torch.bool, device=dev)
    vision_mask[:, prefix:prefix + v] = True
    labels = torch.randint(0, model.config.vocab_size, (b, t + v), generator=g).to(dev)
    labels[vision_mask] = -100
    step = (torch.randn(b, 1, model.config.hidden_size, generator=g) * 0.02).to(dev, runtime.dtype)

    def prefill(window: tuple[int, int]):
        with torch.no_grad():
            return grounded_forward(model, embeds, vision_mask, window[0], use_cache=True, exit_layer=window[1])

    def decode(window: tuple[int, int]) -> float:
        cache = prefill(window).cache

        def steps() -> None:
            with torch.no_grad():
                for _ in range(cfg.decode_tokens):
                    grounded_forward(model, step, None, window[0], cache=cache, use_cache=True,
                                     exit_layer=window[1])

        return timed_call(steps, dev) / cfg.decode_tokens

    def train_step(window: tuple[int, int]) -> None:
        model.zero_grad(set_to_none=True)
        grounded_forward(model, embeds, vision_mask, window[0], labels=labels, exit_layer=window[1]).loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(fn, window: tuple[int, int]) -> float:
        return timed_call(lambda: fn(window), dev)

    # Warm-up at L=0 (allocator, kernels), then round-robin over L for each repeat so drift in machine speed hits
    # every L alike; the minimum over repeats is reported (CPU timings are skewed by other load, never sped up).
    prefill((0, n))
    if cfg.train:
        train_step((0, n))
    times: dict[str, dict[tuple[int, int], list[float]]] = {"prefill": {}, "decode": {}, "train": {}}
    for _ in tqdm(range(cfg.repeats), desc="repeats over (L, K)", disable=not progress):
        for window in windows:
            times["prefill"].setdefault(window, []).append(timed(prefill, window))
            if cfg.decode_tokens > 0:
                times["decode"].setdefault(window, []).append(decode(window))
            if cfg.train:
                model.train()
                times["train"].setdefault(window, []).append(timed(train_step, window))
                model.eval()
    rows: list[BenchRow] = []
    for window in windows:
        layer, exit_layer = window
        peak = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base_mem = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        kv = prefill(window).cache.nbytes()  # one prefill gives the cache size and, on CUDA, the peak
        if dev.type == "cuda":
            _sync(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base_mem
        rows.append(BenchRow(layer, exit_layer, min(times["prefill"][window]),
                             flops.prefill_ratio(t, v, layer, exit_layer),
                             min(times["decode"][window]) if cfg.decode_tokens > 0 else None,
                             flops.decode_step(t, v, layer, exit_layer) / flops.decode_step(t, v, 0),
                             min(times["train"][window]) if cfg.train else None, kv, peak))

    base = rows[0]  # the ordinary model, (0, N)
    table = []
    for r in rows:
        d = dataclasses.asdict(r)
        d["prefill_ratio"] = r.prefill_s / base.prefill_s
        d["prefill_saving_achieved"] = _achieved(d["prefill_ratio"], r.prefill_pred)
        if r.train_step_s is not None and base.train_step_s:
            d["train_ratio"] = r.train_step_s / base.train_step_s
            d["train_saving_achieved"] = _achieved(d["train_ratio"], r.prefill_pred)
        if r.decode_token_s is not None and base.decode_token_s:
            d["decode_ratio"] = r.decode_token_s / base.decode_token_s
        table.append(d)
    return {"model": label, "n_layers": n, "runtime": runtime.to_dict(), "config": cfg.to_dict(),
            "flop_model": dataclasses.asdict(flops), "rows": table}


def _achieved(measured_ratio: float, predicted_ratio: float) -> float | None:
    predicted_saving = 1.0 - predicted_ratio
    if predicted_saving <= 1e-9:
        return None
    return (1.0 - measured_ratio) / predicted_saving


def format_table(result: dict[str, Any]) -> str:
    head = (f"{result['model']} — {result['n_layers']} layers, T={result['config']['text_tokens']} text + "
            f"V={result['config']['vision_tokens']} vision rows, batch {result['config']['batch_size']}, "
            f"{result['runtime']['device']} {result['runtime']['dtype']}")
    cols = ["L", "K", "prefill ms", "pred", "achieved", "train ms", "achieved", "decode ms/tok", "ratio", "KV MiB",
            "peak MiB"]
    lines = [head, " ".join(f"{c:>13s}" for c in cols)]

    def f(x, fmt):
        return format(x, fmt) if x is not None else "—"

    for r in result["rows"]:
        lines.append(" ".join(f"{s:>13s}" for s in [
            str(r["insert_layer"]), str(r.get("exit_layer", result["n_layers"])), f(r["prefill_s"] * 1e3, ".1f"), f(r["prefill_pred"], ".3f"),
            f(r.get("prefill_saving_achieved"), ".0%"),
            f(r["train_step_s"] * 1e3 if r["train_step_s"] is not None else None, ".1f"),
            f(r.get("train_saving_achieved"), ".0%"),
            f(r["decode_token_s"] * 1e3 if r["decode_token_s"] is not None else None, ".2f"),
            f(r.get("decode_ratio"), ".3f"), f(r["kv_cache_bytes"] / 2**20, ".1f"),
            f(r["peak_mem_bytes"] / 2**20 if r["peak_mem_bytes"] is not None else None, ".0f")]))
    return "\n".join(lines)
