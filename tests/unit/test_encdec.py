"""Encoder–decoder grounding: the vision rows bypass the T5 encoder (BLIP-2, InstructBLIP, plain projector)."""

from __future__ import annotations

import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                          InstructBlipForConditionalGeneration, T5Config)

from pg_analysis.errors import InputError
from pg_train.configuration_grounded_encdec import GroundedBlip2Config, GroundedInstructBlipConfig
from pg_train.grounding import GroundingError
from pg_train.modeling_grounded_encdec import (GroundedBlip2ForConditionalGeneration,
                                               GroundedInstructBlipForConditionalGeneration, bypass_memory)

V, IMG, Q = 48, 47, 4


def t5_config(**kw) -> T5Config:
    base = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return T5Config(**{**base, **kw})


def blip_kwargs(**text) -> dict:
    return dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=30, patch_size=10),
                qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, encoder_hidden_size=32, vocab_size=V),
                text_config=t5_config(**text).to_dict(), num_query_tokens=Q, image_token_index=IMG)


def make(cls, config_cls, seed: int = 0, **config):
    torch.manual_seed(seed)
    return cls(config_cls(**blip_kwargs(), **config)).eval()


def batch(padding: str = "right"):
    """Two prompts (9 and 7 rows, the Q placeholders first as HF's BLIP processor writes them), images, decoder
    inputs."""
    prompts = [[IMG] * Q + [5, 6, 7, 8, 1], [IMG] * Q + [9, 10, 1]]
    t = max(map(len, prompts))
    pad = [[0] * (t - len(p)) for p in prompts]
    rows = [p + f if padding == "right" else f + p for p, f in zip(prompts, pad)]
    ids = torch.tensor(rows)
    mask = torch.tensor([[1] * len(p) + [0] * len(f) if padding == "right" else [0] * len(f) + [1] * len(p)
                         for p, f in zip(prompts, pad)])
    torch.manual_seed(5)
    return ids, mask, torch.randn(2, 3, 30, 30), torch.tensor([[0, 11, 12, 13], [0, 14, 15, 1]])


def scaled(lm) -> bool:
    """Whether T5 scales the decoder output by d_model^-0.5 before its head (with tied embeddings)."""
    return bool(getattr(lm.config, "scale_decoder_outputs", lm.config.tie_word_embeddings))


def manual_logits(model, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, dec: torch.Tensor):
    """Per sample: the T5 encoder over the prompt's text tokens alone, the vision rows prepended to its output,
    the decoder stack and the head run by hand on that memory."""
    lm = model.language_model
    out = []
    for b in range(ids.shape[0]):
        text = ids[b][mask[b].bool() & (ids[b] != IMG)][None]
        memory = torch.cat([rows[b:b + 1], lm.get_encoder()(input_ids=text).last_hidden_state], 1)
        hidden = lm.decoder(input_ids=dec[b:b + 1], encoder_hidden_states=memory).last_hidden_state
        out.append(lm.lm_head(hidden * lm.config.d_model ** -0.5 if scaled(lm) else hidden))
    return torch.cat(out)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("tie", [False, True])
def test_blip2_bypass_equals_manual_computation(padding, tie):
    torch.manual_seed(0)
    model = GroundedBlip2ForConditionalGeneration(GroundedBlip2Config(**blip_kwargs(tie_word_embeddings=tie))).eval()
    ids, mask, px, dec = batch(padding)
    with torch.no_grad():
        out = model(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        rows = model.get_image_features(px, return_dict=True).pooler_output
        ref = manual_logits(model, rows, ids, mask, dec)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert out.qformer_outputs is not None and out.vision_outputs is not None


def test_instructblip_bypass_equals_manual_computation():
    model = make(GroundedInstructBlipForConditionalGeneration, GroundedInstructBlipConfig)
    ids, mask, px, dec = batch()
    qids = torch.tensor([[5, 6, 7], [9, 10, 0]])
    qmask = (qids != 0).long()
    with torch.no_grad():
        out = model(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids,
                    attention_mask=mask, decoder_input_ids=dec)
        rows = model.get_image_features(px, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                        return_dict=True).pooler_output
        ref = manual_logits(model, rows, ids, mask, dec)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(GroundingError, match="qformer_input_ids"):
        model(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)


@pytest.mark.parametrize("grounded, hf, extra", [
    (GroundedBlip2ForConditionalGeneration, (Blip2ForConditionalGeneration, Blip2Config), {}),
    (GroundedInstructBlipForConditionalGeneration, (InstructBlipForConditionalGeneration, InstructBlipConfig),
     {"qformer_input_ids": torch.tensor([[5, 6], [7, 8]])}),
])
def test_without_bypass_the_model_is_hfs(grounded, hf, extra):
    """``bypass_encoder=False``: HF's own BLIP-2 / InstructBLIP, logits and generated tokens alike."""
    config_cls = {GroundedBlip2ForConditionalGeneration: GroundedBlip2Config,
                  GroundedInstructBlipForConditionalGeneration: GroundedInstructBlipConfig}[grounded]
    model = make(grounded, config_cls, bypass_encoder=False)
    ref = hf[0](hf[1](**blip_kwargs())).eval()
    ref.load_state_dict(model.state_dict())
    ids, mask, px, dec = batch()
    with torch.no_grad():
        a = model(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **extra).logits
        b = ref(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, **extra).logits
    assert torch.equal(a, b)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **extra)
    assert torch.equal(model.generate(px, **kw), ref.generate(px, **kw))


