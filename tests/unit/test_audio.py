"""The audio modality on tiny inputs: decoding and resampling, Tux Paint's sound layout, the CTranslate2 reader and
the Whisper name mapping (a tiny random Whisper through a written model.bin and back), and pg-align --modality audio
end to end with a tiny random Whisper encoder."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pg_analysis import cli
from pg_analysis.audio import load_audio, load_sound_pairs, sound_rows
from pg_analysis.audio_assets import read_ctranslate2, whisper_state_dict
from pg_analysis.errors import AssetError, InputError


def tone(path: Path, freq: float, seconds: float = 0.5, rate: int = 22050) -> Path:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


def test_audio_is_decoded_mixed_and_resampled(tmp_path):
    wave = load_audio(tone(tmp_path / "a.ogg", 440.0), 16000)
    assert wave.dtype == np.float32 and abs(len(wave) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 5  # the tone survives resampling
    (tmp_path / "bad.ogg").write_bytes(b"OggS not really")
    with pytest.raises(InputError, match="audio s1: does not decode"):
        load_audio(tmp_path / "bad.ogg", 16000, "s1")


def test_tuxpaint_sound_layout(tmp_path):
    (tmp_path / "animals").mkdir()
    (tmp_path / "symbols").mkdir()
    for name in ("sheep.ogg", "sheep_desc.ogg", "sheep_desc_fr.ogg", "mute.ogg"):
        tone(tmp_path / "animals" / name, 300.0, 0.1)
    (tmp_path / "animals" / "sheep.txt").write_text("A sheep.\nfr.utf8=Un mouton.\n")
    tone(tmp_path / "symbols" / "plus.ogg", 300.0, 0.1)
    (tmp_path / "symbols" / "plus.txt").write_text("Plus.\n")
    rows = sound_rows(tmp_path)
    assert [(r["id"], r["kind"], r["caption"]) for r in rows] == [
        ("animals/sheep", "effect", "A sheep."), ("animals/sheep_desc", "description", "A sheep.")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(load_sound_pairs(tmp_path / "pairs.jsonl")["id"]) == ["animals/sheep"]
    assert len(load_sound_pairs(tmp_path / "pairs.jsonl", kind=None)) == 2


# ---------------------------------------------------------------------------------------------------------------
# CTranslate2 → transformers


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """A CTranslate2 model.bin (binary version 6) — the layout the reader expects, written independently."""
    types = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, a in variables.items():
        a = np.require(a, requirements="C")  # (ascontiguousarray would make a scalar 1-D)
        out += string(name) + struct.pack("<B", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
        out += struct.pack("<B", types[a.dtype]) + struct.pack("<I", a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, name in aliases.items():
        out += string(alias) + string(name)
    path.write_bytes(out)


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=32, decoder_start_token_id=1,
                           pad_token_id=0, eos_token_id=0, bos_token_id=0)
    return WhisperForConditionalGeneration(config).eval()


def ct2_variables(model) -> dict[str, np.ndarray]:
    """CTranslate2's names for a transformers Whisper: fused q/k/v (zero key bias), fused cross k/v, fp16."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    v: dict[str, np.ndarray] = {}
    for side, n in (("encoder", model.config.encoder_layers), ("decoder", model.config.decoder_layers)):
        m = f"model.{side}"
        v[f"{side}/position_encodings/encodings"] = sd[f"{m}.embed_positions.weight"]
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = sd[f"{m}.layer_norm.weight"], \
            sd[f"{m}.layer_norm.bias"]
        v[f"{side}/num_heads"] = np.array(2, dtype=np.int16)
        for i in range(n):
            p, q = f"{side}/layer_{i}", f"{m}.layers.{i}"
            zero = np.zeros_like(sd[f"{q}.self_attn.q_proj.bias"])
            v[f"{p}/self_attention/linear_0/weight"] = np.concatenate(
                [sd[f"{q}.self_attn.{x}_proj.weight"] for x in "qkv"])
            v[f"{p}/self_attention/linear_0/bias"] = np.concatenate(
                [sd[f"{q}.self_attn.q_proj.bias"], zero, sd[f"{q}.self_attn.v_proj.bias"]])
            v[f"{p}/self_attention/linear_1/weight"] = sd[f"{q}.self_attn.out_proj.weight"]
            v[f"{p}/self_attention/linear_1/bias"] = sd[f"{q}.self_attn.out_proj.bias"]
            v[f"{p}/self_attention/layer_norm/gamma"] = sd[f"{q}.self_attn_layer_norm.weight"]
            v[f"{p}/self_attention/layer_norm/beta"] = sd[f"{q}.self_attn_layer_norm.bias"]
            v[f"{p}/ffn/layer_norm/gamma"], v[f"{p}/ffn/layer_norm/beta"] = sd[f"{q}.final_layer_norm.weight"], \
                sd[f"{q}.final_layer_norm.bias"]
            for j, fc in enumerate(("fc1", "fc2")):
                v[f"{p}/ffn/linear_{j}/weight"], v[f"{p}/ffn/linear_{j}/bias"] = sd[f"{q}.{fc}.weight"], \
                    sd[f"{q}.{fc}.bias"]
            if side == "decoder":
                a = f"{q}.encoder_attn"
                v[f"{p}/attention/layer_norm/gamma"] = sd[f"{q}.encoder_attn_layer_norm.weight"]
                v[f"{p}/attention/layer_norm/beta"] = sd[f"{q}.encoder_attn_layer_norm.bias"]
                v[f"{p}/attention/linear_0/weight"], v[f"{p}/attention/linear_0/bias"] = sd[f"{a}.q_proj.weight"], \
                    sd[f"{a}.q_proj.bias"]
                v[f"{p}/attention/linear_1/weight"] = np.concatenate([sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]])
                v[f"{p}/attention/linear_1/bias"] = np.concatenate([zero, sd[f"{a}.v_proj.bias"]])
                v[f"{p}/attention/linear_2/weight"], v[f"{p}/attention/linear_2/bias"] = sd[f"{a}.out_proj.weight"], \
                    sd[f"{a}.out_proj.bias"]
    for k in ("weight", "bias"):
        v[f"encoder/conv1/{k}"], v[f"encoder/conv2/{k}"] = sd[f"model.encoder.conv1.{k}"], sd[f"model.encoder.conv2.{k}"]
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return v


