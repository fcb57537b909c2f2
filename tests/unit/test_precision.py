"""--precision auto: bf16 only where the device runs it fast (timed), an explicit choice kept."""

import pytest
import torch

from pg_analysis.errors import InputError
from pg_train.vlm import bf16_is_fast, precision_context, resolve_precision

CPU = torch.device("cpu")


def test_auto_follows_the_timed_matmul():
    assert resolve_precision("auto", CPU) == ("bf16" if bf16_is_fast("cpu") else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_cuda_without_a_gpu_is_not_fast_bf16():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bf16_is_fast("cuda") is False


def test_unknown_precision_is_one_line():
    with pytest.raises(InputError, match="precision must be one of auto, bf16, fp32"):
        resolve_precision("fp16", CPU)


def test_auto_context_autocasts_only_when_bf16_is_chosen():
    a = torch.randn(4, 4)
    with precision_context("auto", CPU):
        dtype = (a @ a).dtype
    assert dtype == (torch.bfloat16 if bf16_is_fast("cpu") else torch.float32)