def greedy_by_recompute(model, n: int, **inputs) -> torch.Tensor:
    """Greedy decoding by a full forward per token (no cache)."""
    batch_size = inputs["input_ids"].shape[0]
    dec = torch.full((batch_size, 1), model.config.text_config.decoder_start_token_id)
    for _ in range(n):
        with torch.no_grad():
            logits = model(decoder_input_ids=dec, **inputs).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    return dec


@pytest.mark.parametrize("padding", ["right", "left"])
def test_generate_with_cache_equals_recompute(padding):
    model = make(GroundedBlip2ForConditionalGeneration, GroundedBlip2Config, seed=2)
    ids, mask, px, _ = batch(padding)
    tokens = model.generate(px, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            eos_token_id=None)
    ref = greedy_by_recompute(model, 5, pixel_values=px, input_ids=ids, attention_mask=mask)
    assert torch.equal(tokens, ref)
    beams = model.generate(px, input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=3,
                           num_return_sequences=2, eos_token_id=None)
    assert beams.shape == (4, 4)


def test_vision_rows_bypass_the_encoder_only():
    """The prompt's encoding does not depend on the image, and the vision rows' place in the memory does not
    matter (T5's cross-attention has no position bias): placeholders first or last give the same logits."""
    model = make(GroundedBlip2ForConditionalGeneration, GroundedBlip2Config, seed=3)
    ids, mask, px, dec = batch()
    with torch.no_grad():
        a = model(pixel_values=px, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                  output_hidden_states=True)
        b = model(pixel_values=px.flip(0), input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        moved = torch.tensor([[5, 6, 7, 8, 1] + [IMG] * Q, [9, 10, 1] + [IMG] * Q + [0, 0]])
        c = model(pixel_values=px, input_ids=moved, attention_mask=mask, decoder_input_ids=dec)
    memory = a.language_model_outputs.encoder_last_hidden_state
    text = (ids != IMG) & mask.bool()
    other = b.language_model_outputs.encoder_last_hidden_state
    assert torch.equal(memory[text], other[text]) and not torch.allclose(memory[~text], other[~text])
    torch.testing.assert_close(a.logits, c.logits, rtol=1e-5, atol=1e-5)
    enc_states = a.language_model_outputs.encoder_hidden_states
    assert len(enc_states) == model.config.text_config.num_layers + 1
    vision = ids == IMG
    assert all(torch.equal(h[vision], memory[vision]) for h in enc_states)


def test_bypass_memory_checks_and_text_free_prompts():
    model = make(GroundedBlip2ForConditionalGeneration, GroundedBlip2Config)
    encoder = model.language_model.get_encoder()
    embeds = torch.randn(1, Q, 32)
    out = bypass_memory(encoder, embeds, torch.ones(1, Q, dtype=torch.bool))
    assert torch.equal(out.last_hidden_state, embeds)  # the image alone: the memory is its rows
    with pytest.raises(GroundingError, match="does not match"):
        bypass_memory(encoder, embeds, torch.ones(1, Q + 1, dtype=torch.bool))
    ids, mask, px, dec = batch()
    with pytest.raises(GroundingError, match="image tokens and image features"):
        model(pixel_values=px[:1], input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    # no prompt: the image alone (as HF's BLIP), whose memory is its query rows; greedy equals recompute
    tokens = model.generate(px, max_new_tokens=3, do_sample=False, eos_token_id=None)
    alone = torch.full((2, Q), IMG)
    assert torch.equal(tokens, greedy_by_recompute(model, 3, pixel_values=px, input_ids=alone,
                                                   attention_mask=torch.ones_like(alone)))


def test_bypass_needs_an_encoder_decoder_lm():
    kw = blip_kwargs()
    kw["text_config"] = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(GroundingError, match="decoder-only"):
        GroundedBlip2Config(**kw)
    assert not GroundedBlip2Config(**kw, bypass_encoder=False).bypass_encoder


# ----------------------------------------------------------------------------------------------------------------
# the plain projector (no Q-Former), built from pretrained parts, saved, loaded


def test_plain_projector_t5_builds_trains_saves_and_loads(tiny_models, tmp_path):
    from pg_train.modeling_grounded_encdec import GroundedVisionT5ForConditionalGeneration
    from pg_train.vlm import build_vlm, load_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["t5"]), vision_pool=2, seed=1)
    model = vlm.model
    assert isinstance(model, GroundedVisionT5ForConditionalGeneration) and vlm.is_encoder_decoder
    p = model.num_image_tokens
    img = vlm.image_token_id
    ids = torch.tensor([[5, 6] + [img] * p + [7, 2], [8] + [img] * p + [2, 3, 3]])
    mask = (ids != 3).long()
    torch.manual_seed(0)
    px = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([[9, 10, 2], [11, 2, -100]])
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        feats = model.encode_images(px)
        cached = model(input_ids=ids, vision_features=feats, attention_mask=mask, labels=labels)
        rows = model.project(feats)
        dec = model.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
        lm = model.language_model
        ref = []
        for b in range(2):
            text = ids[b][mask[b].bool() & (ids[b] != img)][None]
            memory = torch.cat([rows[b:b + 1], lm.get_encoder()(input_ids=text).last_hidden_state], 1)
            hidden = lm.decoder(input_ids=dec[b:b + 1], encoder_hidden_states=memory).last_hidden_state
            ref.append(lm.lm_head(hidden * lm.config.d_model ** -0.5 if scaled(lm) else hidden))
    torch.testing.assert_close(cached.logits, torch.cat(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.loss, out.loss)
    tokens = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=4, do_sample=False)
    vlm.save(tmp_path / "model")
    back = load_vlm(tmp_path / "model")
    assert back.is_encoder_decoder and back.model.config.bypass_encoder
    assert torch.equal(back.model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=4,
                                           do_sample=False), tokens)
    plain = load_vlm(tmp_path / "model", bypass_encoder=False).model
    with torch.no_grad():
        through = plain(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels)
        embeds = lm.get_input_embeddings()(ids).masked_scatter((ids == img)[..., None], rows)
        direct = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    torch.testing.assert_close(through.logits, direct.logits)
    with pytest.raises(InputError, match="encoder-decoder"):
        build_vlm(str(tiny_models["dinov2"]), str(tiny_models["t5"]), insert_layer=1)
    with pytest.raises(InputError, match="bypass_encoder"):
        load_vlm(tmp_path / "model", insert_layer=1)


