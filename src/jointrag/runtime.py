"""Device and precision: the one place that decides where tensors live and which dtype math runs in."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix math is fast here: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 where the device runs it fast, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype a model's weights are held in for a resolved precision: bf16 weights run bf16 matrix
    math without autocast's per-call casts of every weight (training keeps fp32 master copies:
    `train.precision.MasterWeights`)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device, precision: str):
    """A bf16 autocast context for `bf16`, a no-op for `fp32`."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


DEVICE_VARIABLE = "JOINTRAG_DEVICE"  # set by `--device`: auto, cpu, cuda or cuda:N


def use_cuda() -> bool:
    """Whether models run on a GPU: one is available and `--device` does not say cpu."""
    return os.environ.get(DEVICE_VARIABLE, "auto") != "cpu" and torch.cuda.is_available()


def default_device() -> torch.device:
    """The device the generator runs on. `--device` (JOINTRAG_DEVICE) cpu, cuda or cuda:N when given;
    auto (the default): the current GPU when there is one (under torchrun, cuda:LOCAL_RANK:
    `distributed.process_group` selects it), else the CPU."""
    chosen = os.environ.get(DEVICE_VARIABLE, "auto")
    if chosen == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(chosen)
    except RuntimeError:
        raise UserError(f"--device {chosen}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {chosen}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {chosen}: no CUDA GPU is available to this torch {torch.__version__}")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError(f"--device {chosen}: under torchrun each process takes its own GPU (cuda:LOCAL_RANK); pass --device cuda")
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {chosen}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return device


def _glibc_trim():
    """glibc's `malloc_trim`, or None where the C library is not glibc (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _glibc_trim()


def release_freed_memory() -> None:
    """Hand the heap memory freed by a training step back to the system. Under glibc the step's
    activations, of other sizes at every step, leave the heap fragmented: measured on the demo recipe,
    the resident memory after a step grew by about 100 MiB a step (3.5 to 4.0 GiB in 5 steps), and
    with a trim after each step it started at 2.9 GiB and grew by about 45 MiB a step."""
    if _TRIM is not None:
        _TRIM(0)
