"""The molecule modality's offline assets: converted by :mod:`pg_analysis.assets` (``pg-assets molecules
smiles-albert``).

===================  ==============================================  ==========================================
asset                source                                          cached as
===================  ==============================================  ==========================================
``molecules``        Debian ``chemical-structures-data`` (.deb)      ``molecules/pairs.jsonl`` (SMILES via RDKit)
``smiles-albert``    PyPI wheel ``rxnmapper==0.4.3`` (ALBERT)        ``smiles-albert-rxnmapper/`` (AlbertModel
                                                                     + a fast tokenizer)
===================  ==============================================  ==========================================

rxnmapper's own tokenizer is a ``BertTokenizer`` whose word splitting is a SMILES regex (``re.findall``) with a
vocabulary lookup; it needs transformers < 5. The conversion writes the same thing as a ``tokenizers`` fast tokenizer
(the regex read from the wheel's own source, not copied here), so ``AutoTokenizer`` loads it, and checks it against the
original procedure (regex, vocabulary, ``[CLS] … [SEP]``) on probe molecules. The encoder is rxnmapper's ALBERT
without its masked-LM head, saved as safetensors; the check records its hidden-state difference from the original
file and how often the original's head recovers a masked atom of the probe molecules (a pretrained model, not a
random one).
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import AssetError
from .fetch import debian_package, extract_folder, extract_member, pip_wheel, unpack_deb

# ----------------------------------------------------------------------------------------------------------------
# chemical-structures-data → molecule–caption pairs

MOLECULES_FILE = "pairs.jsonl"


def build_molecules(download_dir: Path, out_dir: Path) -> dict:
    from .molecules import molecule_rows

    deb = debian_package("chemical-structures-data", download_dir)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        root = unpack_deb(deb, Path(tmp), "usr/share/chemical-structures")
        rows, skipped = molecule_rows(root)
        copyright_file = Path(tmp) / "usr/share/doc/chemical-structures-data/copyright"
        if copyright_file.is_file():
            shutil.copy2(copyright_file, out_dir / "copyright")
    if not rows:
        raise AssetError(f"{deb.name}: no molecule with a name and a readable InChI")
    with open(out_dir / MOLECULES_FILE, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"source": deb.name, "license": "BSD-3-Clause (see copyright)", "molecules": len(rows),
            "classes": len({r["category"] for r in rows}),
            "skipped": {why: len(names) for why, names in skipped.items()},
            "skipped_files": [n for names in skipped.values() for n in names]}


# ----------------------------------------------------------------------------------------------------------------
# rxnmapper's ALBERT → AlbertForMaskedLM folder + fast tokenizer

RXNMAPPER = "rxnmapper==0.4.3"
RXNMAPPER_MODEL = "rxnmapper/models/transformers/albert_heads_8_uspto_all_1310k"
RXNMAPPER_REGEX_SOURCE = "rxnmapper/smiles_utils.py"
SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]"}
#: molecules the conversion is checked on (rings, charges, stereo, halogens, aromatic heteroatoms)
PROBE_SMILES = ("NCCO", "CC(=O)Oc1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "OC(C(F)(F)F)C(F)(F)F",
                "N[C@@H](Cc1ccc([N+](=O)[O-])cc1)C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "ClC(Cl)Cl", "c1ccc2ccccc2c1",
                "CCOC(=O)C=C", "O=C1C=CC(=O)O1", "CSc1ccccc1Br", "C#CCO")


def regex_from_source(source: str, name: str = "SMI_REGEX_PATTERN") -> str:
    """The string assigned to ``name`` at the top level of a Python source (read, never executed)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node.value.value
    raise AssetError(f"no string {name} in the rxnmapper source")


def read_vocab(path: Path) -> dict[str, int]:
    """One token per line, as BERT's ``vocab.txt`` (the line number is the id)."""
    return {line.rstrip("\n"): i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(True))}


