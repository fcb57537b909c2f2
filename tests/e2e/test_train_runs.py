"""pg-train and pg-eval runs on tiny models: outputs, resume, bad input, LoRA, distillation, evaluation."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.datasets import load_llava_json, manifest_image_root
from pg_train.trainer import TrainConfig, latest_checkpoint, train


def _cfg(tiny_models, tiny_pairs, out, **kw):
    base = dict(out_dir=str(out), vision=str(tiny_models["dinov2"]), llm=str(tiny_models["llama"]),
                data=str(tiny_pairs), layer=1, vision_pool=2, stage0_steps=3, stage1_steps=3, stage2_steps=4,
                text_first_steps=1, format_steps=0, batch_size=4, checkpoint_every=2, precision="fp32", max_length=128,
                cache_dir=str(Path(out).parent / "features"), progress=False, aux_weight=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tiny_models, tiny_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "full"
    summary = train(_cfg(tiny_models, tiny_pairs, out))
    return out, summary


def _losses(out):
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_run_writes_its_outputs(tiny_run):
    out, summary = tiny_run
    for name in ("run.json", "log.jsonl", "loss.png", "summary.json", "model/config.json", "data/manifest.json"):
        assert (out / name).is_file(), name
    assert [s for s, _, _ in _losses(out)] == [0] * 3 + [1] * 3 + [2] * 4
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    stage2 = [r["grad_norm"] for r in records if r["stage"] == 2]
    assert all(set(g) == {"projector", "lm"} for g in stage2)
    assert all(g["lm"] > 0 for g in stage2)  # the LM layers >= L learn in stage 2
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["config"]["layer"] == 1 and "versions" in cfg and cfg["template"] == "vicuna_v1"
    assert summary["scale"]["gain"] > 0 and summary["insert_layer"] == 1
    from pg_train.vlm import load_vlm

    assert load_vlm(out / "model").model.insert_layer == 1


def test_resume_after_a_kill_follows_the_same_loss_curve(tiny_run, tiny_models, tiny_pairs, tmp_path):
    full, _ = tiny_run
    out = tmp_path / "killed"
    first = train(_cfg(tiny_models, tiny_pairs, out, stop_after=5))  # dies inside stage 1
    assert first["stopped_early"] and not (out / "model").exists()
    # the kill also tore what was being written: a checkpoint folder mid-write, a half log line
    complete = latest_checkpoint(out)
    (out / "checkpoints" / "stage1-step000099.tmp" / "model").mkdir(parents=True)
    (out / "checkpoints" / "stage2-step000001").mkdir()  # renamed, but its files never arrived
    with open(out / "log.jsonl", "a") as f:
        f.write('{"stage": 1, "step": 3, "lo')
    assert latest_checkpoint(out) == complete
    second = train(_cfg(tiny_models, tiny_pairs, out, resume=True))
    a, b = _losses(full), _losses(out)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5, abs=1e-6)
    assert second["run_seconds"] > second["run_seconds_this_process"]  # the first process's time counts too


def test_the_text_first_gate_is_logged_and_resumed(tiny_models, tiny_pairs, tmp_path):
    # a threshold the tiny random LM never reaches: text-only to the cap, then the per-step draw
    kw = dict(stage0_steps=0, stage1_steps=0, stage2_steps=7, text_first_steps=1, text_first_until=1e-6,
              text_first_max_steps=4, text_first_frac=0.0)
    full = train(_cfg(tiny_models, tiny_pairs, tmp_path / "full", **kw))

    def flags(out):
        return [r.get("text_only", False) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    assert flags(tmp_path / "full") == [True] * 4 + [False] * 3
    assert full["text_first"]["learnt_at"] is None and len(full["text_first"]["recent"]) == 4
    out = tmp_path / "killed"
    train(_cfg(tiny_models, tiny_pairs, out, stop_after=3, **kw))  # its checkpoint holds the gate mid-wait
    resumed = train(_cfg(tiny_models, tiny_pairs, out, resume=True, **kw))
    assert flags(out) == flags(tmp_path / "full")
    assert resumed["text_first"]["recent"] == pytest.approx(full["text_first"]["recent"], rel=1e-5)  # restored
    assert [x[2] for x in _losses(out)] == pytest.approx([x[2] for x in _losses(tmp_path / "full")], rel=1e-5,
                                                          abs=1e-6)


def test_the_format_stage_runs_before_stage_2_ends_at_its_gate_and_resumes(tiny_models, tiny_pairs, tmp_path):
    # a threshold every loss is below: the gate closes after its window of 5 steps, of the 9 allowed
    kw = dict(stage0_steps=0, stage1_steps=2, format_steps=9, format_until=100.0, format_lr=3e-4, stage2_lr=2e-4,
              stage2_steps=3, text_first_steps=0, text_first_frac=0.0, checkpoint_every=100)
    full = train(_cfg(tiny_models, tiny_pairs, tmp_path / "full", **kw))
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [(1, 0), (1, 1), *((3, k) for k in range(5)),
                                                          *((2, k) for k in range(3))]
    fmt = [r for r in records if r["stage"] == 3]
    assert all(r["text_only"] and set(r["grad_norm"]) == {"lm"} for r in fmt)  # text only: the projector rests
    assert [r["lr"]["lm"] for r in fmt] == [3e-4] * 5  # constant (no warm-up step in 9 at 3 %)
    stage2 = [r for r in records if r["stage"] == 2]
    assert stage2[0]["lr"] == {"projector": 1e-3, "lm": 2e-4} and not any(r.get("text_only") for r in stage2)
    assert stage2[1]["lr"]["lm"] < 2e-4  # stage 2's own cosine, started afresh after the format stage
    assert full["format"]["learnt_at"] == 4 and full["steps"][3] == 9
    assert (tmp_path / "full" / "model" / "config.json").is_file()
    # killed inside the format stage, and right after its gate closed: both resume onto the same curve
    for stop in (4, 7):
        out = tmp_path / f"killed{stop}"
        train(_cfg(tiny_models, tiny_pairs, out, stop_after=stop, **kw))
        resumed = train(_cfg(tiny_models, tiny_pairs, out, resume=True, **kw))
        assert [x[:2] for x in _losses(out)] == [x[:2] for x in _losses(tmp_path / "full")]
        assert [x[2] for x in _losses(out)] == pytest.approx([x[2] for x in _losses(tmp_path / "full")], rel=1e-5,
                                                              abs=1e-6)
        assert resumed["format"] == pytest.approx(full["format"])
    # a threshold never reached: the format stage runs to its most, then stage 2
    capped = train(_cfg(tiny_models, tiny_pairs, tmp_path / "capped", **{**kw, "stage1_steps": 0, "format_steps": 3,
                                                                         "format_until": 1e-6, "stage2_steps": 1}))
    assert [x[:2] for x in _losses(tmp_path / "capped")] == [(3, 0), (3, 1), (3, 2), (2, 0)]
    assert capped["format"]["learnt_at"] is None


def test_bad_runs_are_clear_errors(tiny_run, tiny_models, tiny_pairs, tmp_path):
    full, _ = tiny_run
    with pytest.raises(InputError, match="not empty"):
        train(_cfg(tiny_models, tiny_pairs, full))
    with pytest.raises(InputError, match="incompatible"):
        train(_cfg(tiny_models, tiny_pairs, full, resume=True, stage2_lr=0.5))
    with pytest.raises(InputError, match="no checkpoint"):
        train(_cfg(tiny_models, tiny_pairs, tmp_path / "empty", resume=True))
    with pytest.raises(InputError, match="layer"):
        train(_cfg(tiny_models, tiny_pairs, tmp_path / "deep", layer=9))


def _evaluator(out: Path):
    """The saved run's model with its prompt format, its test records and an fp32 evaluator over them."""
    from pg_train.evaluate import EvalConfig, Evaluator
    from pg_train.probe import load_prompt_model

    pm = load_prompt_model(out)
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    records = {t: load_llava_json(out / "data" / manifest["files"][f"test_{t}"],
                                  manifest_image_root(manifest, out / "data"))
               for t in ("mcq", "what")}
    ev = Evaluator(pm.vlm, pm.template, pm.system, records, EvalConfig(str(out), precision="fp32", progress=False),
                   out.parent / "features")
    return pm, records, ev


