"""The streaming data pipeline: record indices over JSON/JSONL, examples made in workers, bad records, sampling,
and the feature store."""

import json

import numpy as np
import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.pipeline import EpochSampler, RecordIndex, TrainDataset, _json_list_to_jsonl


def _records(n):
    return [{"id": f"r{i}", "image": f"img{i % 3}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat is this ?"},
                               {"from": "gpt", "value": "a red cat ." + " big" * i}]} for i in range(n)]


def test_a_json_list_streams_into_jsonl_and_both_index_the_same(tmp_path):
    recs = _records(50)
    (tmp_path / "d.json").write_text(json.dumps(recs, indent=1))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")  # a blank last line
    a = RecordIndex([tmp_path / "d.json"], tmp_path / "cache")
    b = RecordIndex([tmp_path / "d.jsonl"], tmp_path / "cache")
    assert len(a) == len(b) == 50
    assert [a.record(i)["conversations"] for i in range(50)] == [r["conversations"] for r in recs]
    assert b.record(7)["image_path"] == str(tmp_path / "img1.png")
    assert list(a.lengths) == list(b.lengths) and a.lengths[49] > a.lengths[0]  # longer record, more bytes
    assert len(list((tmp_path / "cache" / "records").glob("*.jsonl"))) == 1  # converted once, reused
    RecordIndex([tmp_path / "d.json"], tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "records").glob("*.jsonl"))) == 1
    two = RecordIndex([tmp_path / "d.jsonl", tmp_path / "d.json"], tmp_path / "cache", image_root="/data")
    assert len(two) == 100 and two.record(60)["image_path"] == "/data/img1.png"
    # a record bigger than the reader's chunk still streams
    big = [{"id": "x", "conversations": [{"from": "human", "value": "w " * 700_000}, {"from": "gpt", "value": "."}]}]
    (tmp_path / "big.json").write_text(json.dumps(big))
    assert _json_list_to_jsonl(tmp_path / "big.json", tmp_path / "big.jsonl") == 1


def test_broken_files_are_one_clear_line(tmp_path):
    (tmp_path / "cut.json").write_text(json.dumps(_records(3))[:-30])
    with pytest.raises(InputError, match="not closed|not valid JSON"):
        RecordIndex([tmp_path / "cut.json"], tmp_path / "cache")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match="JSON list"):
        RecordIndex([tmp_path / "obj.json"], tmp_path / "cache")
    with pytest.raises(InputError, match="does not exist"):
        RecordIndex([tmp_path / "none.jsonl"], tmp_path / "cache")
    assert not list((tmp_path / "cache" / "records").glob("*")) or all(
        not p.name.endswith(".tmp") for p in (tmp_path / "cache" / "records").iterdir())  # no half-written file


def test_bad_records_come_back_as_one_line_errors(tiny_models, tiny_pairs, tmp_path):
    from pg_analysis.data import open_image
    from pg_train.vlm import build_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), vision_pool=2)
    img = tiny_pairs.parent / "img00.png"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"image": str(img), "conversations": [{"from": "human", "value": "<image>\nWhat is this ?"},
                                                 {"from": "gpt", "value": "a cat ."}]}
    rows = [good,
            {**good, "image": str(tmp_path / "missing.png")},
            {**good, "image": str(tmp_path / "broken.png")},
            {**good, "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}]},
            {"conversations": good["conversations"]},  # an <image> but no image
            {"conversations": [{"from": "human", "value": "What is this ?"}, {"from": "gpt", "value": "a dog ."}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = RecordIndex([tmp_path / "d.jsonl"], tmp_path / "cache")
    ds = TrainDataset(index, vlm.tokenizer, "vicuna_v1", vlm.image_token_id, vlm.model.num_image_tokens, 64,
                      image_processor=vlm.image_processor)
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["image"].shape == (3, 8, 8) and "error" not in items[0]
    assert "not found" in items[1]["error"] and "corrupt" in items[2]["error"]
    assert "<image>" in items[3]["error"] and "<image>" in items[4]["error"]
    assert "image" not in items[5] and "error" not in items[5]  # text-only records are fine
    assert all("\n" not in it.get("error", "") for it in items)
    torch.testing.assert_close(items[0]["image"], vlm.pixel_values([open_image(img)])[0])  # as evaluation reads it


def test_the_sampler_groups_by_length_in_random_order_as_a_function_of_the_epoch():
    lengths = np.array([5, 100, 7, 98, 6, 97, 8, 99] * 8 + [50])  # 65 records: the last batch is partial
    s = EpochSampler(lengths, 4, seed=0, stage=2)
    first = list(s)
    assert sorted(first) == list(range(65)) and first == list(s)  # a permutation, the same when asked again
    s.set_epoch(1)
    assert list(s) != first
    batches = [first[i:i + 4] for i in range(0, 64, 4)]
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 40  # long with long, short with short (random batches: ~90)
    assert lengths[batches[0]].max() == 100  # the longest batch first
    longs = [lengths[b].min() > 50 for b in batches]
    assert longs != sorted(longs, reverse=True)  # not all long batches, then all short ones
    assert s.group == 4  # transformers' default: min(65 // (4 x 4), 50)
    from transformers.trainer_pt_utils import get_length_grouped_indices

    seed = int(np.random.SeedSequence([0, 2, 0]).generate_state(1)[0])
    mega = get_length_grouped_indices(lengths.tolist(), 4, mega_batch_mult=4,
                                      generator=torch.Generator().manual_seed(seed))
    for k in range(0, 64, 16):  # each mega-batch's 4 batches come together, in a random order within it
        assert sorted(first[k:k + 16]) == sorted(mega[k:k + 16])
    assert first[:64] != mega[:64]
    grouped = EpochSampler(lengths, 4, seed=0, stage=2, group=2)  # mega-batches of 2 batches
    assert sorted(grouped) == list(range(65)) and list(grouped) != first


def test_the_feature_store_is_built_once_and_memory_mapped(tiny_models, tiny_pairs, tmp_path):
    import pickle

    from pg_train.datasets import image_features
    from pg_train.feature_store import FeatureStore, open_or_build
    from pg_train.vlm import build_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), vision_pool=2)
    paths = sorted(str(p) for p in tiny_pairs.parent.glob("img*.png"))[:7]
    store = open_or_build(tmp_path / "store", vlm, paths, tmp_path / "features", chunk=3, progress=False)
    assert isinstance(store.table, np.memmap) and store.table.shape[:2] == (7, 2)
    torch.testing.assert_close(store.all_features([1] * 7), image_features(vlm, paths, None, progress=False)[:, 1])
    again = pickle.loads(pickle.dumps(store))  # what a DataLoader worker receives: no table copied
    assert again._table is None and again.row(paths[3]) == 3
    with pytest.raises(InputError, match="not in the feature store"):
        store.row("/elsewhere.png")
    assert open_or_build(tmp_path / "store", vlm, paths[:3], None, progress=False).paths == paths  # reused
    with pytest.raises(InputError, match="lacks 1"):
        open_or_build(tmp_path / "store", vlm, paths + [str(tiny_pairs.parent / "img20.png")], None, progress=False)
    other = build_vlm(str(tiny_models["clip"]), str(tiny_models["llama"]), vision_pool=2)
    with pytest.raises(InputError, match="another encoder"):
        open_or_build(tmp_path / "store", other, paths, None, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    assert FeatureStore(tmp_path / "store").encoder == store.encoder
