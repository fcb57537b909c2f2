"""The grounded VLM honours transformers' model contract at every L and in both grounding modes (tiny models).

What HF's own LLaVA tests check — hidden states, attentions, tuple outputs, ``inputs_embeds`` with images,
``get_image_features``, ``generate`` with and without the cache under every decoding strategy — plus what the
grounding adds: vision rows wait unchanged below L, text never attends to them there, and both modes agree.
"""

import pytest
import torch
from transformers import Dinov2Config
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pg_train.configuration_grounded_llava import GroundedLlavaConfig
from pg_train.grounding import CACHE_FIELD, GroundedCache, GroundingError
from pg_train.modeling_grounded_llava import GroundedLlavaForConditionalGeneration
from pg_train.synthetic import WORDS, tiny_llama_config
from tests.conftest import vlm_batch
from tests.standalone import generate_without_project

N = 4  # LM layers
LAYERS = [0, 1, N // 2, N]
MODES = ["splice", "mask"]
IMAGE_ID = len(WORDS) + 4
N_IMAGE = 4  # 8 px / patch 2 → 4×4 grid, pooled 2×2


def make_model(insert_layer: int = 0, mode: str = "splice", seed: int = 0) -> GroundedLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vc = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=2)
    config = GroundedLlavaConfig(vision_config=vc, text_config=tiny_llama_config(num_hidden_layers=N,
                                                                                 vocab_size=IMAGE_ID + 1),
                                 image_token_index=IMAGE_ID, vision_pool=2, insert_layer=insert_layer,
                                 grounding_mode=mode)
    model = GroundedLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a projector that is not the identity on scale and mean
        model.model.multi_modal_projector.gain.fill_(1.7)
        model.model.multi_modal_projector.offset.normal_(0, 0.5)
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def models():
    return {(layer, mode): make_model(layer, mode) for layer in LAYERS for mode in MODES}


@pytest.fixture(scope="module")
def batch():
    return vlm_batch(IMAGE_ID, N_IMAGE, batch=3, seed=5)


def _run(model, batch, **kw):
    ids, mask, px = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=px, output_hidden_states=True,
                     output_attentions=True, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", LAYERS)
def test_hidden_states_and_attentions_follow_the_grounding(models, batch, layer, mode):
    ids, mask, _ = batch
    model = models[layer, mode]
    out = _run(model, batch)
    b, t = ids.shape
    vision, pad = ids == IMAGE_ID, ~mask.bool()
    assert len(out.hidden_states) == N + 1 and all(h.shape == (b, t, 32) for h in out.hidden_states)
    assert len(out.attentions) == N and all(a.shape == (b, 4, t, t) for a in out.attentions)
    rows = out.image_hidden_states.reshape(-1, 32)  # projected rows, in order of appearance
    for i in range(min(layer, N - 1) + 1):  # below L the vision rows wait with the values they enter with
        torch.testing.assert_close(out.hidden_states[i][vision], rows, atol=0, rtol=0)
    if layer < N:  # and from L on they are computed
        assert (out.hidden_states[layer + 1][vision] - rows).abs().max() > 1e-3
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=0)  # after the norm
    for i, att in enumerate(out.attentions):
        assert att[pad[:, None, :, None].expand_as(att)].abs().max() == 0  # padding queries attend nowhere
        live = (mask.bool() & ~vision) if i < layer else mask.bool()
        torch.testing.assert_close(att.sum(-1)[live[:, None].expand(-1, 4, -1)], torch.ones(int(live.sum()) * 4))
        if i < layer:  # text cannot see vision rows below L, and vision rows are not computed there
            assert att[vision[:, None, None, :].expand_as(att)].abs().max() == 0
            assert att[vision[:, None, :, None].expand_as(att)].abs().max() == 0
        elif vision.any():
            text_to_vision = (mask.bool() & ~vision)[:, None, :, None] & vision[:, None, None, :]
            assert att[text_to_vision.expand_as(att)].sum() > 0


@pytest.mark.parametrize("layer", LAYERS)
def test_splice_and_mask_return_the_same_states_and_maps(models, batch, layer):
    splice, masked = _run(models[layer, "splice"], batch), _run(models[layer, "mask"], batch)
    live = batch[1].bool()
    torch.testing.assert_close(splice.logits[live], masked.logits[live], atol=1e-5, rtol=0)
    for a, b in zip(splice.hidden_states, masked.hidden_states):
        torch.testing.assert_close(a[live], b[live], atol=1e-5, rtol=0)
    for a, b in zip(splice.attentions, masked.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_insert_layer_zero_states_and_maps_equal_hf_llava(tiny_hf_llava):
    from pg_train.vlm import load_vlm

    folder, hf = tiny_hf_llava
    ours = load_vlm(folder).model
    for m in (ours, hf):
        m.set_attn_implementation("eager")
    ids, mask, px = vlm_batch(ours.config.image_token_index, 16)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, pixel_values=px, output_hidden_states=True,
                 output_attentions=True)
        b = hf(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
               output_hidden_states=True, output_attentions=True)
    live = mask.bool()
    assert len(a.hidden_states) == len(b.hidden_states) and len(a.attentions) == len(b.attentions)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x[live], y[live], atol=1e-5, rtol=0)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x.transpose(1, 2)[live], y.transpose(1, 2)[live], atol=1e-6, rtol=0)
    hf_rows = (torch.cat(b.image_outputs.pooler_output) if hasattr(b, "image_outputs")  # transformers >= 5.24
               else b.image_hidden_states)
    torch.testing.assert_close(a.image_hidden_states.reshape(-1, 32), hf_rows.reshape(-1, 32), atol=1e-6, rtol=0)


