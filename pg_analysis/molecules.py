"""Molecule–caption pairs: the molecule modality's data.

A molecule is a SMILES string, checked by RDKit when read (:func:`check_smiles`). The offline source is Debian's
``chemical-structures-data`` (asset ``molecules``): CML files in class folders, each with an IUPAC name and an InChI.
:func:`read_cml` reads one file; :func:`molecule_rows` turns a folder of them into pairs with the caption
``"<name>, <class phrase>"`` (e.g. ``"2-aminoethanol, an alcohol"``) — name and class are kept as their own columns
too, for class multiple-choice and name ranking.

Pairs as a ``datasets.Dataset`` (the same shape as the image pairs of :mod:`pg_analysis.data`): ``id``, ``smiles``,
``caption``, ``name``, ``category``.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .errors import InputError

CML_NS = {"cml": "http://www.xml-cml.org/schema"}

#: class folder of chemical-structures-data → the phrase a caption names it with (folders without molecules, such
#: as ``htdocs`` or ``jmol``, are not classes)
CLASS_PHRASE: dict[str, str] = {
    "acid_anhydrides": "an acid anhydride", "alcohols": "an alcohol", "aldehydes": "an aldehyde",
    "alkanes": "an alkane", "alkenes": "an alkene", "alkynes": "an alkyne", "amides": "an amide",
    "amines": "an amine", "amino_acids": "an amino acid", "aromatics": "an aromatic compound",
    "carbamides": "a carbamide", "carbohydrates": "a carbohydrate", "carboxylic_acids": "a carboxylic acid",
    "drugs": "a drug", "esters": "an ester", "ethers": "an ether", "fatty_acids": "a fatty acid",
    "haloalkanes": "a haloalkane", "heteroaromatics": "a heteroaromatic compound", "ketones": "a ketone",
    "macrocycles": "a macrocycle", "natural_products": "a natural product", "nitriles": "a nitrile",
    "nitroalkanes": "a nitroalkane", "nucleobases": "a nucleobase", "peptides": "a peptide",
    "polycyclic_alkanes": "a polycyclic alkane", "polycyclic_aromatics": "a polycyclic aromatic compound",
    "sulfones": "a sulfone", "sulfoxides": "a sulfoxide", "thioethers": "a thioether", "thiols": "a thiol",
    "water": "water",
}


def _quiet_rdkit() -> Any:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # RDKit prints its parse errors to stderr; ours are one line each
    return Chem


def check_smiles(smiles: Any, ident: str = "") -> str:
    """``smiles`` if RDKit parses it; otherwise one :class:`InputError` line naming the molecule."""
    where = f"molecule {ident}: " if ident else ""
    if not isinstance(smiles, str) or not smiles.strip():
        raise InputError(f"{where}empty SMILES")
    if _quiet_rdkit().MolFromSmiles(smiles) is None:
        raise InputError(f"{where}unparsable SMILES {smiles!r}")
    return smiles


def canonical_smiles(smiles: str) -> str:
    """RDKit's canonical form (two spellings of one molecule give one string); ``smiles`` itself if unparsable."""
    mol = _quiet_rdkit().MolFromSmiles(smiles)
    return smiles if mol is None else _quiet_rdkit().MolToSmiles(mol)


def inchi_to_smiles(inchi: str) -> str | None:
    """Canonical SMILES of an InChI (the ``InChI=`` prefix added when a file leaves it out), or None when RDKit
    cannot read it."""
    Chem = _quiet_rdkit()
    mol = Chem.MolFromInchi(inchi if inchi.startswith("InChI=") else f"InChI={inchi}")
    return None if mol is None else Chem.MolToSmiles(mol)


def read_cml(path: Path) -> dict[str, str | None]:
    """``{"name", "inchi"}`` of one CML file (None where the file has none); unreadable XML is an InputError."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise InputError(f"molecule file {path}: unreadable CML ({e})") from None
    ident = root.find("cml:identifier[@convention='iupac:inchi']", CML_NS)
    name = root.find("cml:name", CML_NS)
    text = (name.text or "").strip() if name is not None else ""
    return {"name": text or None, "inchi": ident.get("value") if ident is not None else None}


def caption_of(name: str, category: str) -> str:
    """``"2-Aminoethanol"``, ``"alcohols"`` → ``"2-aminoethanol, an alcohol"``: the first capitalised word of the
    name lowered (``"(S)-2-Amino…"`` → ``"(S)-2-amino…"``; locants such as ``N,N-`` and abbreviations keep their
    capitals)."""
    name = re.sub(r"(?<![A-Za-z])[A-Z](?=[a-z])", lambda m: m.group(0).lower(), name, count=1)
    phrase = CLASS_PHRASE.get(category, category.replace("_", " "))
    return name if phrase == name else f"{name}, {phrase}"


def molecule_rows(root: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Every CML file under ``root/<class>/`` with a name and an InChI that RDKit reads → rows; and what was left
    out (counts and file names)."""
    rows, skipped = [], {"no_name_or_inchi": [], "inchi_unreadable": []}
    for path in sorted(Path(root).glob("*/*.cml")):
        category = path.parent.name
        if category not in CLASS_PHRASE:
            continue
        rec = read_cml(path)
        if not rec["name"] or not rec["inchi"]:
            skipped["no_name_or_inchi"].append(str(path.relative_to(root)))
            continue
        smiles = inchi_to_smiles(rec["inchi"])
        if smiles is None:
            skipped["inchi_unreadable"].append(str(path.relative_to(root)))
            continue
        rows.append({"id": f"{category}/{path.stem}", "smiles": smiles, "caption": caption_of(rec["name"], category),
                     "name": rec["name"], "category": category, "inchi": rec["inchi"]})
    return rows, skipped


def load_molecule_pairs(path: Path):
    """A ``.jsonl`` of molecule pairs (``smiles`` and ``caption``; ``id``, ``name``, ``category`` optional) →
    Dataset, every SMILES checked."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise InputError(f"molecule pairs file {path} does not exist")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"molecule pairs file {path}: unreadable ({e})") from None
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or "smiles" not in r or "caption" not in r:
            raise InputError(f"molecule pairs file {path}: row {i} lacks 'smiles' and 'caption'")
        pid = str(r.get("id", f"{i:06d}"))
        caption = r["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"molecule pairs file {path}: empty caption for {pid}")
        rows.append({"id": pid, "smiles": check_smiles(r["smiles"], pid), "caption": caption,
                     "name": str(r.get("name") or ""), "category": str(r.get("category") or "")})
    if not rows:
        raise InputError(f"molecule pairs file {path}: no molecule–caption pairs")
    return Dataset.from_list(sorted(rows, key=lambda r: r["id"]))