def test_pg_eval_on_the_tiny_run(tiny_run, capsys):
    from pg_train.cli import eval_cli

    out, _ = tiny_run
    assert eval_cli([str(out), "--quiet", "--max-new-tokens", "3", "--precision", "fp32", "--bench-repeats", "1"]) == 0
    result = json.loads((out / "eval" / "eval.json").read_text())
    n_test = result["n_images"]
    for control in ("image", "no_image", "shuffled"):
        assert result["mcq"][control]["n"] == 4 * n_test
        assert sum(result["mcq"][control]["letters"].values()) == 4 * n_test
        lo, hi = result["mcq"][control]["ci95"]
        assert lo <= result["mcq"][control]["accuracy"] <= hi
        assert result["rank4"][control]["n"] == n_test
    for diagnostic in ("text_mcq", "slot_mcq", "warmup_rank4"):
        d = result["diagnostics"][diagnostic]
        assert d["n"] == 4 * n_test and 0 <= d["accuracy"] <= 1
    for diagnostic in ("text_mcq", "slot_mcq"):
        assert sum(result["diagnostics"][diagnostic]["letters"].values()) == 4 * n_test
    assert result["rank_all"]["image"]["candidates"] == n_test
    assert 0 <= result["generation"]["rouge_l"] <= 1
    assert result["efficiency"]["predicted_ratio"] < 1
    assert (out / "eval" / "letters.png").is_file()
    assert "MCQ" in capsys.readouterr().out
    # the MCQ numbers, recomputed one question at a time (no batching, no padding) from the saved model
    from pg_train.conversations import letter_token_ids
    from pg_train.datasets import collate

    pm, records, ev = _evaluator(out)
    letters = letter_token_ids(pm.vlm.tokenizer, pm.template)
    predicted = []
    for ex in ev.prompts(records["mcq"], "image"):
        batch = collate([ex], pm.vlm.tokenizer.pad_token_id, ev.features)
        batch.pop("labels")
        with torch.no_grad():
            predicted.append("ABCD"[int(pm.model(**batch).logits[0, -1, letters].argmax())])
    right = sum(p == r["answer"] for p, r in zip(predicted, records["mcq"]))
    assert result["mcq"]["image"]["accuracy"] == pytest.approx(right / len(predicted), abs=1e-9)
    assert result["mcq"]["image"]["letters"] == {k: predicted.count(k) for k in "ABCD"}
    assert result["mcq"]["image"]["correct"] == [int(p == r["answer"]) for p, r in zip(predicted, records["mcq"])]