def smiles_tokenizer(pattern: str, vocab: dict[str, int]):
    """A ``PreTrainedTokenizerFast``: the regex's matches, each one vocabulary entry, ``[CLS] … [SEP]``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    for t in SPECIALS.values():
        if t not in vocab:
            raise AssetError(f"the SMILES vocabulary has no {t}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **SPECIALS)


def reference_ids(smiles: str, pattern: str, vocab: dict[str, int]) -> list[int]:
    """rxnmapper's procedure: ``re.findall`` of the regex, vocabulary lookup (unknown → ``[UNK]``), ``[CLS] … [SEP]``."""
    unk = vocab[SPECIALS["unk_token"]]
    return [vocab["[CLS]"], *(vocab.get(t, unk) for t in re.findall(pattern, smiles)), vocab["[SEP]"]]


def masked_atom_recovery(model, tokenizer, smiles: tuple[str, ...]) -> float:
    """Share of atom tokens (letters, bracket atoms) that the masked-LM head predicts back when masked one at a time."""
    import torch

    hits = total = 0
    for s in smiles:
        enc = tokenizer(s, return_tensors="pt")
        ids = enc["input_ids"][0]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for i, t in enumerate(tokens):
            if t in SPECIALS.values() or not re.match(r"^(\[[^\]]+]|[A-Za-z]+)$", t):
                continue
            masked = ids.clone()
            masked[i] = tokenizer.mask_token_id
            with torch.no_grad():
                logits = model(input_ids=masked[None], attention_mask=enc["attention_mask"]).logits
            hits += int(logits[0, i].argmax() == ids[i])
            total += 1
    return hits / max(total, 1)


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def build_smiles_albert(download_dir: Path, out_dir: Path) -> dict:
    import torch
    from transformers import AlbertForMaskedLM, AlbertModel, AutoTokenizer

    wheel = pip_wheel(RXNMAPPER, "rxnmapper-0.4.3-*.whl", download_dir)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        original = Path(tmp) / "original"
        extract_folder(wheel, RXNMAPPER_MODEL, original)
        pattern = regex_from_source(extract_member(wheel, RXNMAPPER_REGEX_SOURCE, Path(tmp) / "s.py").read_text())
        vocab = read_vocab(original / "vocab.txt")
        with _transformers_errors_only():  # the original file holds a pooler the masked-LM class has no use for
            ref = AlbertForMaskedLM.from_pretrained(original, dtype=torch.float32).eval()
        tokenizer = smiles_tokenizer(pattern, vocab)
        tokenizer.save_pretrained(out_dir)
        ref.albert.save_pretrained(out_dir)  # the encoder alone (AlbertModel without a pooler), as pg-align uses it
        license_text = extract_member(wheel, "rxnmapper-0.4.3.dist-info/licenses/LICENSE", out_dir / "LICENSE")
    # the checks: the tokenizer against rxnmapper's procedure, the saved encoder against the original file
    loaded_tok = AutoTokenizer.from_pretrained(out_dir)
    for s in PROBE_SMILES:
        ours, theirs = loaded_tok(s)["input_ids"], reference_ids(s, pattern, vocab)
        if ours != theirs:
            raise AssetError(f"SMILES tokenizer differs from rxnmapper's on {s!r}: {ours} vs {theirs}")
    enc = loaded_tok(list(PROBE_SMILES), padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ref.albert(**enc).last_hidden_state
        b = AlbertModel.from_pretrained(out_dir, add_pooling_layer=False).eval()(**enc).last_hidden_state
    diff = float((a - b).abs().max())
    if diff > 1e-5:
        raise AssetError(f"converted SMILES encoder differs from rxnmapper's file by {diff:.2e}")
    recovery = masked_atom_recovery(ref, loaded_tok, PROBE_SMILES)
    return {"source": wheel.name, "license": "MIT (see LICENSE)", "license_file": license_text.name,
            "architecture": "AlbertModel", "layers": ref.config.num_hidden_layers,
            "params": sum(p.numel() for p in ref.parameters()), "vocab": len(vocab),
            "tokenizer_matches_rxnmapper": len(PROBE_SMILES), "max_abs_diff_vs_original": diff,
            "masked_atom_recovery": round(recovery, 3)}
