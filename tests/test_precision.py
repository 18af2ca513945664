"""Precision policies: what auto picks and why, and the CPU fp16 refusal."""

import pytest
import torch

from effitrain.errors import ConfigError
from effitrain.precision import build_precision, resolve_device

CPU = torch.device("cpu")


def test_auto_on_cpu_is_fp32_with_reason() -> None:
    policy = build_precision("auto", CPU)
    assert policy.used == "fp32" and policy.scaler is None and "6x slower" in policy.why


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        build_precision("fp16", CPU)


def test_bf16_on_cpu_autocasts_matmuls() -> None:
    policy = build_precision("bf16", CPU)
    with policy.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_cuda_device_missing_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
