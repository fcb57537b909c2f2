"""Benchmark: one stage-2 training step (forward + backward) with each attention kernel, on real batches.

    python benchmarks/bench_attention.py                  # default pg-train model and data, 6 batches, 2 repeats
    python benchmarks/bench_attention.py --layer 4 --batches 4 --precision fp32

Builds the default ``pg-train`` model (DINOv2-S x SmolLM2-135M, offline assets) and its Tux Paint stage-2 batches
(the training pipeline's batches from step 40 on), then times ``forward + backward`` of each batch under every
kernel in ``--kernels``, the first pass over the batches untimed (warm-up). Prints seconds per step (median over
repeats of the mean over batches) and tokens/s. ``pg-train --attention auto`` uses eager on CPU because of this.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from pg_train.config import TrainConfig
    from pg_train.params import set_trainable
    from pg_train.trainer import Run, make_accelerator, step_inputs
    from pg_train.vlm import precision_context, use_attention

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=0, help="insert layer L (default: %(default)s)")
    p.add_argument("--batches", type=int, default=6, help="stage-2 batches timed per pass (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the batches (default: %(default)s)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="(default: %(default)s)")
    p.add_argument("--kernels", default="eager,sdpa", help="comma-separated (default: %(default)s)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out_dir=tmp, layer=args.layer, progress=False, report_to="none")
        accelerator = make_accelerator(cfg)
        run = Run(cfg, accelerator, Path(tmp))
        model = run.vlm.model
        set_trainable(model, 2, cfg.layer)
        model.train()
        device = next(model.parameters()).device
        stream = run.batches(accelerator, 2, 40)  # the training order from step 40 on
        batches = [step_inputs(run, next(stream), False, [False] * cfg.batch_size, 2, device)["inputs"]
                   for _ in range(args.batches)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"L={args.layer}, {args.precision}, {len(batches)} batches of {cfg.batch_size}, "
          f"lengths {[b['input_ids'].shape[1] for b in batches]}, {torch.get_num_threads()} threads")

    def one_pass() -> float:
        t0 = time.perf_counter()
        for b in batches:
            with precision_context(args.precision, device):
                out = model(**b, return_logits=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    print(f"{'kernel':8} {'s/step':>8} {'tokens/s':>9}  passes (s/step)")
    for kernel in args.kernels.split(","):
        use_attention(model, kernel)
        one_pass()  # warm-up: kernel selection for these shapes
        times = [one_pass() / len(batches) for _ in range(args.repeats)]
        med = statistics.median(times)
        print(f"{kernel:8} {med:8.2f} {tokens / len(batches) / med:9.0f}  {', '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()