def test_image_features_like_hf_llava(tiny_hf_llava):
    from pg_train.vlm import load_vlm

    folder, hf = tiny_hf_llava
    ours = load_vlm(folder).model
    px = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a, b = ours.get_image_features(px), hf.get_image_features(px)
        as_tuple = ours.get_image_features(px, return_dict=False)
    assert isinstance(a, BaseModelOutputWithPooling) and isinstance(as_tuple, tuple)
    assert len(a.pooler_output) == 3 and a.pooler_output[0].shape == (16, 32)
    for x, y in zip(a.pooler_output, b.pooler_output):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
    torch.testing.assert_close(as_tuple[0], a.last_hidden_state)
    with pytest.raises(GroundingError, match="feature layer"):
        ours.get_image_features(px, vision_feature_layer=[-2, -1])


@pytest.mark.parametrize("layer", [0, N // 2])
def test_tuple_outputs_and_inputs_embeds_with_pixel_values(models, batch, layer):
    model = models[layer, "splice"]
    ids, mask, px = batch
    labels = ids.masked_fill(ids == IMAGE_ID, -100)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
        as_tuple = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, return_dict=False)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, pixel_values=px)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], ref.loss, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(from_embeds.logits, ref.logits, atol=1e-6, rtol=0)


def test_cache_under_either_name_and_returned_under_todays(models, batch):
    model = models[N // 2, "splice"]
    ids, mask, px = batch
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
        cache = getattr(prefill, CACHE_FIELD)
        assert isinstance(cache, GroundedCache)
        nxt = prefill.logits[:, -1:].argmax(-1)
        full_mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        step_new = model(input_ids=nxt, attention_mask=full_mask, cache=cache, use_cache=True).logits
        recompute = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=full_mask, pixel_values=px).logits
    torch.testing.assert_close(step_new[:, -1], recompute[:, -1], atol=1e-5, rtol=0)
    with torch.no_grad():
        again = getattr(model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True), CACHE_FIELD)
        step_old = model(input_ids=nxt, attention_mask=full_mask, past_key_values=again, use_cache=True).logits
    torch.testing.assert_close(step_old, step_new, atol=0, rtol=0)
    with pytest.raises(GroundingError, match="not both"):
        model(input_ids=nxt, cache=again, past_key_values=again)
    with pytest.raises(GroundingError, match="position_ids"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=mask.cumsum(1))


DECODING = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3),
    "sample": dict(do_sample=True, top_k=0, temperature=1.3),
    "scores": dict(do_sample=False, return_dict_in_generate=True, output_scores=True),
}


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", LAYERS)
def test_generate_with_cache_equals_without(models, batch, layer, mode, decoding):
    model = models[layer, mode]
    ids, mask, px = batch
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, pad_token_id=3,
              eos_token_id=None, suppress_tokens=[IMAGE_ID], **DECODING[decoding])
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(11)
        with torch.no_grad():
            out[use_cache] = model.generate(**kw, use_cache=use_cache)
    if decoding == "scores":
        assert torch.equal(out[True].sequences, out[False].sequences)
        assert len(out[True].scores) == 6
        for a, b in zip(out[True].scores, out[False].scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        return
    assert out[True].shape == (ids.shape[0], ids.shape[1] + 6)
    assert torch.equal(out[True], out[False])
    assert not (out[True][:, ids.shape[1]:] == IMAGE_ID).any()


def test_cache_follows_beam_reordering_and_batch_expansion():
    torch.manual_seed(0)
    cache = GroundedCache(1, "splice")
    cache.key_masks = {"low": torch.tensor([[1, 0], [1, 1]]), "high": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    cache.low_index = torch.tensor([[0, 2], [0, 1]])
    cache.next_position = torch.tensor([2, 3])
    cache.batch_repeat_interleave(2)
    assert cache.next_position.tolist() == [2, 2, 3, 3] and cache.low_index.shape == (4, 2)
    cache.reorder_cache(torch.tensor([3, 0, 0, 1]))
    assert cache.next_position.tolist() == [3, 2, 2, 2]
    assert cache.key_masks["high"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]]
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.next_position.tolist() == [3, 2] and cache.low_index.tolist() == [[0, 1], [0, 2]]
    with pytest.raises(GroundingError, match="cropped"):
        cache.crop(1)


def test_output_attentions_needs_eager(batch):
    model = make_model(N // 2)
    model.set_attn_implementation("sdpa")
    ids, mask, px = batch
    with pytest.raises(GroundingError, match="eager"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints that travel, adapters


def test_saved_checkpoint_loads_and_generates_with_transformers_alone(tiny_models, tmp_path):
    import json

    from pg_train.vlm import build_vlm

    vlm = build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), insert_layer=2, vision_pool=2, seed=3)
    with torch.no_grad():
        vlm.model.model.multi_modal_projector.gain.fill_(2.0)
    vlm.save(tmp_path / "model")
    saved = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"modeling_grounded_llava.py", "configuration_grounded_llava.py", "grounding.py"} <= saved
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_grounded_llava.GroundedLlavaForConditionalGeneration"
    ids, mask, px = vlm_batch(vlm.image_token_id, vlm.model.num_image_tokens, seed=2)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, do_sample=False,
              pad_token_id=3, eos_token_id=None)
    out = generate_without_project(tmp_path / "model", kw, tmp_path / "standalone", with_processors=True)
    assert out["module"].startswith("transformers_modules.")  # the checkpoint's own code, not this project's
    assert out["config"]["insert_layer"] == 2 and out["image_id"] == vlm.image_token_id
    with torch.no_grad():
        here = vlm.model.generate(**kw)
    assert torch.equal(out["tokens"], here)