def test_the_proxies_ask_the_baseline_runs_held_out_questions(tiny_run, tiny_models, tiny_pairs):
    from pg_train.choose_layer import RecommendConfig, proxy_records
    from pg_train.evaluate import split_records

    out, _ = tiny_run
    test = split_records(out / "data", "test", ("mcq",))["mcq"]
    for data in ("auto", "held-out"):
        records, where = proxy_records(RecommendConfig(vlm=str(out), data=data, n=1000))
        assert where == f"held-out test split of {out}"
        images = sorted({r["image_path"] for r in test})
        assert [r["image_path"] for r in records] == images  # one question per held-out picture
        assert [r["answer"] for r in records] == ["ABCD"[i % 4] for i in range(len(images))]
        assert all(r in test for r in records)
    assert len(proxy_records(RecommendConfig(vlm=str(out), n=2))[0]) == 2
    pairs, where = proxy_records(RecommendConfig(vlm=str(tiny_models["llama"]), data=str(tiny_pairs), n=5))
    assert where == str(tiny_pairs) and len(pairs) == 5
    with pytest.raises(InputError, match="held-out: .* is not a pg-train run"):
        proxy_records(RecommendConfig(vlm=str(tiny_models["llama"]), data="held-out"))


def test_rows_put_in_by_hand_equal_the_image_path(tiny_run):
    """The slot-MCQ diagnostic's path (rows handed to the model) gives the image path's logits for the projected
    rows, so the diagnostic differs from MCQ only in what the rows hold."""
    out, _ = tiny_run
    pm, records, ev = _evaluator(out)
    exs = ev.prompts(records["mcq"][:5], "image")
    with torch.no_grad():
        rows = ev.model.project(ev.features[[e.image for e in exs], 0])
    assert torch.allclose(ev.last_logits(exs, rows), ev.last_logits(exs), atol=1e-5)
    assert (ev.last_logits(exs, rows.roll(1, 0)) - ev.last_logits(exs)).abs().max() > 1e-5  # the rows are read


