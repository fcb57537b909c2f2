"""Shared fixtures: tiny randomly initialised HF models saved as local folders, and tiny image–caption data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pg_train.synthetic import tiny_llama_config, write_tiny_models


def vlm_batch(image_id: int, n_image_tokens: int, batch: int = 2, seed: int = 0):
    """``(input_ids, attention_mask, pixel_values)`` for a tiny VLM: ``batch`` left-padded prompts of different
    lengths, one 8 px image each, its placeholder expanded to ``n_image_tokens`` rows inside the text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        text = torch.randint(4, 20, (6 + b,), generator=g).tolist()
        rows.append([1] + text[:3] + [image_id] * n_image_tokens + text[3:])
    t = max(map(len, rows))
    ids = torch.full((batch, t), 3)
    mask = torch.zeros((batch, t), dtype=torch.long)
    for b, r in enumerate(rows):  # left padding
        ids[b, t - len(r):] = torch.tensor(r)
        mask[b, t - len(r):] = 1
    px = torch.randn(batch, 3, 8, 8, generator=g)
    return ids, mask, px


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders: tiny ``clip``, ``dinov2``, ``vit`` vision encoders (8 px images) and a tiny ``llama`` LM."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """A .jsonl of 24 small PNG images (some RGBA) with captions from the tiny vocabulary."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    colours, things = ["red", "blue", "green"], ["cat", "dog", "car", "tree", "house", "flower", "apple", "wombat"]
    for i in range(24):
        mode = "RGBA" if i % 3 == 0 else "RGB"
        arr = rng.integers(0, 256, size=(12, 10, len(mode)), dtype=np.uint8)
        Image.fromarray(arr, mode).save(root / f"img{i:02d}.png")
        rows.append({"image": f"img{i:02d}.png", "caption": f"a {colours[i % 3]} {things[i % 8]} ."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


#: (SMILES, name, class folder): 16 real molecules in 4 classes, for the molecule modality's tiny runs
TINY_MOLECULES = [
    ("CCO", "ethanol", "alcohols"), ("CCCO", "propan-1-ol", "alcohols"), ("CC(C)O", "propan-2-ol", "alcohols"),
    ("OCCO", "ethane-1,2-diol", "alcohols"), ("CC(=O)O", "acetic acid", "carboxylic_acids"),
    ("CCC(=O)O", "propanoic acid", "carboxylic_acids"), ("OC(=O)C(=O)O", "oxalic acid", "carboxylic_acids"),
    ("CCCC(=O)O", "butanoic acid", "carboxylic_acids"), ("c1ccccc1", "benzene", "aromatics"),
    ("Cc1ccccc1", "toluene", "aromatics"), ("Clc1ccccc1", "chlorobenzene", "aromatics"),
    ("c1ccc2ccccc2c1", "naphthalene", "aromatics"), ("CCN", "ethanamine", "amines"), ("CN", "methanamine", "amines"),
    ("CCCN", "propan-1-amine", "amines"), ("CNC", "N-methylmethanamine", "amines")]


@pytest.fixture(scope="session")
def tiny_molecule_pairs(tmp_path_factory) -> Path:
    """A .jsonl of :data:`TINY_MOLECULES` as molecule pairs (captions "name, class phrase")."""
    from pg_analysis.molecules import caption_of

    rows = [{"id": f"{c}/{n}", "smiles": s, "caption": caption_of(n, c), "name": n, "category": c}
            for s, n, c in TINY_MOLECULES]
    path = tmp_path_factory.mktemp("molecules") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_models, tmp_path_factory) -> Path:
    """A saved tiny grounded VLM (DINOv2 8 px, 2×2 pooling → 4 vision tokens; 3-layer LLaMA), L = 0."""
    from pg_train.vlm import build_vlm

    folder = tmp_path_factory.mktemp("tiny_vlm") / "model"
    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), insert_layer=0, vision_pool=2, seed=1)
    vlm.save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_llava(tiny_models, tmp_path_factory):
    """A tiny HF LlavaForConditionalGeneration (CLIP tower, Llama LM) saved with tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    vc = CLIPVisionConfig.from_pretrained(tiny_models["clip"])
    config = LlavaConfig(vision_config=vc, text_config=tiny_llama_config(vocab_size=len(tok)),
                         image_token_index=image_id, image_seq_length=16)
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    AutoImageProcessor.from_pretrained(tiny_models["clip"]).save_pretrained(folder)
    return folder, model