@pytest.fixture()
def lora_setup(models, batch, tmp_path):
    from peft import LoraConfig

    model = make_model(N // 2, seed=4)
    model.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    return model, config, batch, tmp_path


def _perturb_lora(model) -> int:
    n = 0
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at 0 (an identity adapter); make it do something
            n += 1
    return n


def test_lora_on_the_vlm_through_peft_saves_reloads_and_merges(lora_setup):
    from peft import PeftModel, get_peft_model

    model, config, (ids, mask, px), tmp = lora_setup
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    peft_model = get_peft_model(model, config)
    assert _perturb_lora(peft_model) == 2 * (N - 0)  # q and v in every LM layer, none in the vision tower
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert (adapted - plain).abs().max() > 1e-3
    peft_model.save_pretrained(tmp / "adapter")
    base = GroundedLlavaForConditionalGeneration.from_pretrained(tmp / "base").eval()
    reloaded = PeftModel.from_pretrained(base, tmp / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        merged = reloaded.merge_and_unload()
        assert type(merged) is GroundedLlavaForConditionalGeneration
        fused = merged(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    torch.testing.assert_close(again, adapted, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused, adapted, atol=1e-5, rtol=0)


def test_lora_on_the_language_model_alone(lora_setup):
    from peft import LoraConfig, PeftModel, get_peft_model

    from pg_analysis.interp import language_model_of

    model, _, _, tmp = lora_setup
    lm = language_model_of(model)
    ids = torch.tensor([[1, 5, 9, 7, 12]])
    peft_lm = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    _perturb_lora(peft_lm)
    peft_lm.eval()
    with torch.no_grad():
        adapted = peft_lm(input_ids=ids).logits
        through_vlm = model(input_ids=ids).logits  # the LM's modules are the VLM's: the adapter is live there too
    torch.testing.assert_close(through_vlm, adapted, atol=1e-6, rtol=0)
    peft_lm.save_pretrained(tmp / "lm_adapter")
    fresh = language_model_of(GroundedLlavaForConditionalGeneration.from_pretrained(tmp / "base").eval())
    with torch.no_grad():
        again = PeftModel.from_pretrained(fresh, tmp / "lm_adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(again, adapted, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_window_model_generates_the_same_with_and_without_cache(batch, mode, tmp_path):
    model = make_model(1, mode)
    model.set_exit_layer(3)  # vision rows in blocks 1 and 2 only
    ids, mask, px = batch
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=5, do_sample=False,
              pad_token_id=3, eos_token_id=None, suppress_tokens=[IMAGE_ID])
    with torch.no_grad():
        cached, uncached = model.generate(**kw, use_cache=True), model.generate(**kw, use_cache=False)
        full = make_model(1, mode)(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        windowed = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert torch.equal(cached, uncached)
    assert (windowed - full)[mask.bool()].abs().max() > 1e-4  # K changes the computation
    model.save_pretrained(tmp_path / "w")
    again = GroundedLlavaForConditionalGeneration.from_pretrained(tmp_path / "w")
    assert again.exit_layer == 3 and again.config.insert_layer == 1
    with pytest.raises(GroundingError, match="exit_layer must be"):
        model.set_exit_layer(0)
    with pytest.raises(GroundingError, match="insert_layer must be"):
        model.set_insert_layer(4)
