"""The molecule modality on tiny inputs: CML reading, captions, SMILES checks, the SMILES tokenizer against
rxnmapper's procedure, a tiny random ALBERT as the encoder, and pg-align --modality molecule end to end."""

import json
import re
from pathlib import Path

import pytest
import torch

from pg_analysis import cli
from pg_analysis.errors import AssetError, InputError
from pg_analysis.molecule_assets import reference_ids, regex_from_source, smiles_tokenizer
from pg_analysis.molecules import caption_of, check_smiles, load_molecule_pairs, molecule_rows, read_cml

# a SMILES regex of rxnmapper's form (the asset reads the real one from the wheel's source)
PATTERN = r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*|\$|\%[0-9]{2}|[0-9])"
TOKENS = ["c", "C", "(", ")", "O", "1", "2", "=", "N", "[C@@H]", "[C@H]", "Cl", "Br", "#", "n", "F", "S", "[N+]",
          "[O-]", "3"]
SMILES = ["NCCO", "CC(=O)Oc1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "ClC(Cl)Cl", "c1ccc2ccccc2c1", "CCOC(=O)C=C",
          "OC(C(F)(F)F)C(F)(F)F", "N[C@@H](Cc1ccc([N+](=O)[O-])cc1)C(=O)O", "C#CCO", "CSc1ccccc1Br", "CCCCO",
          "CCN", "OCC(O)CO", "c1ccncc1", "CC(C)O", "CCCCCC"]
CML = """<?xml version="1.0"?>
<molecule xmlns="http://www.xml-cml.org/schema" id="x">
  <identifier convention="iupac:inchi" value="{inchi}"/>
  <name convention="IUPAC">{name}</name>
</molecule>
"""


def vocab() -> dict[str, int]:
    words = ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TOKENS]
    return {w: i for i, w in enumerate(words)}


def test_regex_is_read_from_source_without_running_it():
    source = 'import os\nSMI_REGEX_PATTERN = r"(a|b)"\nos.remove("/nonexistent")\n'
    assert regex_from_source(source) == "(a|b)"
    with pytest.raises(AssetError):
        regex_from_source("X = 1\n")


@pytest.mark.parametrize("smiles", SMILES + ["C%12CC%12", "CC.O", "[Na+].[Cl-]"])
def test_smiles_tokenizer_equals_rxnmappers_procedure(smiles):
    v = vocab()
    tok = smiles_tokenizer(PATTERN, v)
    assert tok(smiles)["input_ids"] == reference_ids(smiles, PATTERN, v)
    assert "".join(re.findall(PATTERN, smiles)) == smiles  # the regex loses nothing on these


def test_smiles_tokenizer_round_trips_through_save(tmp_path):
    from transformers import AutoTokenizer

    smiles_tokenizer(PATTERN, vocab()).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    enc = loaded(SMILES[:3], padding=True, return_special_tokens_mask=True)
    assert enc["input_ids"][0][:1] == [vocab()["[CLS]"]] and loaded.pad_token == "[PAD]"
    assert [sum(m) for m in enc["special_tokens_mask"]] == [2 + enc["input_ids"][i].count(0) for i in range(3)]


def test_check_smiles_refuses_unparsable_and_empty():
    assert check_smiles("CCO") == "CCO"
    with pytest.raises(InputError, match=r"^molecule m7: unparsable SMILES 'C\(C'$"):
        check_smiles("C(C", "m7")
    with pytest.raises(InputError, match="unparsable SMILES 'C1CC'"):  # an unclosed ring
        check_smiles("C1CC")
    with pytest.raises(InputError, match="empty SMILES"):
        check_smiles("  ")


def test_captions_name_and_class():
    assert caption_of("2-Aminoethanol", "alcohols") == "2-aminoethanol, an alcohol"
    assert caption_of("(S)-2-Amino-3-phenylpropanoic acid", "amino_acids") == \
        "(S)-2-amino-3-phenylpropanoic acid, an amino acid"
    assert caption_of("DNA", "drugs") == "DNA, a drug"  # an abbreviation keeps its capitals
    assert caption_of("water", "water") == "water"


def test_cml_folder_becomes_pairs(tmp_path):
    (tmp_path / "alcohols").mkdir()
    (tmp_path / "amines").mkdir()
    (tmp_path / "htdocs").mkdir()  # not a class
    (tmp_path / "alcohols" / "ethanol.cml").write_text(CML.format(inchi="1/C2H6O/c1-2-3/h3H,2H2,1H3", name="Ethanol"))
    (tmp_path / "amines" / "bad.cml").write_text(CML.format(inchi="1/garbage", name="Nothing"))
    (tmp_path / "amines" / "noname.cml").write_text(CML.replace("<name", "<x").replace("</name>", "</x>")
                                                     .format(inchi="1/CH5N/c1-2/h2H2,1H3", name="x"))
    (tmp_path / "htdocs" / "page.cml").write_text("not xml")
    rows, skipped = molecule_rows(tmp_path)
    assert [(r["id"], r["smiles"], r["caption"]) for r in rows] == [("alcohols/ethanol", "CCO", "ethanol, an alcohol")]
    assert skipped == {"no_name_or_inchi": ["amines/noname.cml"], "inchi_unreadable": ["amines/bad.cml"]}
    (tmp_path / "amines" / "broken.cml").write_text("<molecule")
    with pytest.raises(InputError, match="unreadable CML"):
        read_cml(tmp_path / "amines" / "broken.cml")


