"""Extraction on tiny random CLIP / Dinov2 / ViT encoders and a tiny Llama: layer counts and pooling."""

import json

import pytest
import torch

from pg_analysis.data import load_pairs_file, open_image
from pg_analysis.errors import InputError
from pg_analysis.features import FeatureCache, extract_text, extract_vision, pool_text, pool_vision
from pg_analysis.models import load_lm, load_vision, pick_runtime
from pg_analysis.registry import resolve_model

RT = pick_runtime("cpu", "float32")


@pytest.mark.parametrize("family", ["clip", "dinov2", "vit"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vision_extraction_matches_manual(tiny_models, tiny_pairs, family, pooling):
    entry = resolve_model(str(tiny_models[family]), "vision")
    assert entry.family == family
    adapter = load_vision(entry, RT)
    ds = load_pairs_file(tiny_pairs)
    imgs, ids = list(ds["image"])[:5], list(ds["id"])[:5]
    feats = extract_vision(adapter, imgs, ids, pooling, batch_size=2, progress=False)
    assert feats.shape == (3, 5, 32)  # embeddings + 2 blocks
    px = adapter.pixel_values([open_image(p) for p in imgs])
    with torch.no_grad():
        hs = adapter.model(pixel_values=px, output_hidden_states=True).hidden_states
    for layer, h in enumerate(hs):
        manual = h[:, 0] if pooling == "cls" else h[:, 1:].mean(1)
        torch.testing.assert_close(feats[layer], manual, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_text_extraction_matches_manual(tiny_models, pooling):
    adapter = load_lm(resolve_model(str(tiny_models["llama"]), "lm"), RT)
    captions = ["a red cat .", "the big blue house of the dog .", "an apple"]
    feats = extract_text(adapter, captions, pooling, batch_size=2, progress=False)
    assert feats.shape == (4, 3, 32)  # embeddings + 3 blocks
    for i, cap in enumerate(captions):  # one caption at a time: no padding at all
        enc = adapter.tokenizer(cap, return_tensors="pt")
        assert enc.input_ids[0, 0] == adapter.tokenizer.bos_token_id  # BOS included, as Huh et al.
        with torch.no_grad():
            hs = adapter.model(**enc, output_hidden_states=True).hidden_states
        for layer, h in enumerate(hs):
            manual = h[0].mean(0) if pooling == "mean" else h[0, -1]
            torch.testing.assert_close(feats[layer, i], manual, atol=1e-5, rtol=1e-4)


def test_pool_text_left_and_right_padding_agree():
    h = torch.randn(2, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    h_left = h.clone()
    h_left[0, 2:] = h[0, :3]
    for mode in ("mean", "last"):
        torch.testing.assert_close(pool_text(h, right, mode), pool_text(h_left, left, mode))
    torch.testing.assert_close(pool_text(h, right, "last")[0], h[0, 2])


def test_pool_vision_unknown():
    with pytest.raises(InputError):
        pool_vision(torch.randn(1, 3, 2), "max")


def test_wrong_kind_of_model_is_rejected(tiny_models):
    with pytest.raises(InputError, match="not a causal LM"):
        load_lm(resolve_model(str(tiny_models["clip"]), "lm"), RT)
    with pytest.raises(InputError, match="not a vision encoder"):
        load_vision(resolve_model(str(tiny_models["llama"]), "vision"), RT)


def test_cache_roundtrip_and_corruption(tmp_path):
    cache = FeatureCache(tmp_path)
    fields = {"model": "m", "n": 3}
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12.0).reshape(1, 3, 4)

    a, hit = cache.get_or_compute("text", fields, compute)
    assert not hit and len(calls) == 1
    b, hit = cache.get_or_compute("text", fields, compute)
    assert hit and len(calls) == 1 and torch.equal(a, b)
    _, other = cache.get_or_compute("text", {"model": "m", "n": 4}, compute)  # another key → recompute
    assert not other and len(calls) == 2
    data_path, meta_path = cache.paths("text", fields)
    data_path.write_bytes(data_path.read_bytes()[:20])  # truncated file
    c, hit = cache.get_or_compute("text", fields, compute)
    assert not hit and len(calls) == 3 and torch.equal(a, c)
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [9, 9, 9]
    meta_path.write_text(json.dumps(meta))
    _, hit = cache.get_or_compute("text", fields, compute)
    assert not hit and len(calls) == 4
    raw = bytearray(data_path.read_bytes())  # same size, same shape, one value changed: only a checksum sees it
    raw[-4:] = torch.tensor([99.0]).numpy().tobytes()
    data_path.write_bytes(bytes(raw))
    d, hit = cache.get_or_compute("text", fields, compute)
    assert not hit and len(calls) == 5 and torch.equal(a, d)
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_folder_that_cannot_be_written_is_refused_before_computing(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    calls = []
    with pytest.raises(InputError, match="is a file, not a folder"):
        FeatureCache(tmp_path / "file" / "features").get_or_compute("x", {}, lambda: calls.append(1))
    assert not calls


def test_cache_rejects_nan_features(tmp_path):
    with pytest.raises(InputError, match="NaN"):
        FeatureCache(tmp_path).get_or_compute("x", {}, lambda: torch.tensor([[[float("nan")]]]))
    assert not list(tmp_path.iterdir())
