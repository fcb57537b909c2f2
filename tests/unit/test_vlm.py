"""The grounded LLaVA-format VLM on tiny random models: HF equivalence at L=0, save/load, generate with cache."""

import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.configuration_grounded_llava import GroundedLlavaConfig
from pg_train.grounding import GroundingError
from pg_train.modeling_grounded_llava import pool_patch_grid
from pg_train.vlm import build_vlm, load_vlm
from pg_train.synthetic import tiny_llama_config
from tests.conftest import vlm_batch

N_LAYERS = 3  # tiny_llama_config


@pytest.fixture(scope="module")
def hf_llava(tiny_hf_llava):
    return tiny_hf_llava


def test_insert_layer_zero_equals_hf_llava(hf_llava):
    folder, hf = hf_llava
    vlm = load_vlm(folder)
    assert vlm.model.insert_layer == 0 and vlm.model.num_image_tokens == 16
    ids, mask, px = vlm_batch(vlm.image_token_id, 16)
    with torch.no_grad():
        ours = vlm.model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=px,
                 position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)


def test_hf_llava_loads_with_any_insert_layer(hf_llava):
    folder, _ = hf_llava
    vlm = load_vlm(folder, insert_layer=2)
    assert vlm.model.config.insert_layer == 2
    assert vlm.model.model.multi_modal_projector.gain.item() == 1.0
    assert not vlm.model.model.multi_modal_projector.offset.any()  # LLaVA's projector, unchanged
    ids, mask, px = vlm_batch(vlm.image_token_id, 16)
    with torch.no_grad():
        grounded = vlm.model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        vlm.model.set_insert_layer(0)
        plain = vlm.model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert (grounded - plain).abs().max() > 1e-4  # L changes the computation


@pytest.fixture(scope="module")
def built(tiny_models):
    return build_vlm(str(tiny_models["dinov2"]), str(tiny_models["llama"]), insert_layer=1, vision_pool=2, seed=0)


def test_build_from_parts_pools_and_adds_image_token(built, tiny_models):
    assert built.model.num_image_tokens == 4  # 8 px / patch 2 → 4×4 grid → pooled 2×2
    assert built.tokenizer.convert_tokens_to_ids("<image>") == built.image_token_id
    assert built.model.config.text_config.vocab_size == len(built.tokenizer)
    feats = built.model.encode_images(torch.randn(3, 3, 8, 8))
    assert feats.shape == (3, 4, 32)


def test_save_load_round_trip(built, tmp_path):
    built.model.model.multi_modal_projector.gain.data.fill_(2.5)
    built.model.model.multi_modal_projector.offset.data.normal_()
    built.save(tmp_path / "vlm")
    again = load_vlm(tmp_path / "vlm")
    assert again.model.config.insert_layer == 1 and again.model.config.vision_pool == 2
    assert again.model.model.multi_modal_projector.gain.item() == 2.5
    torch.testing.assert_close(again.model.model.multi_modal_projector.offset,
                               built.model.model.multi_modal_projector.offset, atol=0, rtol=0)
    ids, mask, px = vlm_batch(built.image_token_id, 4)
    with torch.no_grad():
        a = built.model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = again.model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert load_vlm(tmp_path / "vlm", insert_layer=3).model.insert_layer == 3


@pytest.mark.parametrize("layer", [0, 1, N_LAYERS])
def test_generate_with_cache_equals_without(built, layer):
    built.model.set_insert_layer(layer)
    ids, mask, px = vlm_batch(built.image_token_id, 4, seed=layer)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, do_sample=False,
              pad_token_id=3, eos_token_id=None, suppress_tokens=[built.image_token_id])
    with torch.no_grad():
        cached = built.model.generate(**kw, use_cache=True)
        uncached = built.model.generate(**kw, use_cache=False)
    assert cached.shape == (2, ids.shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_cached_features_equal_pixel_path(built):
    built.model.set_insert_layer(1)
    ids, mask, px = vlm_batch(built.image_token_id, 4)
    with torch.no_grad():
        a = built.model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = built.model(input_ids=ids, attention_mask=mask, vision_features=built.model.encode_images(px)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_image_token_count_mismatch_is_a_clear_error(built):
    ids, mask, px = vlm_batch(built.image_token_id, 3)
    with pytest.raises(GroundingError, match="image tokens and image features do not match"):
        built.model(input_ids=ids, attention_mask=mask, pixel_values=px)
    with pytest.raises(GroundingError, match="do not match"):
        built.model(input_ids=ids, attention_mask=mask)


def test_config_validates(tiny_models):
    from transformers import CLIPVisionConfig

    vc = CLIPVisionConfig.from_pretrained(tiny_models["clip"])
    with pytest.raises(GroundingError, match="insert_layer"):
        GroundedLlavaConfig(vision_config=vc, text_config=tiny_llama_config(), insert_layer=N_LAYERS + 1)
    with pytest.raises(GroundingError, match="projector_type"):
        GroundedLlavaConfig(vision_config=vc, text_config=tiny_llama_config(), projector_type="qformer")


def test_pool_patch_grid_averages_square_blocks():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4×4 grid, row-major
    pooled = pool_patch_grid(x, 2)
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(GroundingError):
        pool_patch_grid(torch.zeros(1, 15, 1), 2)


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_kernels_agree_and_auto_picks_eager_on_cpu(built, layer):
    from pg_train.vlm import use_attention

    model = built.model
    model.set_insert_layer(layer)
    ids, mask, px = vlm_batch(built.image_token_id, 4, seed=7)  # left-padded: the explicit mask matters
    logits = {}
    try:
        for kernel in ("sdpa", "eager"):
            assert use_attention(model, kernel) == kernel
            with torch.no_grad():
                logits[kernel] = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits[mask.bool()]
        assert use_attention(model, "auto") == "eager"
        with pytest.raises(InputError, match="attention must be one of"):
            use_attention(model, "flash")
    finally:
        use_attention(model, "sdpa")
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-5, rtol=1e-5)