def write_pairs(path: Path, smiles=SMILES, captions=None) -> Path:
    colours, things = ["red", "blue", "green"], ["cat", "dog", "car", "tree", "house", "flower", "apple", "wombat"]
    captions = captions or [f"a {colours[i % 3]} {things[i % 8]} ." for i in range(len(smiles))]  # tiny vocabulary
    path.write_text("".join(json.dumps({"id": f"m{i:02d}", "smiles": s, "caption": c}) + "\n"
                            for i, (s, c) in enumerate(zip(smiles, captions))))
    return path


def test_pairs_file_checks_every_molecule(tmp_path):
    ds = load_molecule_pairs(write_pairs(tmp_path / "ok.jsonl"))
    assert len(ds) == len(SMILES) and set(ds.column_names) >= {"id", "smiles", "caption"}
    with pytest.raises(InputError, match="m01: unparsable SMILES"):
        load_molecule_pairs(write_pairs(tmp_path / "bad.jsonl", ["CCO", "C(C"]))
    with pytest.raises(InputError, match="empty caption for m01"):
        load_molecule_pairs(write_pairs(tmp_path / "cap.jsonl", ["CCO", "CCN"], ["ethanol", " "]))


@pytest.fixture(scope="module")
def tiny_albert(tmp_path_factory) -> Path:
    """A tiny random ALBERT (2 layers, hidden 32) with the SMILES tokenizer: a SMILES encoder folder."""
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_albert")
    config = AlbertConfig(vocab_size=len(vocab()), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    AlbertModel(config, add_pooling_layer=False).save_pretrained(folder)
    smiles_tokenizer(PATTERN, vocab()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_molecule_extraction_pools_the_atom_tokens(tiny_albert, pooling):
    from pg_analysis.features import extract_vision
    from pg_analysis.models import load_encoder, pick_runtime
    from pg_analysis.registry import resolve_model

    adapter = load_encoder(resolve_model(str(tiny_albert), "molecule"), pick_runtime("cpu", "float32"), "molecule")
    feats = extract_vision(adapter, SMILES[:5], [str(i) for i in range(5)], pooling, batch_size=2, progress=False)
    assert feats.shape == (3, 5, 32)  # embeddings + 2 layers
    for i, s in enumerate(SMILES[:5]):  # one molecule alone (no padding): the same features
        enc = adapter.tokenizer(s, return_tensors="pt")
        with torch.no_grad():
            hs = adapter.model(**enc, output_hidden_states=True).hidden_states
        for layer, h in enumerate(hs):
            manual = h[0, 0] if pooling == "cls" else h[0, 1:-1].mean(0)
            torch.testing.assert_close(feats[layer, i], manual, atol=1e-5, rtol=1e-4)


def test_pg_align_molecule_end_to_end(tiny_albert, tiny_models, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "mol.jsonl")
    out = tmp_path / "align"
    code = cli.align(["--modality", "molecule", "--encoder", str(tiny_albert), "--llm", str(tiny_models["llama"]),
                      "--data", str(pairs), "--k", "3", "--null", "3", "--out", str(out), "--quiet",
                      "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    summary = json.loads((out / "alignment.json").read_text())
    assert summary["modality"] == "molecule" and summary["shape"] == [3, 4] and summary["n_samples"] == len(SMILES)
    assert summary["null"]["permutations"] == 3 and (out / "heatmap.png").is_file()
    assert "molecule encoder × LM layers" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("unparsable", "unparsable SMILES"),
    ("image-data", "--data tuxpaint holds image inputs, not molecule inputs"),
    ("image-encoder", "not a SMILES encoder"),
    ("molecule-encoder-for-images", "is a molecule model, not a vision model"),
])
def test_pg_align_molecule_bad_input_is_one_line(case, message, tiny_albert, tiny_models, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "mol.jsonl", SMILES[:6] + ["C(C"] + SMILES[6:])
    args = {"unparsable": ["--modality", "molecule", "--encoder", str(tiny_albert), "--data", str(pairs)],
            "image-data": ["--modality", "molecule", "--encoder", str(tiny_albert), "--data", "tuxpaint"],
            "image-encoder": ["--modality", "molecule", "--encoder", str(tiny_models["dinov2"]), "--data",
                              str(write_pairs(tmp_path / "ok.jsonl"))],
            "molecule-encoder-for-images": ["--encoder", "smiles-albert"]}[case]
    out = tmp_path / "align"
    code = cli.align([*args, "--llm", str(tiny_models["llama"]), "--k", "3", "--null", "0", "--out", str(out),
                      "--quiet", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
