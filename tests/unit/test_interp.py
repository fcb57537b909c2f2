"""nnsight and TransformerLens handles equal HF's own outputs on tiny models."""

import pytest
import torch

from pg_analysis.errors import InputError
from pg_analysis.interp import as_nnsight, as_transformer_lens, language_model_of
from pg_train.synthetic import make_tokenizer, tiny_llama_config


@pytest.fixture(scope="module")
def lm_and_tok(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)).eval()
    model.set_attn_implementation("eager")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)  # TransformerLens re-reads it by name_or_path
    ids = torch.tensor([[1, 7, 9, 11, 13, 5]])
    with torch.no_grad():
        ref = model(ids, output_attentions=True, output_hidden_states=True)
    return model, tok, ids, ref


def test_nnsight_handle_reads_hf_hidden_states_and_attention(lm_and_tok):
    model, _, ids, ref = lm_and_tok
    h = as_nnsight(model)
    hidden, attn = [], []
    with torch.no_grad(), h.trace(input_ids=ids):
        for i in range(2):
            attn.append(h.model.layers[i].self_attn.output[1].save())
            hidden.append(h.model.layers[i].output.save())
        logits = h.output.logits.save()
    for i in range(2):
        torch.testing.assert_close(attn[i], ref.attentions[i])
    torch.testing.assert_close(hidden[0], ref.hidden_states[1])  # layer i's output = hidden state i + 1
    torch.testing.assert_close(logits, ref.logits)


def test_transformer_lens_bridge_matches_hf_and_leaves_the_model_alone(lm_and_tok):
    model, tok, ids, ref = lm_and_tok
    before = type(model.model.layers[0])
    bridge = as_transformer_lens(model, tok)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    for i in range(2):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i], atol=1e-5, rtol=1e-5)
    assert type(model.model.layers[0]) is before  # copied, not wrapped in place
    with pytest.raises(InputError):
        as_transformer_lens(torch.nn.Linear(2, 2), tok)


def test_language_model_of_a_vlm_shares_its_weights(tiny_vlm_dir):
    from pg_train.vlm import load_vlm

    vlm = load_vlm(tiny_vlm_dir)
    lm = language_model_of(vlm.model)
    assert lm.lm_head.weight.data_ptr() == vlm.model.lm_head.weight.data_ptr()
    ids = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, vlm.model(input_ids=ids).logits)
    with pytest.raises(InputError):
        language_model_of(lm)


def test_nnsight_handle_with_a_tokenizer_takes_strings(lm_and_tok, tiny_vlm_dir):
    from pg_train.vlm import load_vlm

    model, tok, _, _ = lm_and_tok
    h = as_nnsight(model, tok)
    with torch.no_grad(), h.trace("a red cat"):
        hidden = h.model.layers[0].output.save()
        logits = h.output.logits.save()
    with torch.no_grad():
        ref = model(**tok("a red cat", return_tensors="pt"), output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(hidden, ref.hidden_states[1])  # block 0's output
    vlm = load_vlm(tiny_vlm_dir)  # a grounded VLM takes text-only strings the same way
    hv = as_nnsight(vlm.model, vlm.tokenizer)
    with torch.no_grad(), hv.trace("a blue dog"):
        vlm_logits = hv.output.logits.save()
    with torch.no_grad():
        torch.testing.assert_close(vlm_logits, vlm.model(**vlm.tokenizer("a blue dog", return_tensors="pt")).logits)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_transformer_lens_prepends_bos_exactly_when_the_hf_tokenizer_does(lm_and_tok, tmp_path, adds_bos):
    from transformers import AutoTokenizer

    from pg_analysis.models import tokenizer_adds_bos
    from pg_train.synthetic import make_tokenizer

    model, _, _, _ = lm_and_tok
    make_tokenizer(tmp_path, add_bos=adds_bos)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_adds_bos(tok) is adds_bos
    bridge = as_transformer_lens(model, tok)
    text = "a red cat"
    assert bridge.to_tokens(text)[0].tolist() == tok(text).input_ids
    with torch.no_grad():
        torch.testing.assert_close(bridge(text), model(**tok(text, return_tensors="pt")).logits, atol=1e-5, rtol=1e-5)
    forced = as_transformer_lens(model, tok, prepend_bos=True)
    assert forced.to_tokens(text)[0].tolist() == [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