def test_lora_stage_two_saves_a_plain_merged_model(tiny_models, tiny_pairs, tmp_path):
    from pg_train.vlm import load_vlm

    out = tmp_path / "lora"
    train(_cfg(tiny_models, tiny_pairs, out, lora=True, lora_r=4, lora_alpha=8, stage0_steps=0, stage1_steps=1,
               stage2_steps=2))
    vlm = load_vlm(out / "model")
    assert not any("lora" in n for n, _ in vlm.model.named_parameters())


def test_pg_train_bad_input_is_one_line_exit_2(tiny_models, tiny_pairs, tmp_path, capsys):
    from pg_train.cli import train_cli

    common = ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]), "--quiet"]
    assert train_cli(["--layer", "-1", "--out", str(tmp_path / "a"), *common]) == 2
    assert train_cli(["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "b"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("pg-train: error:") for line in err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_distillation_run_logs_its_term_on_image_steps_only(tiny_models, tiny_pairs, tmp_path):
    out = tmp_path / "distill"
    train(_cfg(tiny_models, tiny_pairs, out, stage1_steps=0, stage2_steps=4, text_first_steps=2,
               distill_weight=1.0, distill_layers=2))
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"stage": 2' in line]
    assert [("distill" in r) for r in recs] == [False, False, True, True]  # text-first steps have no twin
    assert all(r["distill"] > 0 for r in recs[2:])


def test_a_fresh_run_that_dies_before_its_first_checkpoint_leaves_nothing(tiny_models, tiny_pairs, tmp_path,
                                                                          monkeypatch):
    import pg_train.losses as losses

    out = tmp_path / "interrupted"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(losses, "info_nce", interrupt)  # Ctrl-C during stage 0
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_models, tiny_pairs, out))
    assert not out.exists()
    monkeypatch.undo()
    with pytest.raises(InputError, match="--lora adapts the LM layers >= L"):  # refused before any training
        train(_cfg(tiny_models, tiny_pairs, out, lora=True, layer=3))
    assert not out.exists()
    summary = train(_cfg(tiny_models, tiny_pairs, out, stage1_steps=1, stage2_steps=1))  # the same command runs
    assert (out / "model" / "config.json").is_file() and not summary["stopped_early"]


def test_a_kill_while_saving_a_checkpoint_leaves_no_half_checkpoint(tiny_models, tiny_pairs, tmp_path, monkeypatch):
    import pg_train.checkpoints as checkpoints

    out = tmp_path / "run"
    train(_cfg(tiny_models, tiny_pairs, out, stop_after=2))  # one complete checkpoint
    complete = latest_checkpoint(out)

    def killed(path, data):
        raise KeyboardInterrupt  # the signal lands after accelerate's state, before state.json

    monkeypatch.setattr(checkpoints, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_models, tiny_pairs, out, resume=True))
    assert latest_checkpoint(out) == complete
    assert not list((out / "checkpoints").glob("*.tmp")) and out.is_dir()  # kept: it holds a checkpoint


