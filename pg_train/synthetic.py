"""Synthetic models and data: tiny random HF models built from configs, and LLaVA-format data — to try a launch
configuration end to end, and for the tests and the benchmarks (whose cost must not grow with the data).

``write_llava_data(folder, n_records)`` writes ``images/`` (``n_images`` small random PNGs, and a hard link per
record so every record names its own file, as in the 665k mix) and ``stage1.jsonl`` (``<image>`` → caption) and
``stage2.jsonl`` (conversations: single- and multi-turn, a fraction text-only, like the mix's ShareGPT part).

    python -m pg_train.synthetic runs/synthetic --records 10000
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

WORDS = ["a", "an", "the", "red", "blue", "green", "cat", "dog", "car", "tree", "house", "big", "small", "of", "and",
         "photo", "kangaroo", "wombat", "flower", "apple", ".", "A", "B", "C", "D", "What", "is", "this", "?"]


def make_tokenizer(folder: Path, add_bos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if add_bos:  # like LLaMA's tokenizer; without, like SmolLM2's (BOS defined, never added)
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(folder)
    return tok


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def write_tiny_models(root: str | Path) -> dict[str, Path]:
    """Tiny randomly initialised models saved as HF folders under ``root``: ``clip``, ``dinov2``, ``vit`` vision
    encoders (8 px images, 2 px patches), a 3-layer ``llama`` LM and a 2 + 2-layer ``t5`` encoder–decoder LM, each
    with a word-level tokenizer over :data:`WORDS`, and a ``smiles`` encoder (:func:`write_tiny_smiles_encoder`).
    Seeded: the same weights every time."""
    import torch
    from transformers import (BitImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel)

    torch.manual_seed(0)
    root = Path(root)
    proc = BitImageProcessorPil(do_resize=True, size={"height": 8, "width": 8}, do_center_crop=False,
                                do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=8,
                  patch_size=2)
    out = {}
    for name, model in {
        "clip": CLIPVisionModel(CLIPVisionConfig(**common)),
        "dinov2": Dinov2Model(Dinov2Config(**{k: v for k, v in common.items() if k != "intermediate_size"})),
        "vit": ViTModel(ViTConfig(**common), add_pooling_layer=False),
    }.items():
        folder = root / name
        model.save_pretrained(folder)
        proc.save_pretrained(folder)
        out[name] = folder
    folder = root / "llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    make_tokenizer(folder)
    out["llama"] = folder
    out["smiles"] = write_tiny_smiles_encoder(root / "smiles")
    folder = root / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(WORDS) + 4, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_decoder_layers=2, num_heads=4, pad_token_id=3, eos_token_id=2,
                                        decoder_start_token_id=3)).save_pretrained(folder)
    make_tokenizer(folder, add_bos=False)
    out["t5"] = folder
    return out


#: the tiny SMILES tokenizer's tokens: two-letter halogens, bracket atoms' parts, bonds, rings, branches
SMILES_TOKENS = ["Cl", "Br", *"BCNOPSFIbcnops", *"()[]=#+-@/\\.%", *"0123456789", "H"]


def write_tiny_smiles_encoder(folder: str | Path):
    """A tiny random ALBERT over SMILES (2 layers, width 32) with a fast tokenizer splitting atoms, bonds and ring
    digits (``[CLS] … [SEP]``, ``[PAD]`` = 0, as rxnmapper's), saved as an HF folder. Seeded."""
    import re

    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import AlbertConfig, AlbertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + SMILES_TOKENS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    pattern = "|".join(sorted(map(re.escape, SMILES_TOKENS), key=len, reverse=True))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    AlbertModel(AlbertConfig(vocab_size=len(vocab), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                             pad_token_id=0), add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_blip(folder: str | Path, t5_folder: str | Path, instruct: bool = False) -> Path:
    """A tiny random HF BLIP-2 (``instruct``: InstructBLIP) checkpoint with the T5 of ``t5_folder`` (random too) as
    its LM, saved as HF's own classes save it: weights, the T5's tokenizer with ``<image>``, an 8 px image
    processor and (InstructBLIP) ``qformer_tokenizer/``. Seeded."""
    import torch
    from transformers import (AutoTokenizer, BitImageProcessorPil, Blip2Config, Blip2ForConditionalGeneration,
                              InstructBlipConfig, InstructBlipForConditionalGeneration, T5Config)

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(t5_folder)
    tok.add_tokens(["<image>"], special_tokens=True)
    text = T5Config.from_pretrained(t5_folder).to_dict()
    text["vocab_size"] = len(tok)
    q_vocab = len(make_tokenizer(folder / "qformer_tokenizer")) if instruct else len(tok)
    config_cls, model_cls = ((InstructBlipConfig, InstructBlipForConditionalGeneration) if instruct
                             else (Blip2Config, Blip2ForConditionalGeneration))
    torch.manual_seed(0)
    model = model_cls(config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=8, patch_size=2),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=q_vocab),
        text_config=text, num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>")))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    BitImageProcessorPil(do_resize=True, size={"height": 8, "width": 8}, do_center_crop=False).save_pretrained(folder)
    return folder


def write_llava_data(folder: str | Path, n_records: int, n_images: int = 64, text_only_frac: float = 0.1,
                     multi_turn_frac: float = 0.2, image_size: int = 12, seed: int = 0) -> dict[str, str]:
    """Write the data; returns the paths of ``stage1``, ``stage2`` and the ``image_root``."""
    from PIL import Image

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(
            images / f"base{i:04d}.png")

    def caption() -> str:
        return " ".join(rng.choice(WORDS[:20], size=int(rng.integers(3, 9)))) + " ."

    with open(folder / "stage1.jsonl", "w") as s1, open(folder / "stage2.jsonl", "w") as s2:
        for r in range(n_records):
            name = f"img{r:07d}.png"
            link = images / name
            if not link.exists():
                os.link(images / f"base{r % n_images:04d}.png", link)
            s1.write(json.dumps({"id": f"c{r}", "image": f"images/{name}", "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption()}]}) + "\n")
            if rng.random() < text_only_frac:
                rec = {"id": f"t{r}", "conversations": [{"from": "human", "value": "What is this ?"},
                                                        {"from": "gpt", "value": caption()}]}
            else:
                conv = [{"from": "human", "value": "<image>\nWhat is this ?"}, {"from": "gpt", "value": caption()}]
                if rng.random() < multi_turn_frac:
                    conv += [{"from": "human", "value": "What is the big tree ?"}, {"from": "gpt", "value": caption()}]
                rec = {"id": f"i{r}", "image": f"images/{name}", "conversations": conv}
            s2.write(json.dumps(rec) + "\n")
    return {"stage1": str(folder / "stage1.jsonl"), "stage2": str(folder / "stage2.jsonl"), "image_root": str(folder)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic LLaVA-format data (JSONL and images).")
    p.add_argument("folder")
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--images", type=int, default=64)
    a = p.parse_args(argv)
    print(json.dumps(write_llava_data(a.folder, a.records, a.images)))


if __name__ == "__main__":
    main()
