"""The training-free insert-layer proxies: attention knockouts on the baseline (L = 0) model."""

import numpy as np
import pytest
import torch

from pg_analysis.errors import InputError


@pytest.fixture(scope="module")
def prompts(tiny_vlm_dir, tiny_pairs):
    from pg_analysis.data import load_pairs
    from pg_train.probe import load_prompt_model, mcq_prompts, mcq_records

    pm = load_prompt_model(tiny_vlm_dir)
    pr = mcq_prompts(pm, mcq_records(load_pairs(str(tiny_pairs)), seed=0)[:6], cache_dir=None, progress=False)
    return pm, pr


def test_knockout_mask_bars_text_queries_from_vision_keys_only():
    from pg_train.probe import knockout_mask

    mask = torch.zeros(1, 1, 4, 4)
    vision = torch.tensor([[False, True, True, False]])
    got = knockout_mask(mask, vision)[0, 0] < 0
    want = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(got, want)  # vision queries keep every key; text queries lose the vision keys


@pytest.mark.parametrize("k", [0, 1, 2])
def test_exit_knockout_equals_the_vision_rows_leaving_at_k(prompts, k):
    """Text blind to vision in layers >= K gives the text rows exactly what a model whose vision rows leave
    after layer K-1 gives them (grounded_forward's exit_layer): the knockout is VTW's rule, training-free."""
    from pg_train.probe import letter_logits

    pm, pr = prompts
    n = pm.model.decoder_parts().config.num_hidden_layers
    knocked = letter_logits(pm, pr, blind=range(k, n))
    pm.model.set_exit_layer(k)
    try:
        left = letter_logits(pm, pr)
    finally:
        pm.model.set_exit_layer(None)
    assert torch.allclose(knocked, left, atol=1e-5)


def test_a_full_knockout_makes_the_answers_independent_of_the_image(prompts):
    from pg_train.probe import Prompts, letter_logits

    pm, pr = prompts
    n = pm.model.decoder_parts().config.num_hidden_layers
    base = letter_logits(pm, pr)
    assert torch.equal(letter_logits(pm, pr, blind=range(0, 0)), base)
    other = Prompts(pr.examples, torch.randn_like(pr.features) * 3, pr.answers)
    assert not torch.allclose(letter_logits(pm, other), base, atol=1e-4)  # the image matters to the model
    assert torch.allclose(letter_logits(pm, other, blind=range(0, n)), letter_logits(pm, pr, blind=range(0, n)),
                          atol=1e-5)  # but not once no layer lets the text read it


def test_knockout_shift_entry_and_exit_profiles(prompts):
    from pg_train.probe import knockout_shift

    pm, pr = prompts
    n = pm.model.decoder_parts().config.num_hidden_layers
    entry = knockout_shift(pm, pr, list(range(n + 1)), "entry")
    exit_ = knockout_shift(pm, pr, list(range(n + 1)), "exit")
    assert entry[0]["kl"] == 0 and entry[0]["answers_changed"] == 0  # nothing blind: the baseline itself
    assert exit_[n]["kl"] == 0
    assert entry[n]["kl"] == pytest.approx(exit_[0]["kl"])  # both: blind in every layer
    assert entry[n]["kl"] > 0
    assert all(0 <= r["answers_changed"] <= 1 and 0 <= r["accuracy"] <= 1 for r in entry.values())
    assert pr.answers is not None and len(pr.answers) == len(pr.examples)
    assert np.isin(pr.answers, [0, 1, 2, 3]).all()
    # the baseline's logits handed in (pg-recommend computes them once) give the same profile; a wrong one shows
    from pg_train.probe import letter_logits

    base = letter_logits(pm, pr)
    assert knockout_shift(pm, pr, list(range(n + 1)), "entry", base=base) == entry
    assert knockout_shift(pm, pr, [n], "exit", base=base * 3)[n]["kl"] == 0  # blind nowhere: the base itself
    assert knockout_shift(pm, pr, [0], "exit", base=torch.zeros_like(base))[0] != exit_[0]


def test_knockout_bad_input_is_one_clear_error(prompts):
    from pg_train.probe import Prompts, knockout_shift

    pm, pr = prompts
    with pytest.raises(InputError, match=r"must be in \[0, 3\]"):
        knockout_shift(pm, pr, [0, 4], "entry")
    with pytest.raises(InputError, match="entry or exit"):
        knockout_shift(pm, pr, [1], "middle")
    image_id = pm.model.config.image_token_index
    from dataclasses import replace

    text_only = Prompts([replace(e, input_ids=[t for t in e.input_ids if t != image_id]) for e in pr.examples],
                        pr.features, pr.answers)
    with pytest.raises(InputError, match="no vision rows"):
        knockout_shift(pm, text_only, [1], "entry")
    pm.model.set_insert_layer(1)
    try:
        with pytest.raises(InputError, match="baseline"):
            knockout_shift(pm, pr, [1], "entry")
    finally:
        pm.model.set_insert_layer(0)
