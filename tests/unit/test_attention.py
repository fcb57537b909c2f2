"""Language→vision attention: the pure reductions, the two capture backends, pg-attnmap end to end."""

import numpy as np
import pytest
import torch

from pg_analysis.attention import (attention_map, capture_hf, query_rows, sample_tokens,
                                   vision_attention)
from pg_analysis.errors import InputError


def test_query_rows_text_after_image_and_last():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    vision = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert query_rows(mask, vision, "text").int().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert query_rows(mask, vision, "last").int().tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]
    right_pad = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert query_rows(right_pad, vision[:1], "last").int().tolist() == [[0, 0, 0, 1, 0, 0]]
    with pytest.raises(InputError, match="vision rows"):
        query_rows(mask, torch.zeros_like(vision), "text")
    with pytest.raises(InputError, match="no text rows after"):
        query_rows(mask[:1], torch.tensor([[0, 0, 0, 0, 0, 1]], dtype=torch.bool), "text")


def test_vision_attention_is_the_mean_over_queries_and_heads():
    torch.manual_seed(0)
    w = torch.rand(2, 3, 5, 5).softmax(-1)
    vision = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    queries = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 1]], dtype=torch.bool)
    got = vision_attention(w, queries, vision)
    hm = w.mean(1)
    want = torch.stack([hm[0, [3, 4]][:, [1, 2]].mean(0), hm[1, [2, 4]][:, [0, 1]].mean(0)])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(vision_attention(hm, queries, vision), want, atol=1e-6)
    with pytest.raises(InputError, match="different numbers of vision rows"):
        vision_attention(w, queries, torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool))


def test_sample_tokens_is_seeded_ordered_and_capped():
    a = sample_tokens(576, 80, seed=3)
    assert len(a) == 80 and np.all(np.diff(a) > 0) and np.array_equal(a, sample_tokens(576, 80, seed=3))
    assert not np.array_equal(a, sample_tokens(576, 80, seed=4))
    assert np.array_equal(sample_tokens(16, 80), np.arange(16))


@pytest.fixture(scope="module")
def prompts(tiny_vlm_dir, tiny_pairs):
    from pg_analysis.data import load_pairs
    from pg_train.probe import load_prompt_model, mcq_prompts, mcq_records

    pm = load_prompt_model(tiny_vlm_dir)
    pr = mcq_prompts(pm, mcq_records(load_pairs(str(tiny_pairs)), seed=0)[:6], cache_dir=None, progress=False)
    return pm, pr


@pytest.mark.parametrize("layer", [0, 2])
def test_hf_and_nnsight_backends_agree(prompts, layer):
    pm, pr = prompts
    pm.model.set_insert_layer(layer)
    try:
        a = attention_map(pm, pr, "text", "hf", batch_size=4, progress=False)
        b = attention_map(pm, pr, "text", "nnsight", batch_size=4, progress=False)
    finally:
        pm.model.set_insert_layer(0)
    assert a.shape == (3, pm.model.num_image_tokens)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert (a[:layer] == 0).all() and (a[layer:] > 0).all()  # grounded: no vision rows below L


def test_hf_backend_equals_hf_output_attentions(prompts):
    """At L = 0 the hooks read what HF's own ``output_attentions=True`` returns."""
    from pg_analysis.attention import eager_full_sequence

    pm, pr = prompts
    model = pm.model
    got = attention_map(pm, pr, "last", "hf", batch_size=8, progress=False)
    _, batch = next(pr.batches(pm, 8))
    with torch.no_grad(), eager_full_sequence(model):
        embeds, vision = model.embed(batch["input_ids"], model.project(batch["vision_features"]))
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                         output_attentions=True)
    queries = query_rows(batch["attention_mask"], vision, "last")
    want = torch.stack([vision_attention(w, queries, vision).mean(0) for w in out.attentions])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)


def test_no_attention_output_is_a_clear_error(prompts):
    pm, pr = prompts
    _, batch = next(pr.batches(pm, 2))
    vision = batch["input_ids"] == pm.model.config.image_token_index
    pm.model.set_attn_implementation("sdpa")  # sdpa returns no weights
    with pytest.raises(InputError, match="no attention output"):
        capture_hf(pm.model, batch, query_rows(batch["attention_mask"], vision), vision)


def test_vlm_without_image_token_is_a_clear_error(tiny_vlm_dir, tiny_models, tmp_path):
    import shutil

    from pg_train.probe import load_prompt_model

    bad = tmp_path / "no_image_token"
    shutil.copytree(tiny_vlm_dir, bad)
    for f in bad.glob("tokenizer*"):
        f.unlink()
    for f in tiny_models["llama"].glob("tokenizer*"):
        shutil.copy(f, bad / f.name)
    with pytest.raises(InputError, match="no image token"):
        load_prompt_model(bad)
