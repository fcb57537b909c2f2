"""Instruction data builder, batches and schedules, parameter policy per stage, losses and scale matching (tiny)."""

import json

import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.datasets import build_tuxpaint_instructions, collate, load_llava_json
from pg_train.trainer import TrainConfig, batch_indices, info_nce, lr_factor, set_trainable


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


def test_schedule_batches_and_infonce():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)
    first = [batch_indices(10, 4, s, 0, 1) for s in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert first == [batch_indices(10, 4, s, 0, 1) for s in range(5)]
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
    from types import SimpleNamespace

    from pg_train.trainer import aux_loss, info_nce

    torch.manual_seed(0)
    mean = torch.randn(8)
    prepared = SimpleNamespace(caption_targets=torch.randn(3, 8), states=SimpleNamespace(token_mean=mean))
    model = SimpleNamespace(project=lambda f: f)  # identity projector: the features are the rows
    cfg = TrainConfig(tau=0.1)
    exs = [SimpleNamespace(image=i) for i in (0, 1, -1, 0, 2)]  # a text-only example and a repeated picture
    feats = torch.randn(4, 2, 8)  # one block of rows per example with an image, in batch order
    got = aux_loss(cfg, prepared, model, exs, feats, torch.device("cpu"))
    # match_mean (the default): the pooled rows are centred by the LM's mean token state, like the targets
    want = info_nce(feats[[0, 1, 3]].mean(1) - mean, prepared.caption_targets[[0, 1, 2]], 0.1)
    assert torch.allclose(got, want)
    got = aux_loss(TrainConfig(tau=0.1, match_mean=False), prepared, model, exs, feats, torch.device("cpu"))
    assert torch.allclose(got, info_nce(feats[[0, 1, 3]].mean(1), prepared.caption_targets[[0, 1, 2]], 0.1))
    same = [SimpleNamespace(image=1), SimpleNamespace(image=1)]
    assert float(aux_loss(cfg, prepared, model, same, feats[:2], torch.device("cpu"))) == 0.0


def test_stage1_runs_by_default_only_with_stage1_data():
    assert TrainConfig().stage1_steps == 0  # built data: stage 1 would undo the warm-up (docs/recipe.md)
    assert TrainConfig(data="llava", stage1_data="s1.json").stage1_steps == 100
    assert TrainConfig(data="llava", stage1_data="s1.json", stage1_steps=0).stage1_steps == 0
    with pytest.raises(InputError, match="stage1_steps"):
        TrainConfig(stage1_steps=-1)


@pytest.mark.parametrize("match_mean", [False, True])
def test_scale_matching_gives_the_rows_the_lm_statistics(tiny_models, match_mean):
    from pg_train.trainer import match_scale, caption_targets
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
    from pg_train.trainer import common_suffix_length, distill_layer_indices, state_match_loss, suffix_rows

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
