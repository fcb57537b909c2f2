"""The grounded molecule model (MolCA-style): slot pooling, the SMILES processor, the tiny model's contract, the
molecule instruction data."""

import json
from collections import Counter

import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.datasets import build_molecule_instructions, load_llava_json, manifest_image_root, text_first
from pg_train.grounding import GroundingError
from pg_train.inputs import SmilesProcessor, augmented_input, open_input
from pg_train.modeling_grounded_llava import pool_token_slots, token_tower_inputs


def test_token_tower_inputs_leave_out_cls_sep_and_padding():
    ids = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 7, 3, 0, 0, 0]])
    mask, tokens = token_tower_inputs(ids, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    assert tokens.tolist() == [[False, True, True, True, False, False], [False, True, False, False, False, False]]


def test_slots_average_contiguous_tokens_in_order():
    hidden = torch.arange(8.0)[None, :, None].expand(3, 8, 2).clone()
    tokens = torch.zeros(3, 8, dtype=torch.bool)
    tokens[0, 1:7] = True  # six tokens (positions 1..6) into three slots: (1, 2), (3, 4), (5, 6)
    tokens[1, 1:2] = True  # one token: every slot holds it
    slots = pool_token_slots(hidden, tokens, 3)
    assert slots.shape == (3, 3, 2)
    assert slots[0, :, 0].tolist() == [1.5, 3.5, 5.5]
    assert slots[1, :, 0].tolist() == [1.0, 1.0, 1.0]
    assert slots[2].abs().sum() == 0  # a row without tokens: zero slots, no NaN
    # five tokens into two slots: ⌊0⌋..⌈2.5⌉ and ⌊2.5⌋..⌈5⌉ — the middle token in both, none left out
    tokens5 = torch.zeros(1, 8, dtype=torch.bool)
    tokens5[0, 2:7] = True
    assert pool_token_slots(hidden[:1], tokens5, 2)[0, :, 0].tolist() == [3.0, 5.0]


@pytest.fixture(scope="module")
def mol_vlm(tiny_models):
    from pg_train.vlm import build_vlm

    return build_vlm(str(tiny_models["smiles"]), str(tiny_models["llama"]), insert_layer=1, modality="molecule",
                     slots=3, seed=0)


def _prompt(vlm, n_slots, batch=2):
    ids = [vlm.tokenizer.bos_token_id] + [vlm.image_token_id] * n_slots + vlm.tokenizer("What is this ?",
                                                                                        add_special_tokens=False)[
        "input_ids"]
    ids = torch.tensor([ids] * batch)
    return ids, torch.ones_like(ids)


def test_molecule_vlm_follows_the_forward_and_generate_contract(mol_vlm):
    model = mol_vlm.model.eval()
    assert mol_vlm.modality == "molecule" and model.num_image_tokens == 3
    px = mol_vlm.pixel_values(["CCO", "c1ccccc1Cl"])
    assert px.dtype == torch.long and px.shape == (2, 64)  # the tiny tower's 64 positions cap the default 128
    feats = model.encode_images(px)
    assert feats.shape == (2, 3, model.config.vision_config.hidden_size)
    ids, mask = _prompt(mol_vlm, 3)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = model(input_ids=ids, attention_mask=mask, vision_features=feats).logits
        other = model(input_ids=ids, attention_mask=mask, pixel_values=px.flip(0)).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, other)  # the molecule reaches the answer
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, min_new_tokens=3,
                         do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)
    image_features = model.get_image_features(px)
    assert len(image_features.pooler_output) == 2 and image_features.pooler_output[0].shape == (3, 32)
    with pytest.raises(GroundingError, match="token ids"):
        model.encode_images(px.float())


def test_padding_does_not_change_a_molecules_rows(mol_vlm):
    tok = mol_vlm.image_processor.tokenizer
    short = SmilesProcessor(tok, max_length=16)(images=["CCO"])["pixel_values"]
    long = SmilesProcessor(tok, max_length=40)(images=["CCO"])["pixel_values"]
    model = mol_vlm.model
    assert torch.allclose(model.encode_images(short), model.encode_images(long), atol=1e-5)


def test_molecule_vlm_saves_and_loads_with_its_tokenizer(mol_vlm, tmp_path):
    from pg_train.vlm import load_vlm

    mol_vlm.save(tmp_path / "model")
    assert (tmp_path / "model" / "encoder_tokenizer" / "tokenizer.json").is_file()
    back = load_vlm(tmp_path / "model")
    assert back.modality == "molecule" and back.image_processor.max_length == mol_vlm.image_processor.max_length
    px = mol_vlm.pixel_values(["CC(=O)O"])
    assert torch.equal(back.pixel_values(["CC(=O)O"]), px)
    assert torch.allclose(back.model.encode_images(px), mol_vlm.model.encode_images(px), atol=1e-6)


