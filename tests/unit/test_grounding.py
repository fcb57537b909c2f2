"""grounded_forward on tiny random Llama, Qwen2, Qwen3, Phi-3 and Gemma 3 models (fp32); sliding windows on
Mistral, Qwen2 and Gemma 3."""

import pytest
import torch

from pg_train.grounding import GroundedCache, GroundingError, causal_key_mask, full_positions, grounded_forward, pack_rows
from pg_train.synthetic import tiny_llama_config

N_LAYERS = 4


def _model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=N_LAYERS, vocab_size=50))
    elif kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    elif kind == "gemma3":  # local and global layers with their own rotary bases; embeddings scaled; a logit cap
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=64,
                                                   layer_types=["sliding_attention", "full_attention"] * 2,
                                                   final_logit_softcapping=5.0))
    elif kind == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128))
    return model.eval()


@pytest.fixture(params=["llama", "qwen2", "qwen3", "phi3", "gemma3"], scope="module")
def model(request):
    return _model(request.param)


def _batch(seed=0, d=32):
    """3 samples, T=12: right padding (2 pads) + 4 vision rows; left padding (3 pads) + 2 vision rows; no padding,
    no vision rows. Vision rows sit in the middle of the text, as after an image placeholder."""
    g = torch.Generator().manual_seed(seed)
    t = 12
    embeds = torch.randn(3, t, d, generator=g)
    attn = torch.ones(3, t, dtype=torch.long)
    attn[0, -2:] = 0
    attn[1, :3] = 0
    vision = torch.zeros(3, t, dtype=torch.bool)
    vision[0, 2:6] = True
    vision[1, 5:7] = True
    return embeds, vision, attn