def test_hub_blip_checkpoints_fail_offline_with_one_line(monkeypatch):
    from pg_analysis import models
    from pg_analysis.models import ModelUnavailable
    from pg_train.vlm import load_vlm

    monkeypatch.setattr(models, "_in_hf_cache", lambda *a: False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    for alias in ("blip2-flan-t5-xl", "instructblip-flan-t5-xl"):
        with pytest.raises(ModelUnavailable, match="hub is unreachable") as info:
            load_vlm(alias)
        assert "\n" not in str(info.value)


def test_saved_blip2_loads_and_generates_with_transformers_alone(tmp_path):
    from tests.standalone import generate_without_project

    model = make(GroundedBlip2ForConditionalGeneration, GroundedBlip2Config, seed=4)
    model.save_pretrained(tmp_path / "model")
    assert {"modeling_grounded_encdec.py", "configuration_grounded_encdec.py", "grounding.py"} <= \
        {p.name for p in (tmp_path / "model").iterdir()}
    ids, mask, px, _ = batch()
    kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    got = generate_without_project(tmp_path / "model", kw, tmp_path / "standalone")
    assert got["class"] == "GroundedBlip2ForConditionalGeneration" and got["config"]["bypass_encoder"] is True
    assert got["module"].startswith("transformers_modules.")
    assert torch.equal(got["tokens"], model.generate(**kw))


def test_blip2_trainer_hooks_equal_hfs_image_features_and_the_loss_counts_tokens():
    """``encode_images`` + ``project`` (what a trainer caches and trains) give HF's ``get_image_features``;
    cached features give the pixels' logits; ``num_items_in_batch`` divides the summed token loss."""
    model = make(GroundedBlip2ForConditionalGeneration, GroundedBlip2Config, seed=6)
    ids, mask, px, dec = batch()
    labels = dec.clone()
    labels[1, -1] = -100
    with torch.no_grad():
        hf_rows = model.get_image_features(px, return_dict=True).pooler_output
        feats = model.encode_images(px)
        torch.testing.assert_close(model.project(feats), hf_rows)
        a = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels)
        b = model(vision_features=feats, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=10)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(b.loss * 10, a.loss * 7)  # 7 supervised tokens
    assert model.num_image_tokens == Q


def test_instructblip_trainer_hooks_equal_hfs_image_features():
    model = make(GroundedInstructBlipForConditionalGeneration, GroundedInstructBlipConfig, seed=7)
    ids, mask, px, dec = batch()
    qids = torch.tensor([[5, 6, 7], [9, 10, 0]])
    qmask = (qids != 0).long()
    with torch.no_grad():
        hf_rows = model.get_image_features(px, qformer_input_ids=qids, qformer_attention_mask=qmask,
                                           return_dict=True).pooler_output
        feats = model.encode_images(px)
        torch.testing.assert_close(model.project(feats, qids, qmask), hf_rows)
        a = model(pixel_values=px, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids,
                  attention_mask=mask, decoder_input_ids=dec)
        b = model(vision_features=feats, qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids,
                  attention_mask=mask, decoder_input_ids=dec)
    torch.testing.assert_close(a.logits, b.logits)
    kw = dict(qformer_input_ids=qids, qformer_attention_mask=qmask, input_ids=ids, attention_mask=mask,
              max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(px, **kw), model.generate(vision_features=feats, **kw))
