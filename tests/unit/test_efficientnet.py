"""EfficientNet-lite as a transformers EfficientNet: the key mapping and open gates against the reference forward
(random weights, full lite0 shape), a tiny CNN through pg-align (feature widths that differ by layer), and the
no-CLS refusal."""

import json

import pytest
import torch

from pg_analysis import cli
from pg_analysis.vision_assets import SE_OPEN_BIAS, convert_lite0, hf_key, lite0_config, reference_forward


def random_original_state_dict() -> dict:
    """A random lite0 state dict in the original (lukemelas) layout: a random HF model's tensors under the
    original names (BN statistics randomised too, so batch norm is not an identity)."""
    from transformers import EfficientNetForImageClassification

    torch.manual_seed(0)
    hf = EfficientNetForImageClassification(lite0_config()).eval().state_dict()
    names = {}
    for b in range(16):
        for part in ("expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2"):
            for param in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                names[f"_blocks.{b}._{part}.{param}"] = None
    for top in ("_conv_stem", "_bn0", "_conv_head", "_bn1", "_fc"):
        for param in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            names[f"{top}.{param}"] = None
    sd = {}
    for name in names:
        key = hf_key(name)
        if key in hf and not (name.startswith(("_conv", "_blocks")) and "conv" in name and name.endswith("bias")):
            t = hf[key].clone()
            if name.endswith("running_var"):
                t = torch.rand_like(t) + 0.5
            elif name.endswith("running_mean") or (name.endswith("bias") and "_bn" in name):
                t = torch.randn_like(t) * 0.1
            elif name.endswith("weight") and "_bn" in name:
                t = torch.rand_like(t) + 0.5
            sd[name] = t
    return sd


def test_converted_lite0_equals_the_reference_forward():
    sd = random_original_state_dict()
    model = convert_lite0(sd)
    gates = [v for k, v in model.state_dict().items() if k.endswith("squeeze_excite.expand.bias")]
    assert len(gates) == 16 and all(bool((g == SE_OPEN_BIAS).all()) for g in gates)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(pixel_values=x).logits, reference_forward(sd, x)
    assert float((ours - ref).abs().max()) < 1e-3 * float(ref.abs().max())


def test_unknown_original_key_is_refused():
    from pg_analysis.errors import AssetError

    with pytest.raises(AssetError, match="unexpected key"):
        hf_key("_head_dropout.weight")


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory):
    """A tiny random EfficientNet at half width (stem 16, stages 8 and 16 wide, head 640; 32 px)."""
    from transformers import BitImageProcessorPil, EfficientNetConfig, EfficientNetModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_cnn")
    config = EfficientNetConfig(image_size=32, width_coefficient=0.5, depth_coefficient=1.0, hidden_dim=640,
                                in_channels=[32, 16], out_channels=[16, 24], kernel_sizes=[3, 3], strides=[1, 2],
                                num_block_repeats=[1, 2], expand_ratios=[1, 2], depthwise_padding=[],
                                hidden_act="relu6")
    EfficientNetModel(config).eval().save_pretrained(folder)
    BitImageProcessorPil(do_resize=True, size={"shortest_edge": 32}, do_center_crop=True,
                         crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_cnn_layers_are_the_stem_every_block_and_the_head(tiny_cnn, tiny_pairs):
    from pg_analysis.data import load_pairs_file
    from pg_analysis.features import extract_vision
    from pg_analysis.models import load_vision, pick_runtime
    from pg_analysis.registry import resolve_model

    adapter = load_vision(resolve_model(str(tiny_cnn), "vision"), pick_runtime("cpu", "float32"))
    assert adapter.family == "efficientnet" and adapter.n_layers == 5  # stem + 3 blocks + head
    ds = load_pairs_file(tiny_pairs)
    feats = extract_vision(adapter, list(ds["image"])[:4], list(ds["id"])[:4], "mean", batch_size=3,
                           progress=False)
    assert [tuple(x.shape) for x in feats] == [(4, 16), (4, 8), (4, 16), (4, 16), (4, 640)]
    from pg_analysis.data import open_image

    px = adapter.pixel_values([open_image(p) for p in list(ds["image"])[:4]])
    with torch.no_grad():
        head = adapter.model(pixel_values=px).last_hidden_state
    torch.testing.assert_close(feats[-1], head.mean((2, 3)), atol=1e-5, rtol=1e-4)


def test_pg_align_with_a_cnn_encoder_caches_ragged_layers(tiny_cnn, tiny_models, tiny_pairs, tmp_path, capsys):
    args = ["--vision", str(tiny_cnn), "--vision-pooling", "mean", "--llm", str(tiny_models["llama"]),
            "--data", str(tiny_pairs), "--k", "3", "--null", "2", "--quiet", "--cache-dir", str(tmp_path / "c")]
    assert cli.align([*args, "--out", str(tmp_path / "a")]) == 0
    assert cli.align([*args, "--out", str(tmp_path / "b")]) == 0  # the second run reads the ragged cache
    out = capsys.readouterr().out
    assert "features: vision cached, text cached" in out
    a, b = (json.loads((tmp_path / x / "alignment.json").read_text()) for x in "ab")
    assert a["shape"] == [5, 4] and a["grid"] == b["grid"]


def test_cnn_with_cls_pooling_is_one_line(tiny_cnn, tiny_models, tiny_pairs, tmp_path, capsys):
    code = cli.align(["--vision", str(tiny_cnn), "--llm", str(tiny_models["llama"]), "--data", str(tiny_pairs),
                      "--k", "3", "--null", "0", "--quiet", "--out", str(tmp_path / "a"),
                      "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "has no CLS token: pass --vision-pooling mean" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
