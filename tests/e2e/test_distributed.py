"""pg-train on two CPU processes (torchrun, gloo): the same steps as one process at the same global batch, only the
main process writes, kill and resume continue the curve, and every recipe path runs (text-only steps included)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from pg_train.synthetic import write_llava_data
from pg_train.trainer import train


def _torchrun(args, nproc=2):
    exe = shutil.which("pg-train")
    assert exe, "pg-train is not installed (scripts/setup.sh installs it)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "--no-python", exe, *args, "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)


def _flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}" if k != "out_dir" else "--out", str(v)]
    return out


@pytest.fixture(scope="module")
def llava(tiny_models, tmp_path_factory):
    """The llava15 recipe's path on tiny models: streamed JSONL, the encoder in the loop, text-only records mixed
    in; global batch 8 in 2 micro-batches; a single-process run of it."""
    root = tmp_path_factory.mktemp("dist")
    data = write_llava_data(root / "data", 48, n_images=12)
    opts = dict(recipe="llava15", vision=str(tiny_models["dinov2"]), llm=str(tiny_models["llama"]), vision_pool=2,
                stage1_data=data["stage1"], stage2_data=data["stage2"], image_root=data["image_root"], max_steps=3,
                batch_size=8, stage1_batch_size=8, grad_accum=2, precision="fp32", max_length=96, layer=1,
                template="vicuna_v1", gradient_checkpointing=True, num_workers=1, report_to="none",
                cache_dir=str(root / "cache"), checkpoint_every=2)
    from pg_train.config import resolve_config

    single = root / "single"
    train(resolve_config({**opts, "out_dir": str(single), "progress": False}))
    return root, opts, single


def _losses(out):
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_two_processes_take_the_single_process_steps(llava, tiny_models):
    from pg_train.vlm import build_vlm

    root, opts, single = llava
    two = root / "two"
    done = _torchrun(_flags({**opts, "out_dir": two}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # one report, from the main process
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    a, b = _losses(single), _losses(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5)  # the global token mean, not rank 0's
    w1, w2 = load_file(str(single / "model/model.safetensors")), load_file(str(two / "model/model.safetensors"))
    build_vlm(opts["vision"], opts["llm"], insert_layer=1, vision_pool=2, seed=0).save(root / "init")
    init = load_file(str(root / "init/model.safetensors"))
    update = max(float((w1[k] - init[k]).abs().max()) for k in w1)
    assert update > 1e-3
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-4 * update
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["stage2-step000003"]
    assert {p.name for p in (two / "checkpoints/stage2-step000003").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # each process's RNG state


def test_a_killed_two_process_run_resumes_onto_the_same_curve(llava):
    root, opts, _ = llava
    out = root / "killed"
    first = _torchrun(_flags({**opts, "out_dir": out, "stop_after": 4}))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after" in first.stdout and not (out / "model").exists()
    one = subprocess.run([shutil.which("pg-train"), *_flags({**opts, "out_dir": out}), "--resume", "--device", "cpu",
                          "--quiet"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert one.returncode == 2 and "written by 2 processes" in one.stderr and len(one.stderr.splitlines()) == 1
    second = _torchrun([*_flags({**opts, "out_dir": out}), "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = _losses(root / "two"), _losses(out)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-6)


def test_the_offline_recipe_runs_on_two_processes(tiny_models, tiny_pairs, tmp_path):
    """Warm-up, scale matching, the feature store, the format stage, text-first steps, distillation and the InfoNCE
    term."""
    out = tmp_path / "offline"
    cfg = dict(vision=str(tiny_models["dinov2"]), llm=str(tiny_models["llama"]), data=str(tiny_pairs), layer=1,
               vision_pool=2, stage0_steps=2, format_steps=2, format_until=1e-6, stage2_steps=4, text_first_steps=2,
               batch_size=4, precision="fp32", max_length=128, cache_dir=str(tmp_path / "features"), distill_layers=2,
               report_to="none")
    done = _torchrun(_flags({**cfg, "out_dir": out}))
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [0, 0, 3, 3, 2, 2, 2, 2]
    assert all(set(r["grad_norm"]) == {"lm"} and r["grad_norm"]["lm"] > 0 for r in recs[2:4])  # the projector frozen
    assert [("distill" in r) for r in recs[4:]] == [False, False, True, True]  # text-first steps have no twin
    assert all(r["grad_norm"]["projector"] == 0.0 for r in recs[4:6])  # text-only: the projector unused (DDP ok)
    bad = _torchrun(_flags({**cfg, "out_dir": tmp_path / "odd", "batch_size": 3}))
    assert bad.returncode != 0 and "does not split over 2 processes" in bad.stderr
    assert not (tmp_path / "odd").exists()



def test_skipped_records_on_two_processes_equal_one_process(llava, tmp_path):
    """Three in four images missing, ``--on-bad-record skip``: some process's share of a micro-batch is empty
    (it still runs the wrapped module's forward, a zero loss, so the gradient sync completes), and the two-process
    steps equal the one-process steps."""
    root, opts, _ = llava
    data = write_llava_data(tmp_path / "data", 48, n_images=12, text_only_frac=0.0)
    for r in range(48):
        if r % 4:
            (tmp_path / "data" / "images" / f"img{r:07d}.png").unlink()
    cfg = {**{k: v for k, v in opts.items() if k not in ("stage1_data", "checkpoint_every")},
           "stage2_data": data["stage2"], "image_root": data["image_root"], "on_bad_record": "skip",
           "batch_size": 4, "stage1_batch_size": 4, "grad_accum": 1, "checkpoint_every": 100}
    from pg_train.config import resolve_config

    one = train(resolve_config({**cfg, "out_dir": str(tmp_path / "one"), "progress": False}))
    done = _torchrun(_flags({**cfg, "out_dir": tmp_path / "two"}))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["skipped_records"] == two["skipped_records"] >= 6
    recs = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert any(r["samples"] <= 1 for r in recs)  # at most one record left of four: one process's share was empty
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 3
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5)
    w1 = load_file(str(tmp_path / "one/model/model.safetensors"))
    w2 = load_file(str(tmp_path / "two/model/model.safetensors"))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-5
