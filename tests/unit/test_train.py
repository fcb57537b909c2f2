"""Instruction data builder, batches and schedules, parameter policy per stage, losses and scale matching (tiny)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.datasets import build_tuxpaint_instructions, collate, load_llava_json
from pg_train.config import TrainConfig, load_recipe, resolve_config
from pg_train.losses import info_nce
from pg_train.params import set_trainable


@pytest.fixture(scope="module")
def pairs(tiny_pairs):
    from pg_analysis.data import load_pairs

    return load_pairs(str(tiny_pairs))


def test_builder_is_deterministic_and_splits_by_image(pairs, tmp_path):
    a = build_tuxpaint_instructions(tmp_path / "a", seed=3, pairs=pairs)
    build_tuxpaint_instructions(tmp_path / "b", seed=3, pairs=pairs)
    for name in a["files"].values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    images = {s: {r["image_id"] for r in json.loads((tmp_path / "a" / f"{s}_caption.json").read_text())}
              for s in ("train", "val", "test")}
    assert not images["train"] & images["test"] and not images["val"] & images["test"]
    assert sum(map(len, images.values())) == len(pairs)
    mcq = json.loads((tmp_path / "a" / "test_mcq.json").read_text())
    assert len(mcq) == 4 * len(images["test"])
    for r in mcq:
        assert r["options"]["ABCD".index(r["answer"])] == r["caption"]
        assert len(set(o.lower() for o in r["options"])) == 4
        assert r["conversations"][-1]["value"] == r["answer"]
    assert sorted(r["answer"] for r in mcq) == sorted("ABCD" * len(images["test"]))
    c = build_tuxpaint_instructions(tmp_path / "c", seed=4, pairs=pairs)
    assert (tmp_path / "c" / c["files"]["test_mcq"]).read_text() != (tmp_path / "a" / a["files"]["test_mcq"]).read_text()


def test_pairs_with_relative_image_paths_build_data_readable_from_anywhere(pairs, tmp_path, monkeypatch):
    from pg_train.datasets import manifest_image_root

    monkeypatch.chdir(Path(pairs[0]["image"]).parent)  # the pairs' images named relative to the working folder
    relative = [{**r, "image": str(Path(r["image"]).relative_to(Path.cwd()))} for r in pairs]
    m = build_tuxpaint_instructions(tmp_path / "data", seed=3, pairs=relative)
    assert Path(m["image_root"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    records = load_llava_json(tmp_path / "data" / m["files"]["train_caption"],
                              manifest_image_root(m, tmp_path / "data"))
    assert all(Path(r["image_path"]).is_file() for r in records)


def test_extra_train_pairs_join_only_the_training_split(pairs, tmp_path):
    base = build_tuxpaint_instructions(tmp_path / "a", seed=3, pairs=pairs)
    test_caption = json.loads((tmp_path / "a" / "test_caption.json").read_text())[0]["caption"]
    extra = [dict(pairs[0], id="extra/0", caption="a purple kite ."),
             dict(pairs[1], id="extra/1", caption=test_caption.upper()),  # shares a test caption: left out
             dict(pairs[2], id=pairs[2]["id"], caption="a taken id .")]  # id already used: left out
    m = build_tuxpaint_instructions(tmp_path / "b", seed=3, pairs=pairs, extra_train=extra)
    assert m["extra_train"] == {"offered": 3, "added": 1, "left_out": 2}
    for split in ("val", "test"):  # held-out splits are byte-identical to the build without extras
        for task in ("caption", "mcq", "what"):
            name = f"{split}_{task}.json"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = json.loads((tmp_path / "b" / "train_caption.json").read_text())
    assert len(train) == base["counts"]["train_caption"] + 1
    assert [r["caption"] for r in train if r["image_id"] == "extra/0"] == ["a purple kite ."]
    assert m["counts"]["train_mcq"] == 4 * len(train)
    with pytest.raises(InputError, match="does not apply to --data llava"):
        TrainConfig(data="llava", stage2_data="s2.json", extra_train="tuxpaint-cartoon")
    assert TrainConfig(data="llava", stage2_data="s2.json").extra_pairs() is None  # auto: only the Tux Paint builder gets the drawings
    assert TrainConfig(data="pairs.jsonl").extra_pairs() is None
    assert TrainConfig().extra_pairs() == "tuxpaint-cartoon"
    assert TrainConfig(extra_train="none").extra_pairs() is None


def test_llava_json_missing_image_is_a_clear_error(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"id": "x", "image": "nope.png", "conversations": []}]))
    with pytest.raises(InputError, match="nope.png not found"):
        load_llava_json(tmp_path / "d.json")


def test_collate_pads_and_picks_mirrored_features():
    from pg_train.datasets import Example

    feats = torch.arange(2 * 2 * 3 * 1, dtype=torch.float32).reshape(2, 2, 3, 1)
    exs = [Example([1, 2, 3], [-100, 2, 3], 1), Example([1, 2], [-100, 2], -1), Example([5], [5], 0)]
    b = collate(exs, 0, feats, flips=[True, False, False])
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0], [5, 0, 0]]
    assert b["labels"][1].tolist() == [-100, 2, -100] and b["attention_mask"].sum() == 6
    assert torch.equal(b["vision_features"], torch.stack([feats[1, 1], feats[0, 0]]))
    left = collate(exs, 0, feats, padding_side="left")
    assert left["input_ids"][2].tolist() == [0, 0, 5]


def test_encoder_features_are_cached_per_image(tiny_models, tiny_pairs, tmp_path):
    from pg_train.datasets import image_features
    from pg_train.vlm import build_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), vision_pool=2)
    imgs = sorted(str(p) for p in tiny_pairs.parent.glob("img*.png"))
    encoded = []
    real = vlm.model.encode_images
    vlm.model.encode_images = lambda pv: encoded.append(pv.shape[0]) or real(pv)
    cache = tmp_path / "features"
    first = image_features(vlm, imgs[:6], cache, progress=False)
    assert first.shape[:2] == (6, 2) and sum(encoded) == 12  # 6 images and their mirrors
    second = image_features(vlm, imgs[4:10], cache, progress=False)  # another split: 2 shared, 4 new
    assert sum(encoded) == 12 + 8
    torch.testing.assert_close(second[:2], first[4:6])
    again = image_features(vlm, imgs[:10], cache, progress=False)
    assert sum(encoded) == 20  # everything now from the cache
    torch.testing.assert_close(again, image_features(vlm, imgs[:10], None, progress=False))
    assert len(list(cache.glob("encoder-*.safetensors"))) == 10
    with pytest.raises(InputError, match="no images"):
        image_features(vlm, [], cache, progress=False)


def test_infonce():
    x = torch.randn(8, 16)
    assert info_nce(x, x, 0.07) < 0.01 < info_nce(x, torch.randn(8, 16), 0.07)


def test_each_stage_trains_only_its_parameters(tiny_models):
    from pg_train.vlm import build_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), insert_layer=2, vision_pool=2)
    model = vlm.model
    names = {id(p): n for n, p in model.named_parameters()}
    ids = torch.tensor([[1] + [vlm.image_token_id] * 4 + [5, 6, 7]])
    for stage in (1, 2):
        set_trainable(model, stage, 2)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, vision_features=torch.randn(1, 4, 32), labels=ids.masked_fill(ids > 30, -100))
        out.loss.backward()
        got = {names[id(p)] for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert all("multi_modal_projector" in n for n in got) if stage == 1 else True
        assert any("multi_modal_projector" in n for n in got)
        if stage == 2:
            assert {n.split(".")[3] for n in got if ".layers." in n} == {"2"}  # layers >= L only (3 layers)
            assert any(n.endswith("language_model.norm.weight") for n in got)
        assert not any("vision_tower" in n or "embed_tokens" in n or "layers.0." in n or "layers.1." in n
                       for n in got)


def test_aux_loss_counts_each_image_once():
    from pg_train.losses import Objective

    torch.manual_seed(0)
    mean, targets = torch.randn(8), torch.randn(3, 8)
    model = torch.nn.Module()
    model.project = lambda f: f  # identity projector: the features are the rows
    objective = Objective(model, tau=0.1, aux_weight=1.0, targets=targets, token_mean=mean)
    rows = torch.tensor([0, 1, 0, 2])  # a repeated picture (the text-only example has no row)
    feats = torch.randn(4, 2, 8)  # one block of rows per example with an image, in batch order
    # centred (match_mean, the default): the pooled rows lose the LM's mean token state, like the targets
    want = info_nce(feats[[0, 1, 3]].mean(1) - mean, targets[[0, 1, 2]], 0.1)
    assert torch.allclose(objective._aux(feats, rows), want)
    plain = Objective(model, tau=0.1, aux_weight=1.0, targets=targets)
    assert torch.allclose(plain._aux(feats, rows), info_nce(feats[[0, 1, 3]].mean(1), targets[[0, 1, 2]], 0.1))
    assert float(objective._aux(feats[:2], torch.tensor([1, 1]))) == 0.0


def test_infonce_rows_are_fp32_under_bf16_autocast():
    from pg_train.losses import Objective

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    model = torch.nn.Module()
    model.project = lin  # an fp32 projector, as the trainer keeps it (autocast would run it in bf16)
    mean, targets, feats = torch.randn(8) * 30, torch.randn(4, 8), torch.randn(4, 3, 8)
    objective = Objective(model, tau=0.07, targets=targets, token_mean=mean)
    want = objective(stage=0, features=feats)["total"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(feats).dtype == torch.bfloat16  # what the rows were before
        pooled = objective.pooled(feats)
        got = objective(stage=0, features=feats)["total"]
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled, lin(feats).mean(1) - mean)
    assert torch.equal(got, want)


def test_stage_lengths_from_steps_epochs_and_the_cap():
    assert TrainConfig().stage_steps(1, 500) == 0  # built data: stage 1 would undo the warm-up (docs/recipe.md)
    assert TrainConfig(data="llava", stage1_data="s1.json").stage_steps(1, 500) == 100
    assert TrainConfig(data="llava", stage1_data="s1.json", stage1_steps=0).stage_steps(1, 500) == 0
    epochs = TrainConfig(stage2_steps=None, stage2_epochs=1.5, batch_size=32, max_steps=None)
    assert epochs.stage_steps(2, 1000) == 47  # ceil(1.5 * 1000 / 32)
    assert TrainConfig(max_steps=5).stage_steps(2, 1000) == 5
    assert [TrainConfig(max_steps=5).stage_steps(s, 1000) for s in (0, 3)] == [5, 5]  # every stage, the warm-up too
    assert TrainConfig().stage_steps(2, 0) == 0
    with pytest.raises(InputError, match="stage1_steps"):
        TrainConfig(stage1_steps=-1)
    with pytest.raises(InputError, match="not divisible"):
        TrainConfig(batch_size=10, grad_accum=4)


def test_text_first_steps_wait_for_the_answer_format_only_when_asked():
    from pg_train.trainer import TextFirst, step_rng

    plain = TextFirst(TrainConfig(text_first_steps=3, text_first_frac=0.3))
    drawn = [bool(step_rng(0, 2, s).random() < 0.3) for s in range(40)]  # the per-step draw the trainer always made
    assert [plain.use_text(s) for s in range(40)] == [True] * 3 + drawn[3:]
    # with the gate: text-only past the first steps until the last 5 text losses average below the threshold
    gate = TextFirst(TrainConfig(text_first_steps=3, text_first_frac=0.3, text_first_until=0.1,
                                 text_first_max_steps=30))
    for step, loss in enumerate([0.5] * 10 + [0.05] * 4):
        assert gate.use_text(step)
        gate.observe(step, loss)
    assert gate.learnt_at is None and gate.use_text(14)  # 4 low losses and one high in the window: not yet
    gate.observe(14, 0.0)
    assert gate.learnt_at == 14 and [gate.use_text(s) for s in range(15, 40)] == drawn[15:]
    # resumed from its state, the gate goes on where it was; it stops waiting at the cap
    stuck = TextFirst(TrainConfig(text_first_steps=3, text_first_until=0.1, text_first_max_steps=8))
    for step in range(6):
        stuck.observe(step, 0.5)
    again = TextFirst(TrainConfig(text_first_steps=3, text_first_until=0.1, text_first_max_steps=8), stuck.state())
    assert again.state() == stuck.state() and again.use_text(7) and again.learnt_at is None
    assert [again.use_text(s) for s in range(8, 40)] == [bool(step_rng(0, 2, s).random() < 0.3) for s in range(8, 40)]
    # a run whose loss fell within the first steps is the run without the gate
    early = TextFirst(TrainConfig(text_first_steps=8, text_first_until=0.1))
    for step in range(8):
        early.observe(step, 0.01)
    assert early.learnt_at == 4 and [early.use_text(s) for s in range(40)] == [plain.use_text(s) if s >= 8 else True
                                                                                for s in range(40)]
    with pytest.raises(InputError, match="text_first_until"):
        TrainConfig(text_first_until=0)
    with pytest.raises(InputError, match="text_first_max_steps"):
        TrainConfig(text_first_steps=60, text_first_until=0.1, text_first_max_steps=30)
    with pytest.raises(InputError, match="format_until"):
        TrainConfig(format_steps=10, format_until=0)


def test_the_format_stage_sorts_between_stages_1_and_2(tmp_path):
    from pg_train.checkpoints import latest_checkpoint

    for name in ("stage1-step000100", "stage3-step000040", "stage2-step000001", "stage7-step000500"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "state.json").write_text("{}")
        (tmp_path / "checkpoints" / name / "optimizer.bin").write_text("")
    assert latest_checkpoint(tmp_path).name == "stage2-step000001"  # stage 2 runs after the format stage (3)
    shutil.rmtree(tmp_path / "checkpoints" / "stage2-step000001")
    assert latest_checkpoint(tmp_path).name == "stage3-step000040"  # no stage 7: not one of this trainer's


def test_recipes_are_files_the_flags_override(tmp_path):
    # the built-in offline recipe is exactly the defaults
    assert resolve_config({}) == TrainConfig()
    llava = resolve_config({"recipe": "llava15", "stage2_data": "mix.json"})
    assert (llava.batch_size, llava.stage1_batch_size, llava.stage2_lr, llava.stage1_lr) == (128, 256, 2e-5, 1e-3)
    assert llava.stage2_epochs == 1 and llava.gradient_checkpointing and llava.max_length == 2048
    assert llava.template == "vicuna_v1" and llava.system_prompt is None and llava.store is None
    assert not llava.uses_warmup_features and not llava.uses_twins
    assert resolve_config({"recipe": "llava15", "stage2_data": "m.json", "batch_size": 64}).batch_size == 64
    molca = resolve_config({"recipe": "molca"})
    assert (molca.modality, molca.vision, molca.data, molca.slots) == ("molecule", "smiles-albert", "molecules", 8)
    assert molca.extra_pairs() is None and molca.uses_warmup_features
    assert TrainConfig(data="molecules", modality="molecule").extra_pairs() is None
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"options": {"stage2_steps": 7, "lora": True}}))
    assert resolve_config({"recipe": str(mine)}).stage2_steps == 7
    mine.write_text(json.dumps({"options": {"stage2_stepz": 7}}))
    with pytest.raises(InputError, match="unknown options stage2_stepz"):
        load_recipe(str(mine))
    with pytest.raises(InputError, match="neither a built-in"):
        load_recipe("llava16")
    with pytest.raises(InputError, match="feature-store"):
        TrainConfig(feature_store="none")  # the warm-up reads every image's features


@pytest.mark.parametrize("match_mean", [False, True])
def test_scale_matching_gives_the_rows_the_lm_statistics(tiny_models, match_mean):
    from pg_train.warmup import caption_targets, match_scale
    from pg_train.vlm import build_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), insert_layer=2, vision_pool=2)
    states = caption_targets(vlm, ["a red ball", "two small cats", "the moon"], 2, prefix=[1, 5, 6])
    assert states.means.shape == (3, vlm.model.config.text_config.hidden_size)
    features = torch.randn(5, 4, 32)
    match_scale(vlm.model, features, states, match_mean)
    with torch.no_grad():
        rows = vlm.model.project(features).flatten(0, 1)
    if match_mean:
        torch.testing.assert_close(rows.mean(0), states.token_mean, atol=1e-4, rtol=1e-4)
        got = float((rows - rows.mean(0)).norm(dim=-1).median())
        assert got == pytest.approx(states.centred_median_norm, rel=1e-4)
    else:
        assert not vlm.model.model.multi_modal_projector.offset.any()
        assert float(rows.norm(dim=-1).median()) == pytest.approx(states.median_norm, rel=1e-4)


def test_text_twin_distillation_parts():
    from pg_train.losses import common_suffix_length, distill_layer_indices, state_match_loss, suffix_rows

    assert common_suffix_length([1, 9, 9, 5, 6, 7], [1, 3, 5, 6, 7]) == 3
    assert common_suffix_length([1, 2], [3, 4]) == 0 and common_suffix_length([4], [4]) == 1
    h = torch.arange(2 * 5 * 1, dtype=torch.float).reshape(2, 5, 1)  # right-padded: lengths 4 and 5
    assert suffix_rows(h, [4, 5], [2, 1]).flatten().tolist() == [2.0, 3.0, 9.0]
    t = torch.randn(200, 8) + 50.0  # a large shared component cancels
    assert float(state_match_loss(t, t)) == 0.0
    assert float(state_match_loss(torch.randn(200, 8) + 50.0, t)) == pytest.approx(2.0, abs=0.4)
    assert distill_layer_indices(0, 30, 4) == [7, 14, 21, 29]
    assert distill_layer_indices(4, 30, 2) == [16, 29] and distill_layer_indices(28, 30, 4) == [28, 29]
    assert distill_layer_indices(30, 30, 4) == []


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"),
                                        ("zero3", "DEEPSPEED")])
def test_the_shipped_launch_configs_load_in_accelerate(name, kind):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[2] / "scripts" / "launch" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes >= 2
    if name == "fsdp":  # frozen and trained parameters in one model
        assert config.fsdp_config["fsdp_use_orig_params"] is True
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_stage2_tasks_and_checkpoints_from_before_an_option_existed(tmp_path):
    from pg_train.checkpoints import STATE, read_checkpoint
    from pg_train.config import training_fields

    with pytest.raises(InputError, match="stage2_tasks"):
        TrainConfig(stage2_tasks="mcq,captions")
    with pytest.raises(InputError, match="stage2_tasks"):
        TrainConfig(stage2_tasks="")
    with pytest.raises(InputError, match="lr_scheduler must be one of cosine"):
        TrainConfig(lr_scheduler="reduce_lr_on_plateau")
    old = training_fields(TrainConfig())
    for newer in ("stage2_tasks", "modality", "slots"):  # a checkpoint written before these options existed
        old.pop(newer)
    (tmp_path / STATE).write_text(json.dumps({"config": old, "world_size": 1}))
    assert read_checkpoint(tmp_path, TrainConfig(), 1)["config"] == old
    with pytest.raises(InputError, match="options differ \\(stage2_tasks\\)"):
        read_checkpoint(tmp_path, TrainConfig(stage2_tasks="mcq"), 1)


def test_a_checkpoint_resumes_in_the_precision_it_was_trained_in(tmp_path):
    from pg_train.checkpoints import STATE, read_checkpoint
    from pg_train.config import training_fields

    # written by `--precision auto` on a device that resolved it to fp32
    (tmp_path / STATE).write_text(json.dumps({"config": training_fields(TrainConfig(precision="auto")),
                                              "precision": "fp32", "world_size": 1}))
    for option in ("auto", "fp32"):  # the same numeric path, however asked for
        assert read_checkpoint(tmp_path, TrainConfig(precision=option), 1, "fp32")["precision"] == "fp32"
    with pytest.raises(InputError, match="trained in fp32; this run would train in bf16.*--precision fp32"):
        read_checkpoint(tmp_path, TrainConfig(precision="auto"), 1, "bf16")  # auto, on a device that runs bf16
    with pytest.raises(InputError, match="trained in fp32"):
        read_checkpoint(tmp_path, TrainConfig(precision="bf16"), 1, "bf16")
    # a checkpoint that does not record its precision compares the option
    (tmp_path / STATE).write_text(json.dumps({"config": training_fields(TrainConfig(precision="auto")),
                                              "world_size": 1}))
    assert read_checkpoint(tmp_path, TrainConfig(precision="auto"), 1, "fp32")
    with pytest.raises(InputError, match="options differ \\(precision\\)"):
        read_checkpoint(tmp_path, TrainConfig(precision="fp32"), 1, "fp32")