def test_a_checkpoint_that_cannot_be_written_is_one_line_exit_2(tiny_models, tiny_pairs, tmp_path, monkeypatch,
                                                                capsys):
    """A full disk mid-checkpoint (torch's zip writer says so with a RuntimeError): one line, exit 2, and no half
    checkpoint; the run resumes from its last complete one once there is room."""
    from accelerate import Accelerator

    from pg_train.cli import train_cli

    out = tmp_path / "run"
    argv = ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]), "--data", str(tiny_pairs),
            "--layer", "1", "--vision-pool", "2", "--stage0-steps", "2", "--stage2-steps", "2", "--batch-size", "4",
            "--checkpoint-every", "1", "--precision", "fp32", "--max-length", "128", "--quiet",
            "--cache-dir", str(tmp_path / "features"), "--out", str(out)]
    save_state, calls = Accelerator.save_state, []

    def full_disk(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:
            save_state(self, output_dir, **kw)  # part of it is written, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 810839616 vs 810839504")
        return save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    assert train_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not be written" in err and "GiB free" in err, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [Path(calls[0]).name.removesuffix(".tmp")]
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert train_cli([*argv, "--resume"]) == 0 and (out / "model" / "config.json").is_file()


def test_a_window_run_trains_saves_and_evaluates(tiny_models, tiny_pairs, tmp_path):
    from pg_train.cli import eval_cli, train_cli
    from pg_train.vlm import load_vlm

    out = tmp_path / "window"
    train(_cfg(tiny_models, tiny_pairs, out, layer=1, exit_layer=2, stage1_steps=1, stage2_steps=2))
    model = load_vlm(out / "model").model
    assert (model.insert_layer, model.exit_layer) == (1, 2)
    assert eval_cli([str(out), "--quiet", "--no-rank-all", "--no-generate", "--precision", "fp32",
                     "--bench-repeats", "1"]) == 0
    eff = json.loads((out / "eval" / "eval.json").read_text())["efficiency"]
    assert (eff["insert_layer"], eff["exit_layer"]) == (1, 2) and eff["predicted_ratio"] < 1
    common = ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]), "--quiet"]
    assert train_cli(["--layer", "2", "--exit-layer", "1", "--out", str(tmp_path / "bad"), *common]) == 2
    assert not (tmp_path / "bad").exists()


