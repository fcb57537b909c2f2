"""Load a saved checkpoint in a fresh Python that cannot import this project (transformers + torch only), generate
with it, and hand back what it produced: the proof that a grounded model's folder travels on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

_SCRIPT = r'''
import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pg_train", "pg_analysis", "tests"):
            raise ImportError(f"{name} is blocked: the checkpoint must load without the project")


sys.meta_path.insert(0, _Blocked())
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

folder, inputs, result, with_processors = sys.argv[1:5]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
kw = torch.load(inputs)
with torch.no_grad():
    tokens = model.generate(**kw)
out = {"tokens": tokens, "module": type(model).__module__, "class": type(model).__name__,
       "config": model.config.to_dict()}
if with_processors == "1":
    out["image_id"] = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<image>")
    out["processor"] = type(AutoImageProcessor.from_pretrained(folder)).__name__
torch.save(out, result)
'''


def generate_without_project(folder: Path, generate_kwargs: dict[str, Any], work: Path,
                             with_processors: bool = False) -> dict[str, Any]:
    """``model.generate(**generate_kwargs)`` of ``folder`` loaded by ``AutoModelForImageTextToText`` with
    ``trust_remote_code`` in a subprocess that blocks ``pg_train`` / ``pg_analysis``: ``{"tokens", "module",
    "class", "config"}`` (+ ``"image_id"``, ``"processor"`` with ``with_processors``)."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save(generate_kwargs, work / "inputs.pt")
    (work / "load.py").write_text(_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, str(work / "load.py"), str(folder), str(work / "inputs.pt"),
                          str(work / "out.pt"), "1" if with_processors else "0"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(work / "out.pt")
