"""The float precision a training run computes in. ``auto`` takes bf16 only where the device has it in hardware:
a CPU without AVX512-BF16 or AMX emulates bf16, and its autocast forward pass runs 4-5x slower than fp32."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PrecisionSetting = Literal["auto", "fp32", "bf16"]
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU features torch detected at run time; x86 ones carry /proc/cpuinfo's names."""
    return {name for name, present in torch.cpu.get_capabilities().items() if present is True}


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 in hardware, and what shows it."""
    if device.type == "cpu":
        found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
        if found:
            return True, f"this CPU has native bf16 ({'/'.join(found)})"
        return False, f"this CPU has no native bf16 (no {'/'.join(CPU_BF16_FLAGS)} flag)"
    if device.type == "cuda":
        with torch.cuda.device(device):
            name = torch.cuda.get_device_name()
            # Left to its default, the check also says yes for GPUs that only emulate bf16.
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return True, f"{name} has native bf16"
            return False, f"{name} has no native bf16"
    return False, f"auto does not look for native bf16 on {device.type} devices"


def resolve_precision(setting: PrecisionSetting, device: torch.device | str) -> tuple[Precision, str]:
    """The precision to train in on ``device``, and a one-line reason, e.g. ``fp32: this CPU has no native bf16
    (no avx512_bf16/amx_bf16 flag)``."""
    if setting == "fp32":
        return "fp32", "fp32: set by train.precision"
    native, why = native_bf16(torch.device(device))
    if setting == "bf16":
        if native:
            return "bf16", "bf16: set by train.precision"
        return "bf16", f"bf16: set by train.precision, although {why}: emulated, it can be slower than fp32"
    chosen = "bf16" if native else "fp32"
    return chosen, f"{chosen}: {why}"
