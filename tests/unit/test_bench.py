"""pg-bench on a tiny model: structure, exact KV-cache bytes, FLOP model, bad input."""


import pytest

from pg_train.bench import BenchConfig, FlopModel, run_bench


def test_flop_model_matches_hand_count():
    f = FlopModel(n_layers=4, hidden=8, layer_params=100, vocab=10)
    t, v = 3, 5
    layer = lambda n: 2 * n * 100 + 4 * n * n * 8  # noqa: E731
    assert f.prefill(t, v, 0) == 4 * layer(8) + 2 * 8 * 8 * 10
    assert f.prefill(t, v, 4) == 4 * layer(3) + 2 * 8 * 8 * 10
    assert f.prefill(t, v, 1) < f.prefill(t, v, 0)


def test_run_bench_tiny(tiny_models):
    cfg = BenchConfig(model=str(tiny_models["llama"]), text_tokens=6, vision_tokens=10, layers=[0, 1, 3],
                      repeats=1, decode_tokens=2, device="cpu", dtype="float32")
    result = run_bench(cfg, progress=False)
    rows = {r["insert_layer"]: r for r in result["rows"]}
    assert set(rows) == {0, 1, 3}
    # exact KV bytes: per layer K and V of [1, kv_heads=2, len, head_dim=8] fp32; layers < L hold T rows only
    per_row = 2 * 2 * 8 * 4
    for layer, r in rows.items():
        assert r["kv_cache_bytes"] == per_row * (layer * 6 + (3 - layer) * 16)
    assert rows[0]["prefill_pred"] == 1.0 and rows[3]["prefill_pred"] < rows[1]["prefill_pred"] < 1.0
    assert all(r["prefill_s"] > 0 and r["train_step_s"] > 0 and r["decode_token_s"] > 0 for r in rows.values())
    assert "prefill_saving_achieved" in rows[1]


def test_bench_config_validates():
    from pg_analysis.errors import InputError

    with pytest.raises(InputError):
        BenchConfig(shape="gpt-9")
    with pytest.raises(InputError):
        BenchConfig(repeats=0)


def test_flop_model_windows():
    f = FlopModel(n_layers=4, hidden=8, layer_params=100, vocab=10)
    layer = lambda n: 2 * n * 100 + 4 * n * n * 8  # noqa: E731
    head = 2 * 8 * 8 * 10
    assert f.prefill(3, 5, 1, 3) == 2 * layer(3) + 2 * layer(8) + head  # blocks 0 and 3 text only
    assert f.prefill(3, 5, 1, 4) == f.prefill(3, 5, 1)  # K = N: today's model
    assert f.prefill(3, 5, 2, 2) == 4 * layer(3) + head  # an empty window: the text-only model
    assert f.prefill_ratio(3, 5, 0, 2) < 1 and f.decode_step(3, 5, 0, 2) < f.decode_step(3, 5, 0)


def test_run_bench_over_windows(tiny_models):
    cfg = BenchConfig(model=str(tiny_models["llama"]), text_tokens=6, vision_tokens=10, layers=[0, 1, 3],
                      exit_layers=[1, 3], repeats=1, decode_tokens=1, train=False, device="cpu", dtype="float32")
    result = run_bench(cfg, progress=False)
    windows = [(r["insert_layer"], r["exit_layer"]) for r in result["rows"]]
    assert windows == [(0, 3), (0, 1), (1, 1), (1, 3), (3, 3)]  # L <= K only, the ordinary model first
    per_row = 2 * 2 * 8 * 4
    for r in result["rows"]:  # text-only layers outside the window [L, K): T rows; inside: T + V rows
        inside = r["exit_layer"] - r["insert_layer"]
        assert r["kv_cache_bytes"] == per_row * ((3 - inside) * 6 + inside * 16)
    assert result["rows"][0]["prefill_ratio"] == 1.0