def test_ctranslate2_file_round_trips_onto_transformers_whisper(tmp_path):
    from transformers import WhisperForConditionalGeneration

    model = tiny_whisper()
    variables = ct2_variables(model)
    write_ct2(tmp_path / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    spec, read, aliases = read_ctranslate2(tmp_path / "model.bin")
    assert spec == "WhisperSpec" and aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert set(read) == set(variables) and all(np.array_equal(read[k], variables[k]) for k in variables)
    converted = WhisperForConditionalGeneration(model.config).eval()
    tensors = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in whisper_state_dict(read).items()}
    missing, unexpected = converted.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"proj_out.weight"} and not unexpected
    converted.tie_weights()
    reference = WhisperForConditionalGeneration(model.config).eval()  # the original, rounded to fp16 like the file
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    x = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, decoder_input_ids=ids).logits,
                                   reference(x, decoder_input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_nonzero_key_bias_and_truncation_are_refused(tmp_path):
    variables = ct2_variables(tiny_whisper())
    variables["encoder/layer_0/self_attention/linear_0/bias"] = variables[
        "encoder/layer_0/self_attention/linear_0/bias"].copy()
    variables["encoder/layer_0/self_attention/linear_0/bias"][20] = 1.0  # inside the key part (16…31)
    with pytest.raises(AssetError, match="k_proj has a non-zero bias"):
        whisper_state_dict(variables)
    write_ct2(tmp_path / "m.bin", {"a": np.ones(4, np.float16)}, {})
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-7])
    with pytest.raises(AssetError, match="truncated"):
        read_ctranslate2(tmp_path / "cut.bin")


# ---------------------------------------------------------------------------------------------------------------
# pg-align --modality audio


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    from transformers import WhisperFeatureExtractor

    folder = tmp_path_factory.mktemp("tiny_whisper")
    tiny_whisper().save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def sounds(tmp_path: Path, n: int = 12) -> Path:
    colours, things = ["red", "blue", "green"], ["cat", "dog", "car", "tree", "house", "flower", "apple", "wombat"]
    rows = []
    for i in range(n):
        tone(tmp_path / f"s{i}.ogg", 200.0 + 150 * i, 0.2 + 0.05 * i)
        rows.append({"audio": f"s{i}.ogg", "caption": f"a {colours[i % 3]} {things[i % 8]} ."})
    (tmp_path / "sounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "sounds.jsonl"


def test_audio_encoder_pools_the_frames_that_hold_the_sound(tiny_whisper_dir, tmp_path):
    from pg_analysis.features import extract_vision
    from pg_analysis.models import load_encoder, pick_runtime
    from pg_analysis.registry import resolve_model

    pairs = sounds(tmp_path, 3)
    adapter = load_encoder(resolve_model(str(tiny_whisper_dir), "audio"), pick_runtime("cpu", "float32"), "audio")
    ds = load_sound_pairs(pairs, kind=None)
    feats = extract_vision(adapter, list(ds["audio"]), list(ds["id"]), "mean", batch_size=2, progress=False)
    assert feats.shape == (3, 3, 16)  # conv output + 2 layers
    wave = load_audio(ds["audio"][1], 16000)
    fe = adapter.feature_extractor(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hs = adapter.model(fe["input_features"], output_hidden_states=True).hidden_states
    frames = int(np.ceil(len(wave) / 160 / 2))  # 10 ms mel hop, halved by the stride-2 convolution
    torch.testing.assert_close(feats[2, 1], hs[2][0, :frames].mean(0), atol=1e-4, rtol=1e-3)


def test_pg_align_audio_end_to_end_and_bad_input(tiny_whisper_dir, tiny_models, tmp_path, capsys):
    pairs = sounds(tmp_path)
    common = ["--modality", "audio", "--encoder", str(tiny_whisper_dir), "--llm", str(tiny_models["llama"]),
              "--k", "3", "--quiet", "--cache-dir", str(tmp_path / "c")]
    assert cli.align([*common, "--data", str(pairs), "--null", "2", "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "alignment.json").read_text())
    assert summary["modality"] == "audio" and summary["shape"] == [3, 4] and summary["n_samples"] == 12
    (tmp_path / "s3.ogg").write_bytes(b"not audio at all")
    capsys.readouterr()
    assert cli.align([*common, "--data", str(pairs), "--null", "0", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "does not decode" in err and len(err.splitlines()) == 1 and not (tmp_path / "b").exists()
    assert cli.align([*common, "--data", "molecules", "--null", "0", "--out", str(tmp_path / "b")]) == 2
    assert "holds molecule inputs, not audio inputs" in capsys.readouterr().err
