"""Precision policies: fp32, fp16 (autocast + dynamic loss scaling), bf16 (autocast), auto.

`auto` picks the fastest numerically safe policy for the device: bf16 on CUDA devices that
support it, fp16 with loss scaling on older CUDA devices, fp32 on the CPU (bf16 autocast was
measured ~6x slower than fp32 on this project's CPUs, which have no native bf16).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import ContextManager

import torch

from effitrain.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PrecisionPolicy:
    """What a training step runs under.

    Attributes:
        requested: the configured policy (fp32, fp16, bf16 or auto).
        used: the policy in force (never auto).
        why: one sentence saying why `used` was chosen.
        device: the run device.
        scaler: the fp16 gradient scaler (None unless `used` is fp16).
        max_skipped_steps: fp16 stops training after this many overflowing steps in a row.
    """

    requested: str
    used: str
    why: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)
    max_skipped_steps: int = 100

    @property
    def dtype(self) -> torch.dtype:
        """The dtype layers compute in: the autocast dtype (fp16/bf16), else fp32."""
        return _DTYPES.get(self.used, torch.float32)

    def autocast(self) -> ContextManager:
        """Context for the forward pass and loss: autocast for fp16/bf16, nothing for fp32."""
        if self.used == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def as_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "used": self.used, "why": self.why}


def _choose(requested: str, device: torch.device) -> tuple[str, str]:
    """Return (policy, reason) for `requested` on `device`."""
    on_cuda = device.type == "cuda"
    if requested == "fp32":
        return "fp32", "requested"
    if requested == "fp16":
        if not on_cuda:
            raise ConfigError(
                f"precision=fp16 needs a CUDA device, this run is on {device} "
                "(allowed here: precision=fp32, bf16 or auto)"
            )
        return "fp16", "requested"
    if requested == "bf16":
        if on_cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support (allowed: fp16, fp32, auto)")
        if not on_cuda:
            log.warning("precision=bf16 on the CPU: bf16 autocast was measured ~6x slower than fp32 on CPUs without native bf16")
        return "bf16", "requested"
    if on_cuda and torch.cuda.is_bf16_supported():
        return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16 (fp32 range, no loss scaling needed)"
    if on_cuda:
        return "fp16", f"auto: {torch.cuda.get_device_name(device)} lacks bf16; fp16 with dynamic loss scaling"
    return "fp32", "auto: on the CPU fp32 is fastest (bf16 autocast measured ~6x slower; fp16 has no CPU training path)"


def build_precision(
    policy: str, device: torch.device, init_scale: float = 65536.0, growth_interval: int = 2000, max_skipped_steps: int = 100
) -> PrecisionPolicy:
    """Resolve the configured `policy` on `device` into a PrecisionPolicy.

    Args:
        policy: fp32, fp16, bf16 or auto.
        device: the run device.
        init_scale: fp16's first loss scale.
        growth_interval: fp16 steps without overflow before the scale doubles.
        max_skipped_steps: fp16 overflowing steps in a row before training stops.

    Returns:
        The policy in force, with the reason for it.

    Raises:
        ConfigError: fp16 off CUDA, or bf16 on a GPU without it.
    """
    used, why = _choose(policy, device)
    scaler = None
    if used == "fp16":
        scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
    return PrecisionPolicy(requested=policy, used=used, why=why, device=device, scaler=scaler, max_skipped_steps=max_skipped_steps)


def resolve_device(name: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a torch device, checking it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device = {name!r}: no CUDA device is available here (allowed: cpu, auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device = {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