def test_llava_data_bad_records_fail_or_skip_and_other_bad_launches(tiny_models, tmp_path, capsys):
    from pg_train.cli import train_cli
    from pg_train.synthetic import write_llava_data

    data = write_llava_data(tmp_path / "data", 24, n_images=6, text_only_frac=0.0)
    lines = (tmp_path / "data" / "stage2.jsonl").read_text().splitlines()
    broken = json.loads(lines[3])
    broken["image"] = "images/gone.png"
    (tmp_path / "data" / "stage2.jsonl").write_text("\n".join(lines[:3] + [json.dumps(broken)] + lines[4:]) + "\n")
    common = ["--recipe", "llava15", "--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["llama"]),
              "--vision-pool", "2", "--stage2-data", data["stage2"], "--image-root", data["image_root"],
              "--stage2-steps", "3", "--batch-size", "8", "--max-length", "96", "--template", "vicuna_v1",
              "--precision", "fp32", "--report-to", "none", "--cache-dir", str(tmp_path / "cache"),
              "--gradient-checkpointing", "false", "--num-workers", "1", "--quiet"]
    # 24 records, batches of 8: 3 steps read every record once, the broken one included
    assert train_cli([*common, "--out", str(tmp_path / "fail")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.png not found" in err[0] and "--on-bad-record skip" in err[0]
    assert not (tmp_path / "fail").exists()  # nothing half-written: no checkpoint was reached
    assert train_cli([*common, "--out", str(tmp_path / "skip"), "--on-bad-record", "skip"]) == 0
    assert "skipped 1 bad records" in capsys.readouterr().out
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_records"] == 1 and (tmp_path / "skip" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "skip" / "recipe.json").read_text())["options"]["stage2_lr"] == 2e-5
    # resuming with another recipe, an empty data file, a global batch the accumulation does not divide
    assert train_cli([*common[2:], "--out", str(tmp_path / "skip"), "--on-bad-record", "skip", "--resume"]) == 2
    assert "options differ" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert train_cli([*common, "--stage2-data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "e")]) == 2
    assert "holds no records" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert train_cli([*common, "--grad-accum", "3", "--out", str(tmp_path / "g")]) == 2
    assert "not divisible by --grad-accum" in capsys.readouterr().err
    # a format stage over records that have images and no caption: nothing to read as text
    clean = write_llava_data(tmp_path / "clean", 16, n_images=4, text_only_frac=0.0)
    assert train_cli([*common, "--stage2-data", clean["stage2"], "--image-root", clean["image_root"],
                      "--format-steps", "4", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format stage found no text" in err[0] and not (tmp_path / "f").exists()


def test_an_encoder_decoder_run_trains_saves_and_evaluates(tiny_models, tiny_pairs, tmp_path, capsys):
    """A T5 LM behind a plain projector, its vision rows bypassing the encoder: the same trainer (stage 1
    projector, stage 2 + every T5 block) and pg-eval (the decoder's first step answers the MCQ)."""
    from pg_train.cli import eval_cli, train_cli
    from pg_train.vlm import load_vlm

    out = tmp_path / "t5"
    decoder_only_off = dict(stage0_steps=0, aux_weight=0.0, text_first_steps=0, text_first_frac=0.0,
                            distill_weight=0.0, scale_match=False)
    summary = train(_cfg(tiny_models, tiny_pairs, out, llm=str(tiny_models["t5"]), layer=0, stage1_steps=2,
                         stage2_steps=3, **decoder_only_off))
    assert summary["insert_layer"] is None and summary["steps"] == {0: 0, 1: 2, 3: 0, 2: 3}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"]["lm"] > 0 and r["grad_norm"]["projector"] > 0 for r in records if r["stage"] == 2)
    vlm = load_vlm(out / "model")
    assert vlm.is_encoder_decoder and vlm.model.config.bypass_encoder
    assert eval_cli([str(out), "--quiet", "--max-new-tokens", "3", "--precision", "fp32", "--bench-repeats", "1"]) == 0
    result = json.loads((out / "eval" / "eval.json").read_text())
    n_test = result["n_images"]
    assert result["bypass_encoder"] is True and set(result["diagnostics"]) == {"text_mcq"}
    assert all(result["mcq"][c]["n"] == 4 * n_test for c in ("image", "no_image", "shuffled"))
    assert result["rank4"]["image"]["n"] == n_test and 0 <= result["generation"]["rouge_l"] <= 1
    assert result["efficiency"]["measured_ratio"] > 0 and result["efficiency"]["predicted_ratio"] is None
    assert "bypass" in capsys.readouterr().out
    # the MCQ, recomputed one question at a time from the saved model: the decoder's first-step letter logits
    from pg_train.conversations import letter_token_ids
    from pg_train.datasets import collate

    pm, recs, ev = _evaluator(out)
    letters = letter_token_ids(pm.vlm.tokenizer, pm.template)
    start = torch.tensor([[pm.model.config.text_config.decoder_start_token_id]])
    predicted = []
    for ex in ev.prompts(recs["mcq"], "image"):
        batch = collate([ex], pm.vlm.tokenizer.pad_token_id, ev.features)
        batch.pop("labels")
        with torch.no_grad():
            predicted.append("ABCD"[int(pm.model(**batch, decoder_input_ids=start).logits[0, -1, letters].argmax())])
    assert result["mcq"]["image"]["letters"] == {k: predicted.count(k) for k in "ABCD"}
    common = ["--vision", str(tiny_models["dinov2"]), "--llm", str(tiny_models["t5"]), "--data", str(tiny_pairs),
              "--quiet", "--stage0-steps", "0"]
    assert train_cli(["--layer", "1", "--out", str(tmp_path / "bad"), *common]) == 2
    assert "--layer" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def _blip_run(tiny_models, tiny_pairs, tmp_path, instruct: bool, stage1_steps: int):
    """An HF BLIP-2 / InstructBLIP tiny checkpoint, the trained run from it, and the checkpoint's weights."""
    from transformers import AutoModelForImageTextToText

    from pg_train.synthetic import write_tiny_blip

    folder = write_tiny_blip(tmp_path / "blip", tiny_models["t5"], instruct=instruct)
    out = tmp_path / "run"
    train(_cfg(tiny_models, tiny_pairs, out, init_from=str(folder), layer=0, stage0_steps=0, aux_weight=0.0,
               text_first_steps=0, text_first_frac=0.0, distill_weight=0.0, scale_match=False,
               stage1_steps=stage1_steps, stage2_steps=2))
    return out, dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


def _moved(before: dict, model) -> set[str]:
    after = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, after[n])}


def test_an_hf_blip2_checkpoint_trains_through_the_same_trainer(tiny_models, tiny_pairs, tmp_path):
    """``--init-from`` an HF BLIP-2 (FlanT5) checkpoint: stage 1 trains the Q-Former side, stage 2 the T5 too; the
    saved model is the grounded BLIP-2 with its query rows bypassing the encoder."""
    from pg_train.modeling_grounded_encdec import GroundedBlip2ForConditionalGeneration
    from pg_train.vlm import load_vlm

    out, before = _blip_run(tiny_models, tiny_pairs, tmp_path, instruct=False, stage1_steps=2)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 1, 2, 2]
    assert all(r["grad_norm"]["projector"] > 0 for r in records)
    assert all(r["grad_norm"]["lm"] > 0 for r in records if r["stage"] == 2)
    model = load_vlm(out / "model").model
    assert isinstance(model, GroundedBlip2ForConditionalGeneration) and model.config.bypass_encoder
    moved = _moved(before, model)
    assert any(n.startswith("qformer.") for n in moved) and "query_tokens" in moved
    assert not any(n.startswith("vision_model.") for n in moved)  # the frozen encoder stays as it was


def test_an_instructblip_checkpoint_trains_and_evaluates(tiny_models, tiny_pairs, tmp_path):
    """``--init-from`` an HF InstructBLIP (T5) checkpoint: its Q-Former reads each image's instruction (from the
    checkpoint's ``qformer_tokenizer/``) in pg-train and pg-eval; the query rows bypass the encoder."""
    from pg_train.cli import eval_cli
    from pg_train.modeling_grounded_encdec import GroundedInstructBlipForConditionalGeneration
    from pg_train.vlm import load_vlm

    out, before = _blip_run(tiny_models, tiny_pairs, tmp_path, instruct=True, stage1_steps=1)
    vlm = load_vlm(out / "model")
    assert isinstance(vlm.model, GroundedInstructBlipForConditionalGeneration) and vlm.qformer_tokenizer is not None
    moved = _moved(before, vlm.model)
    assert any(n.startswith("qformer.") for n in moved) and not any(n.startswith("vision_model.") for n in moved)
    assert eval_cli([str(out), "--quiet", "--no-rank-all", "--max-new-tokens", "2", "--precision", "fp32",
                     "--bench-repeats", "1"]) == 0
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["bypass_encoder"] is True and result["mcq"]["image"]["n"] == 4 * result["n_images"]
    # the instruction matters: the same image under another question gives other query rows
    feats = vlm.model.encode_images(torch.zeros(1, 3, 8, 8))
    a = vlm.model.project(feats, **vlm.qformer_inputs(["What is this ?"]))
    b = vlm.model.project(feats, **vlm.qformer_inputs(["a big red tree"]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["t5", "instructblip"])
def test_encoder_decoder_models_take_the_llava15_recipe(kind, tiny_models, tmp_path):
    """``--recipe llava15`` (streamed LLaVA JSONL with multi-turn and text-only records, the encoder in the loop,
    gradient checkpointing) trains a plain-projector T5 and an InstructBLIP: every stage-2 step moves the T5."""
    from pg_train.config import resolve_config
    from pg_train.synthetic import write_llava_data, write_tiny_blip

    data = write_llava_data(tmp_path / "data", 24, n_images=8)
    model = (dict(vision=str(tiny_models["dinov2"]), llm=str(tiny_models["t5"]), vision_pool=2) if kind == "t5" else
             dict(init_from=str(write_tiny_blip(tmp_path / "blip", tiny_models["t5"], instruct=True))))
    out = tmp_path / "run"
    summary = train(resolve_config(dict(
        recipe="llava15", stage1_data=data["stage1"], stage2_data=data["stage2"], image_root=data["image_root"],
        max_steps=2, batch_size=4, stage1_batch_size=4, precision="fp32", max_length=96, template="vicuna_v1",
        num_workers=0, report_to="none", cache_dir=str(tmp_path / "cache"), out_dir=str(out), progress=False,
        **model)))
    assert summary["steps"] == {0: 0, 1: 2, 3: 0, 2: 2}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"]["lm"] > 0 for r in records if r["stage"] == 2)
    assert all(r["loss"] > 0 for r in records)


def test_a_molecule_run_trains_saves_and_evaluates(tiny_models, tiny_molecule_pairs, tmp_path, capsys):
    """MolCA-style: a frozen SMILES encoder's slots enter the LM at L, LoRA on the LM (from the format stage on);
    class MCQ and name ranking on held-out molecules, with both controls."""
    from pg_train.cli import eval_cli
    from pg_train.vlm import load_vlm

    trained, out = tmp_path / "trained", tmp_path / "mol"
    summary = train(_cfg(tiny_models, tiny_molecule_pairs, trained, modality="molecule",
                         vision=str(tiny_models["smiles"]), slots=3, lora=True, stage2_lr=3e-4,
                         lr_scheduler="constant_with_warmup", system_prompt="Answer about the molecule.",
                         format_steps=2, format_until=1e-6, text_first_steps=0))
    assert summary["num_image_tokens"] == 3 and summary["insert_layer"] == 1
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0] * 3 + [1] * 3 + [3] * 2 + [2] * 4
    assert all(r["text_only"] and r["grad_norm"]["lm"] > 0 for r in log if r["stage"] == 3)  # the LoRA adapters
    assert [r["lr"]["lm"] for r in log if r["stage"] == 2] == [3e-4] * 4  # no warm-up step in 4 at 3 %
    shutil.move(trained, out)  # a run folder evaluates wherever it lies: its .smi inputs are named in data/
    vlm = load_vlm(out / "model")
    assert vlm.modality == "molecule" and vlm.model.config.vision_slots == 3
    data = json.loads((out / "data" / "manifest.json").read_text())
    assert data["modality"] == "molecule" and data["counts"]["test_images"] == 4
    assert eval_cli([str(out), "--quiet", "--no-generate", "--precision", "fp32", "--bench-repeats", "1",
                     "--modality", "molecule"]) == 0
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["modality"] == "molecule"
    for control in ("image", "no_image", "shuffled"):
        assert result["mcq"][control]["n"] == 16 and result["rank4"][control]["n"] == 4
    assert result["rank_all"]["image"]["candidates"] == 4
    capsys.readouterr()
    assert eval_cli([str(out), "--quiet", "--no-rank-all", "--no-generate", "--bench-repeats", "0",
                     "--modality", "image", "--out", str(tmp_path / "wrong")]) == 2
    assert "reads molecule inputs" in capsys.readouterr().err and not (tmp_path / "wrong").exists()


def test_molecule_runs_refuse_bad_input_in_one_line(tiny_models, tiny_molecule_pairs, tmp_path, capsys):
    from pg_train.cli import train_cli

    common = ["--llm", str(tiny_models["llama"]), "--stage2-steps", "1", "--stage0-steps", "0", "--quiet",
              "--batch-size", "4"]
    bad_pairs = tmp_path / "bad.jsonl"
    bad_pairs.write_text(tiny_molecule_pairs.read_text().replace('"CCO"', '"C1CC("'))
    cases = [(["--modality", "molecule", "--vision", str(tiny_models["smiles"]), "--data", str(bad_pairs)],
              "unparsable SMILES"),
             (["--modality", "molecule", "--vision", str(tiny_models["dinov2"]), "--data", str(tiny_molecule_pairs)],
              "not a SMILES encoder"),
             (["--modality", "audio", "--vision", str(tiny_models["smiles"])], "modality must be one of"),
             (["--modality", "molecule", "--vision", str(tiny_models["smiles"]), "--data", "tuxpaint"],
              "holds image inputs")]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        assert train_cli([*args, *common, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