def _check_cache_continues(model, embeds, vision, attn, insert, n_steps, seed, **kw):
    """Decode ``n_steps`` random rows with the cache; each step's last logits equal a recompute of the whole
    sequence. Returns the cache."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cache = grounded_forward(model, embeds, vision, insert, attention_mask=attn, use_cache=True, **kw).cache
        full_e, full_v, full_a = embeds, vision, attn
        for _ in range(n_steps):
            step = torch.randn(embeds.shape[0], 1, embeds.shape[-1], generator=g)
            out = grounded_forward(model, step, None, insert, cache=cache, use_cache=True, **kw)
            full_e = torch.cat([full_e, step], 1)
            full_v = torch.cat([full_v, torch.zeros(embeds.shape[0], 1, dtype=torch.bool)], 1)
            full_a = torch.cat([full_a, torch.ones(embeds.shape[0], 1, dtype=torch.long)], 1)
            ref = grounded_forward(model, full_e, full_v, insert, attention_mask=full_a, **kw).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], ref, atol=1e-4, rtol=0)
    return cache


def test_insert_layer_zero_is_the_ordinary_model(model):
    embeds, vision, attn = _batch()
    with torch.no_grad():
        ours = grounded_forward(model, embeds, vision, 0, attention_mask=attn).logits
        ref = model(inputs_embeds=embeds, attention_mask=attn,
                    position_ids=full_positions(attn)).logits
    keep = attn.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [1, 2, 3, N_LAYERS])
def test_splice_equals_masked_variant_at_text_rows(model, layer):
    embeds, vision, attn = _batch(1)
    with torch.no_grad():
        splice = grounded_forward(model, embeds, vision, layer, attention_mask=attn, mode="splice").logits
        masked = grounded_forward(model, embeds, vision, layer, attention_mask=attn, mode="mask").logits
    text = attn.bool() & ~vision
    torch.testing.assert_close(splice[text], masked[text], atol=1e-5, rtol=0)
    vis = attn.bool() & vision  # vision rows enter at the same layer with the same inputs: equal too
    torch.testing.assert_close(splice[vis], masked[vis], atol=1e-5, rtol=0)


def test_insert_at_last_layer_text_rows_are_text_only_model_with_true_positions(model):
    embeds, vision, attn = _batch(2)
    with torch.no_grad():
        out = grounded_forward(model, embeds, vision, N_LAYERS, attention_mask=attn).logits
        for b in range(3):
            rows = (attn[b].bool() & ~vision[b]).nonzero().squeeze(1)
            pos = full_positions(attn)[b, rows]
            ref = model(inputs_embeds=embeds[b:b + 1, rows], position_ids=pos[None]).logits[0]
            torch.testing.assert_close(out[b, rows], ref, atol=1e-5, rtol=0)
            # vision rows reach only the final norm and the head
            vrows = vision[b].nonzero().squeeze(1)
            direct = model.lm_head(model.model.norm(embeds[b, vrows]))
            cap = getattr(model.config, "final_logit_softcapping", None)
            direct = torch.tanh(direct / cap) * cap if cap else direct  # Gemma's logit cap
            torch.testing.assert_close(out[b, vrows], direct, atol=1e-5, rtol=0)


def test_positions_differ_from_packed_order():
    # a model run on text rows with *packed* positions differs: the grounded pass must use the true ones
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # large init: attention is sharp enough for RoPE positions to matter visibly
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=N_LAYERS, vocab_size=50, initializer_range=0.5)).eval()
    embeds, vision, attn = _batch(3)
    with torch.no_grad():
        out = grounded_forward(m, embeds, vision, N_LAYERS, attention_mask=attn).logits
        rows = (~vision[0] & attn[0].bool()).nonzero().squeeze(1)
        packed = m(inputs_embeds=embeds[:1, rows]).logits[0]
    assert (out[0, rows] - packed).abs().max() > 1e-3


def test_low_layers_never_see_vision_rows():
    m = _model("llama")
    embeds, vision, attn = _batch(4)
    seen = {}

    def record(i):
        def hook(module, args, kwargs):
            seen[i] = args[0].shape[1]

        return hook

    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(m.model.layers)]
    try:
        with torch.no_grad():
            grounded_forward(m, embeds, vision, 2, attention_mask=attn)
    finally:
        for h in hooks:
            h.remove()
    t_text = int((~vision).sum(1).max())
    assert seen == {0: t_text, 1: t_text, 2: 12, 3: 12}


@pytest.mark.parametrize("layer", [0, 2, N_LAYERS])
@pytest.mark.parametrize("mode", ["splice", "mask"])
def test_cached_decoding_equals_recompute(model, layer, mode):
    embeds, vision, attn = _batch(5)
    cache = _check_cache_continues(model, embeds, vision, attn, layer, 10, seed=9, mode=mode)
    assert isinstance(cache, GroundedCache)
    lengths = cache.layer_lengths()
    if mode == "splice":
        t_text = int((~vision).sum(1).max())
        assert lengths == [t_text + 10] * layer + [12 + 10] * (N_LAYERS - layer)
    else:
        assert lengths == [22] * N_LAYERS
    assert cache.nbytes() > 0


def test_cache_positions_follow_full_sequence():
    m = _model("llama")
    embeds, vision, attn = _batch(6)
    with torch.no_grad():
        out = grounded_forward(m, embeds, vision, 3, attention_mask=attn, use_cache=True)
    assert out.cache.next_position.tolist() == attn.sum(1).tolist()


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_gradients_reach_vision_rows(layer):
    m = _model("llama")
    embeds, vision, attn = _batch(7)
    embeds.requires_grad_(True)
    labels = torch.randint(0, 50, (3, 12))
    labels[vision | ~attn.bool()] = -100
    grounded_forward(m, embeds, vision, layer, attention_mask=attn, labels=labels).loss.backward()
    grad = embeds.grad.norm(dim=-1)
    assert (grad[vision] > 0).all()


def test_loss_matches_manual_cross_entropy(model):
    embeds, vision, attn = _batch(8)
    labels = torch.randint(0, 50, (3, 12))
    labels[vision | ~attn.bool()] = -100
    out = grounded_forward(model, embeds, vision, 2, attention_mask=attn, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 50)
    target = labels[:, 1:].reshape(-1)
    manual = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=0)


def test_pack_rows_and_masks_are_pure_and_ordered():
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    index, valid = pack_rows(keep)
    assert index[0].tolist() == [0, 2, 3] and valid[0].all()
    assert index[1, -1].item() == 2 and valid[1].tolist() == [False, False, True]
    m = causal_key_mask(torch.tensor([[1, 1, 0, 1]]), 2, torch.float32)
    allowed = (m == 0)[0, 0]
    assert allowed.tolist() == [[True, True, False, False], [True, True, False, True]]


def test_bad_inputs(model):
    embeds, vision, attn = _batch()
    with pytest.raises(GroundingError, match=r"insert_layer must be an integer in \[0, 4\]"):
        grounded_forward(model, embeds, vision, N_LAYERS + 1)
    with pytest.raises(GroundingError, match="insert_layer"):
        grounded_forward(model, embeds, vision, -1)
    with pytest.raises(GroundingError, match="vision_mask"):
        grounded_forward(model, embeds, vision[:, :5], 1)
    with pytest.raises(GroundingError, match="inputs_embeds"):
        grounded_forward(model, embeds[..., :8], vision, 1)
    with pytest.raises(GroundingError, match="attention_mask"):
        grounded_forward(model, embeds, vision, 1, attention_mask=attn[:, :3])
    with pytest.raises(GroundingError, match="mode"):
        grounded_forward(model, embeds, vision, 1, mode="dummy")
    out = grounded_forward(model, embeds, vision, 1, attention_mask=attn, use_cache=True)
    with pytest.raises(GroundingError, match="prefill"):
        grounded_forward(model, embeds, vision, 1, cache=out.cache)
    with pytest.raises(GroundingError, match="cache was built"):
        grounded_forward(model, embeds[:, :1], None, 2, cache=out.cache)


def test_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
    with pytest.raises(GroundingError, match="model_type 'gpt2'"):
        grounded_forward(gpt2, torch.randn(1, 3, 32), None, 1)


@pytest.mark.parametrize("insert_layer", [0, 2])
def test_loss_without_logits_equals_full_loss(model, insert_layer):
    embeds, vision, attn = _batch(4)
    labels = torch.randint(0, 50, (3, 12))
    labels[vision | ~attn.bool()] = -100
    labels[:, :4] = -100
    full = grounded_forward(model, embeds, vision, insert_layer, attention_mask=attn, labels=labels)
    lean = grounded_forward(model, embeds, vision, insert_layer, attention_mask=attn, labels=labels,
                            return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# windows: vision rows enter at L and leave after K - 1


WINDOWS = [(0, 2), (1, 3), (2, 2), (1, N_LAYERS), (0, 0)]


@pytest.mark.parametrize("window", WINDOWS)
def test_window_splice_equals_mask_in_logits_states_and_maps(model, window):
    insert, exit_ = window
    embeds, vision, attn = _batch(11)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = {mode: grounded_forward(model, embeds, vision, insert, attention_mask=attn, mode=mode,
                                          exit_layer=exit_, output_hidden_states=True, output_attentions=True)
                   for mode in ("splice", "mask")}
    finally:
        model.set_attn_implementation("sdpa")
    live = attn.bool()
    torch.testing.assert_close(out["splice"].logits[live], out["mask"].logits[live], atol=1e-5, rtol=0)
    for a, b in zip(out["splice"].hidden_states, out["mask"].hidden_states):
        torch.testing.assert_close(a[live], b[live], atol=1e-5, rtol=0)
    for i, (a, b) in enumerate(zip(out["splice"].attentions, out["mask"].attentions)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        if not insert <= i < exit_:  # outside the window text never sees vision rows, and they are not run
            assert a[vision[:, None, None, :].expand_as(a)].abs().max() == 0
            assert a[vision[:, None, :, None].expand_as(a)].abs().max() == 0
    hs = out["splice"].hidden_states
    for i in range(exit_ + 1, N_LAYERS):  # after K the vision rows keep their state at K (they have left)
        torch.testing.assert_close(hs[i][vision], hs[exit_][vision], atol=0, rtol=0)


def test_an_empty_window_is_the_text_only_model():
    m = _model("llama")
    embeds, vision, attn = _batch(12)
    with torch.no_grad():
        out = grounded_forward(m, embeds, vision, 2, attention_mask=attn, exit_layer=2).logits
        for b in range(3):
            rows = (attn[b].bool() & ~vision[b]).nonzero().squeeze(1)
            ref = m(inputs_embeds=embeds[b:b + 1, rows], position_ids=full_positions(attn)[b, rows][None]).logits[0]
            torch.testing.assert_close(out[b, rows], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [(0, 2), (1, 3), (1, 1)])
def test_text_reads_vision_only_inside_the_window(window):
    m = _model("llama")
    embeds, vision, attn = _batch(13)
    other = embeds.clone()
    other[vision] = torch.randn(int(vision.sum()), 32)
    text = attn.bool() & ~vision
    with torch.no_grad():
        a = grounded_forward(m, embeds, vision, window[0], attention_mask=attn, exit_layer=window[1]).logits
        b = grounded_forward(m, other, vision, window[0], attention_mask=attn, exit_layer=window[1]).logits
    changed = (a[text] - b[text]).abs().max()
    assert changed > 1e-4 if window[0] < window[1] else changed == 0


@pytest.mark.parametrize("window", [(0, 2), (1, 3), (2, 2)])
@pytest.mark.parametrize("mode", ["splice", "mask"])
def test_window_cached_decoding_equals_recompute(model, window, mode):
    insert, exit_ = window
    embeds, vision, attn = _batch(14)
    steps = 6
    cache = _check_cache_continues(model, embeds, vision, attn, insert, steps, seed=3, mode=mode, exit_layer=exit_)
    lengths = cache.layer_lengths()
    t_all = 12 + steps
    t_text = int((~vision).sum(1).max()) + steps if mode == "splice" else t_all
    want = [t_text if not insert <= i < exit_ else t_all for i in range(N_LAYERS)]
    assert lengths == want  # the KV cache of layers >= K holds text rows only


def test_bad_windows():
    m = _model("llama")
    embeds, vision, attn = _batch()
    for insert, exit_ in [(2, 1), (0, N_LAYERS + 1), (1, -1)]:
        with pytest.raises(GroundingError, match="exit_layer must be an integer"):
            grounded_forward(m, embeds, vision, insert, exit_layer=exit_)
    cache = grounded_forward(m, embeds, vision, 1, attention_mask=attn, use_cache=True, exit_layer=2).cache
    with pytest.raises(GroundingError, match="exit_layer=2"):
        grounded_forward(m, embeds[:, :1], None, 1, cache=cache, exit_layer=3)


# ----------------------------------------------------------------------------------------------------------------
# sliding windows shorter than the sequence


def _sliding(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=3)
    if kind == "mistral":  # every layer slides
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common))
    elif kind == "gemma3":  # local sliding layers and global layers, each with its own rotary base
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8,
                                                   layer_types=["sliding_attention"] * 2 + ["full_attention",
                                                                                            "sliding_attention"]))
    else:  # Qwen2: layers from max_window_layers on slide, the others attend to everything
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=2))
    return model.eval()


@pytest.fixture(params=["mistral", "qwen2", "gemma3"], scope="module")
def sliding(request):
    return _sliding(request.param)


def test_layer_windows_follow_the_config(sliding):
    from pg_train.grounding import layer_windows

    want = {"mistral": [3] * N_LAYERS, "qwen2": [None, None, 3, 3],
            "gemma3_text": [3, 3, None, 3]}[sliding.config.model_type]
    assert layer_windows(sliding.config, N_LAYERS) == want


def test_sliding_window_at_insert_layer_zero_is_the_hf_model(sliding):
    embeds, vision, attn = _batch(21)  # 12 rows, window 3
    with torch.no_grad():
        ours = grounded_forward(sliding, embeds, vision, 0, attention_mask=attn).logits
        ref = sliding(inputs_embeds=embeds, attention_mask=attn, position_ids=full_positions(attn)).logits
    keep = attn.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [(1, N_LAYERS), (2, 3), (0, 2)])
def test_sliding_window_splice_equals_mask_and_cache_continues(sliding, window):
    insert, exit_ = window
    embeds, vision, attn = _batch(22)
    kw = dict(exit_layer=exit_)
    with torch.no_grad():
        splice = grounded_forward(sliding, embeds, vision, insert, attention_mask=attn, mode="splice", **kw)
        masked = grounded_forward(sliding, embeds, vision, insert, attention_mask=attn, mode="mask", **kw)
        live = attn.bool()
        torch.testing.assert_close(splice.logits[live], masked.logits[live], atol=1e-5, rtol=0)
    _check_cache_continues(sliding, embeds, vision, attn, insert, 4, seed=4, **kw)


def test_the_window_matters():
    m = _sliding("mistral")
    embeds, vision, attn = _batch(23)
    with torch.no_grad():
        narrow = grounded_forward(m, embeds, vision, 1, attention_mask=attn).logits
        m.config.sliding_window = 64  # wider than the sequence: every key in reach
        wide = grounded_forward(m, embeds, vision, 1, attention_mask=attn).logits
        m.config.sliding_window = 3
    assert (narrow - wide)[attn.bool()].abs().max() > 1e-4