def test_smiles_processor_reads_checks_and_augments(mol_vlm, tmp_path):
    proc = mol_vlm.image_processor
    (tmp_path / "a.smi").write_text("\nOCC(C)C isobutanol\n")
    assert open_input(proc, tmp_path / "a.smi") == "OCC(C)C"
    (tmp_path / "bad.smi").write_text("C1CC(\n")
    with pytest.raises(InputError, match="unparsable SMILES"):
        open_input(proc, tmp_path / "bad.smi")
    with pytest.raises(InputError, match="not found"):
        open_input(proc, tmp_path / "none.smi")
    from pg_analysis.molecules import canonical_smiles

    alt = augmented_input(proc, "OCC(C)C")
    assert alt != "OCC(C)C" and canonical_smiles(alt) == canonical_smiles("OCC(C)C")
    assert augmented_input(proc, "OCC(C)C") == alt  # deterministic
    assert augmented_input(proc, "C") == "C"  # one atom: no other spelling
    with pytest.raises(InputError, match="more than the processor's max_length"):
        SmilesProcessor(proc.tokenizer, max_length=4)(images=["CCCCCCCC"])
    assert proc.to_dict() == SmilesProcessor(proc.tokenizer, proc.max_length).to_dict()
    assert proc.to_dict() != SmilesProcessor(proc.tokenizer, proc.max_length + 1).to_dict()


def test_molecule_instructions_split_by_molecule_with_class_questions(tiny_molecule_pairs, tmp_path):
    from pg_analysis.molecules import load_molecule_pairs

    pairs = load_molecule_pairs(tiny_molecule_pairs)
    manifest = build_molecule_instructions(tmp_path, pairs, seed=0, val_frac=0.0, test_frac=0.25)
    assert manifest["modality"] == "molecule"
    assert manifest["image_root"] == "molecules"  # inside the data folder, named relative to it
    root = manifest_image_root(manifest, tmp_path)
    recs = {s: {t: load_llava_json(tmp_path / manifest["files"][f"{s}_{t}"], root)
                for t in ("caption", "mcq", "what")} for s in ("train", "test")}
    train_ids = {r["image_id"] for r in recs["train"]["caption"]}
    test_ids = {r["image_id"] for r in recs["test"]["caption"]}
    assert len(test_ids) == 4 and not train_ids & test_ids and len(train_ids | test_ids) == 16
    by_id = {r["id"]: r for r in pairs}
    for r in recs["test"]["mcq"]:
        assert r["options"]["ABCD".index(r["answer"])] == r["caption"]
        assert by_id[r["image_id"]]["caption"].endswith(r["caption"])  # the class phrase is the answer
        assert len(set(r["options"])) == 4
        assert open_input(SmilesProcessor(None), r["image_path"]) == by_id[r["image_id"]]["smiles"]
    assert Counter(r["answer"] for r in recs["train"]["mcq"]) == {x: 12 for x in "ABCD"}
    for r in recs["test"]["what"]:
        assert r["conversations"][-1]["value"] == r["caption"] and r["caption"] in r["candidates"]
        assert len(r["candidates"]) == 4 and by_id[r["image_id"]]["caption"].startswith(r["caption"])
    assert text_first(recs["test"]["mcq"][0])["conversations"][0]["value"].startswith("Molecule: ")
    # deterministic, and the SMILES files are left untouched (their cached features stay valid) when rebuilt
    smi = sorted((tmp_path / "molecules").glob("*.smi"))
    mtimes = [p.stat().st_mtime_ns for p in smi]
    again = build_molecule_instructions(tmp_path, pairs, seed=0, val_frac=0.0, test_frac=0.25)
    assert again == manifest and [p.stat().st_mtime_ns for p in smi] == mtimes
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["test_mcq"] == 16


def test_molecule_instructions_need_classes(tmp_path):
    rows = [{"id": f"m{i}", "smiles": "C" * (i + 1), "caption": f"m{i}", "category": ""} for i in range(6)]
    with pytest.raises(InputError, match="no category"):
        build_molecule_instructions(tmp_path, rows)
    rows = [dict(r, category="alkanes" if i % 2 else "alcohols") for i, r in enumerate(rows)]
    with pytest.raises(InputError, match="at least 4 classes"):
        build_molecule_instructions(tmp_path, rows)


def test_audio_is_not_trainable(tiny_models):
    from pg_train.vlm import build_vlm

    with pytest.raises(InputError, match="image or molecule"):
        build_vlm(str(tiny_models["smiles"]), str(tiny_models["llama"]), modality="audio")


def test_a_saved_molecule_vlm_generates_with_transformers_alone(mol_vlm, tmp_path):
    from transformers import AutoTokenizer

    from tests.standalone import generate_without_project

    mol_vlm.save(tmp_path / "model")
    smiles_tok = AutoTokenizer.from_pretrained(tmp_path / "model", subfolder="encoder_tokenizer")
    px = smiles_tok(["CCO", "c1ccccc1"], padding="max_length", max_length=smiles_tok.model_max_length,
                    return_tensors="pt")["input_ids"]
    assert torch.equal(px, mol_vlm.pixel_values(["CCO", "c1ccccc1"]))
    ids, mask = _prompt(mol_vlm, 3)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, min_new_tokens=3,
              do_sample=False)
    got = generate_without_project(tmp_path / "model", kw, tmp_path / "standalone")
    with torch.no_grad():
        assert torch.equal(got["tokens"], mol_vlm.model.generate(**kw))
    assert got["config"]["vision_slots"] == 3
