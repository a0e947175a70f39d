"""Where and in what precision models run: the device, the autocast dtype, the autocast context,
and torch.compile of a student (--compile)."""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch

from pepemb.cli import UserError

# For tests of the fp16 path only, not for training: PEPEMB_CPU_FP16=1 makes --fp16 on CPU run
# fp16 autocast and an enabled GradScaler("cpu"), as on CUDA, instead of warning and training fp32.
CPU_FP16 = "PEPEMB_CPU_FP16"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def resolve_precision(fp16: bool, bf16: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the student, or None for fp32. fp16 needs CUDA: elsewhere fp32,
    except on CPU with PEPEMB_CPU_FP16=1 (CPU_FP16), which tests the fp16 path there."""
    if fp16:
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and os.environ.get(CPU_FP16) == "1":
            print(f"note: {CPU_FP16}=1: fp16 autocast and GradScaler on CPU, for testing that path (slow)")
            return torch.float16
        warnings.warn(f"--fp16 needs a CUDA GPU; training in fp32 on {device.type}", stacklevel=2)
        return None
    if bf16:
        if device.type == "cpu":
            print(
                "note: bf16 on CPU runs through autocast; on CPUs without AMX/AVX512-BF16 it is "
                "several times slower than fp32"
            )
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def compiled(model: torch.nn.Module, student: torch.nn.Module, max_length: int) -> torch.nn.Module:
    """torch.compile(model) (the student, or a wrapper of it such as DDP's) for every batch shape
    up to max_length positions: shapes are dynamic, and the student's rotary table is grown to
    max_length first, since each growth of that buffer would otherwise recompile the graph."""
    student.rotary(max_length)
    return torch.compile(model, dynamic=True)
