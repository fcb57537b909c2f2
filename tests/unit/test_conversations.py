"""Templates, image-token expansion and label masking."""

import logging

import pytest

from pg_analysis.errors import InputError
from pg_train.conversations import VICUNA_SYSTEM, encode_conversation, letter_token_ids

IMG = 99


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def _conv(q="<image>\nWhat is this ?", a="a red cat ."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _supervised(enc):
    return [i for i, l in zip(enc.input_ids, enc.labels) if l != -100]


def test_vicuna_labels_cover_answer_and_eos_only(tok):
    enc = encode_conversation(_conv(), tok, "vicuna_v1", IMG, 5, 1)
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.input_ids.count(IMG) == 5
    assert all(l == -100 for i, l in zip(enc.input_ids, enc.labels) if i == IMG)
    assert _supervised(enc) == tok("a red cat .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[0] == tok.bos_token_id  # the tiny tokenizer adds BOS


def test_vicuna_empty_system_prompt_starts_at_user(tok):
    short = encode_conversation(_conv(), tok, "vicuna_v1", IMG, 2, 1, system="")
    full = encode_conversation(_conv(), tok, "vicuna_v1", IMG, 2, 1)
    system = tok(VICUNA_SYSTEM + " ", add_special_tokens=False)["input_ids"]
    assert short.input_ids[0] == full.input_ids[0] == tok.bos_token_id
    assert full.input_ids[1:1 + len(system)] == system
    assert short.input_ids[1:] == full.input_ids[1 + len(system):]  # BOS, then straight to "USER:"
    assert short.labels[1:] == full.labels[1 + len(system):]


def test_plain_template_supervises_caption(tok):
    enc = encode_conversation(_conv("<image>"), tok, "plain", IMG, 4, 1)
    assert enc.input_ids.count(IMG) == 4
    assert _supervised(enc) == tok("a red cat .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_multi_turn_supervises_every_answer(tok):
    conv = _conv() + [{"from": "human", "value": "is this a dog ?"}, {"from": "gpt", "value": "the dog"}]
    enc = encode_conversation(conv, tok, "vicuna_v1", IMG, 2, 1)
    ids = tok("a red cat . the dog", add_special_tokens=False)["input_ids"]
    assert _supervised(enc) == ids[:4] + [tok.eos_token_id] + ids[4:] + [tok.eos_token_id]


def test_chat_template_spans(tok):
    import copy

    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                          "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    enc = encode_conversation(_conv(), chat, "chat", IMG, 3, 1, system="a")
    sup = chat.convert_ids_to_tokens(_supervised(enc))
    assert sup[:4] == ["a", "red", "cat", "."] and sup[-1] == "</s>"
    prompt = encode_conversation(_conv()[:1], chat, "chat", IMG, 3, 1, generation=True, system="a")
    assert enc.input_ids[:len(prompt.input_ids)] == prompt.input_ids  # eval prompt = training prefix
    assert all(l == -100 for l in prompt.labels)


def test_generation_prompt_is_training_prefix(tok):
    full = encode_conversation(_conv(), tok, "vicuna_v1", IMG, 3, 1)
    prompt = encode_conversation(_conv()[:1], tok, "vicuna_v1", IMG, 3, 1, generation=True)
    assert full.input_ids[:len(prompt.input_ids)] == prompt.input_ids
    assert full.labels[len(prompt.input_ids)] != -100


def test_bad_conversations(tok):
    with pytest.raises(InputError, match="no assistant"):
        encode_conversation(_conv()[:1], tok, "vicuna_v1", IMG, 3, 1)
    with pytest.raises(InputError, match="placeholder"):
        encode_conversation(_conv(), tok, "vicuna_v1", IMG, 3, 0)
    with pytest.raises(InputError, match="placeholder"):
        encode_conversation(_conv("What is this ?"), tok, "vicuna_v1", IMG, 3, 1)
    with pytest.raises(InputError, match="unknown speaker"):
        encode_conversation([{"from": "bot", "value": "x"}], tok, "vicuna_v1", IMG, 3, 0)
    with pytest.raises(InputError, match="unknown template"):
        encode_conversation(_conv(), tok, "alpaca", IMG, 3, 1)


def test_truncation_warns_and_never_drops_the_answer(tok, caplog):
    full = encode_conversation(_conv(), tok, "vicuna_v1", IMG, 3, 1)
    n_prompt = full.labels.index(next(l for l in full.labels if l != -100))
    with caplog.at_level(logging.WARNING):
        cut = encode_conversation(_conv(), tok, "vicuna_v1", IMG, 3, 1, max_length=n_prompt + 2)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 2 and "truncated" in caplog.text
    with pytest.raises(InputError, match="drop the whole answer"):
        encode_conversation(_conv(), tok, "vicuna_v1", IMG, 3, 1, max_length=n_prompt)
    with pytest.raises(InputError, match="cut the image"):
        encode_conversation(_conv(), tok, "vicuna_v1", IMG, 3, 1, max_length=3)


def test_letter_tokens(tok):
    ids = letter_token_ids(tok, "vicuna_v1")
    assert tok.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]
