"""Benchmark: pg-train's time to the first step and peak memory do not grow with the number of records.

    python benchmarks/bench_data_scale.py                          # 1k, 10k, 100k records, 1 process
    python benchmarks/bench_data_scale.py --records 1000 --processes 2 --steps 6

For each record count, writes LLaVA-format synthetic data (``pg_train.synthetic``: a hard-linked image per record,
10 % text-only records, JSONL) and runs ``pg-train --recipe llava15`` on tiny random models (encoder in the loop,
2 DataLoader workers) for ``--steps`` optimizer steps in a fresh process (``torchrun`` with ``--processes`` > 1).
Prints, per count: seconds from ``train()`` to the first step (the trainer's ``seconds_to_first_step``), the whole
process's wall time, the peak RSS of the trainer process and of its largest child (a DataLoader worker), and the
stage-2 samples/s; then the largest / smallest ratio of the first two. The data writing is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(models: dict[str, Path], data: dict[str, str], out: Path, steps: int, processes: int,
             workers: int) -> dict[str, float]:
    exe = shutil.which("pg-train")
    args = ["--recipe", "llava15", "--vision", str(models["dinov2"]), "--llm", str(models["llama"]),
            "--vision-pool", "2", "--stage1-data", data["stage1"], "--stage2-data", data["stage2"],
            "--image-root", data["image_root"], "--stage1-steps", "0", "--stage2-steps", str(steps),
            "--batch-size", "8", "--max-length", "96", "--template", "vicuna_v1", "--precision", "fp32",
            "--num-workers", str(workers), "--report-to", "none", "--cache-dir", str(out.parent / "cache"),
            "--gradient-checkpointing", "false", "--device", "cpu", "--quiet", "--out", str(out)]
    cmd = [exe, *args] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", str(processes), "--no-python", exe, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // processes))}
    code = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); "
            "print(json.dumps({'rc': r.returncode, 'wall': time.perf_counter() - t, "
            "'children_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    done = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    outer = json.loads(done.stdout.strip().splitlines()[-1])
    if outer["rc"]:
        raise SystemExit(f"pg-train failed (rc {outer['rc']}): {done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"to_first_step_s": summary["seconds_to_first_step"], "wall_s": outer["wall"],
            "trainer_rss_mib": summary["peak_rss_mib"], "max_process_rss_mib": outer["children_rss_mib"],
            "samples_per_s": summary["throughput"]["stage2"]["samples_per_s"]}


def main() -> None:
    from pg_train.synthetic import write_llava_data, write_tiny_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", default="1000,10000,100000", help="record counts (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="stage-2 steps per run (default: %(default)s)")
    p.add_argument("--processes", type=int, default=1, help="training processes (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = write_tiny_models(tmp / "models")
        for n in map(int, args.records.split(",")):
            t0 = time.perf_counter()
            data = write_llava_data(tmp / f"data{n}", n, n_images=64)
            written = time.perf_counter() - t0
            rows[n] = run_once(models, data, tmp / f"run{n}", args.steps, args.processes, args.workers)
            r = rows[n]
            print(f"{n:>7} records (written in {written:.0f} s): first step after {r['to_first_step_s']:.2f} s, "
                  f"process {r['wall_s']:.1f} s, peak RSS trainer {r['trainer_rss_mib']:.0f} MiB / largest "
                  f"process {r['max_process_rss_mib']:.0f} MiB, {r['samples_per_s']:.1f} samples/s "
                  f"({args.processes} process{'es' if args.processes > 1 else ''})", flush=True)
            shutil.rmtree(tmp / f"data{n}")
    for key in ("to_first_step_s", "trainer_rss_mib", "max_process_rss_mib"):
        vals = [r[key] for r in rows.values()]
        print(f"{key}: largest / smallest = {max(vals) / min(vals):.3f}")


if __name__ == "__main__":
    main()
