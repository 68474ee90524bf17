"""Memory planning: estimate what an index build or a training run needs, and fail fast if it will not fit.

An index that outgrows RAM is found out hours into encoding, and an optimiser that outgrows the GPU
after the model has loaded. So the index build and the trainer first add up what they will hold
(`index_estimate`, `training_estimate`), compare it with the memory available now
(`available_bytes`: host RAM, or free GPU memory), and raise a `UserError` naming both figures and
a cheaper setting when it does not fit (`check_memory`). The estimates are deliberately simple sums
of the large arrays; `JOINTRAG_NO_MEMORY_CHECK=1` skips the check for users who know better (swap,
a memory map on a fast disk, an estimate that is too pessimistic for their data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

SKIP_ENV = "JOINTRAG_NO_MEMORY_CHECK"
GIB = 2**30
FLOAT32 = 4
# Activations a training step keeps for backward, in bytes per token, layer and hidden unit. Measured
# (benchmarks/memory_calibration.py; the table is in docs/performance.md): SmolLM2-135M, full
# fine-tuning, 8 and 20 sequences of 128 to 512 prompt tokens on the CPU, at most 86 in fp32 and 72
# under bf16 autocast (a sequence counted as its prompt and `ANSWER_TOKENS`, as the estimate counts
# it); these values are about 11% above. Korthikanti et al. 2022 ("Reducing activation
# recomputation in large transformer models", eq. 1) count 34 bytes at 16 bits for a GPT block; a
# Llama block keeps more (a SwiGLU MLP, RoPE, two RMSNorms), and bf16 autocast on the CPU saves only
# a sixth, as norms, softmax and the residual stream stay in float32. The measurements grow linearly
# with the tokens (SDPA keeps no tokens x tokens attention matrix); eager attention would need more.
ACTIVATION_BYTES = {"fp32": 96, "bf16": 80}
ANSWER_TOKENS = 32  # target tokens after the prompt, whose vocabulary logits a training step forms (the generator keeps only those)


@dataclass
class Estimate:
    """The memory a job needs: `what` it is, its large `parts` in bytes, what is `loaded` already, and
    a `suggestion` for a cheaper setting."""

    what: str
    parts: dict[str, int]
    suggestion: str
    loaded: int = 0
    device: str = field(default="cpu")

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def training_estimate(
    *, parameters: int, trainable: int, param_bytes: int, precision: str, sequences: int, tokens: int,
    hidden: int, layers: int, vocab: int, lora: bool, checkpointing: bool = False
) -> Estimate:
    """Memory of a training step: the weights (`param_bytes` each); for the trained ones fp32 master
    copies when the weights are held in lower precision (`train.precision`), and fp32 gradients and
    AdamW moments; and the activations of `sequences` sequences of `tokens` prompt tokens and
    `ANSWER_TOKENS` target tokens through `layers` layers of width `hidden` (`ACTIVATION_BYTES` per
    token, layer and hidden unit; with activation checkpointing, each layer's input and one layer's
    recomputation), plus the float32 logits and log-probabilities of the target tokens over the vocabulary."""
    positions = sequences * (tokens + ANSWER_TOKENS)
    kept = positions * hidden * (layers * param_bytes + ACTIVATION_BYTES[precision]) if checkpointing \
        else positions * layers * hidden * ACTIVATION_BYTES[precision]
    parts = {
        "weights": parameters * param_bytes,
        "master weights": trainable * FLOAT32 if param_bytes < FLOAT32 else 0,
        "gradients": trainable * FLOAT32,
        "AdamW state": 2 * trainable * FLOAT32,
        "activations": kept + sequences * ANSWER_TOKENS * vocab * 2 * FLOAT32,
    }
    what = f"training {parameters / 1e6:,.0f}M parameters ({trainable / 1e6:,.1f}M trainable, {precision}) on {sequences} sequences of {tokens} tokens"
    ways = ([] if lora else ["model.lora=true"]) + ([] if checkpointing else ["train.checkpointing=true"])
    suggestion = "use " + " or ".join(ways + ["a smaller train.batch_size (raise train.grad_accum to keep the batch) or method.k"])
    return Estimate(what, parts, suggestion)


def model_training_estimate(model: torch.nn.Module, *, sequences: int, tokens: int, precision: str,
                            checkpointing: bool = False) -> Estimate:
    """`training_estimate` for a built model: parameter counts from it, and layers, width and vocabulary
    from the largest Hugging Face model inside it (the generator). Its weights are already loaded."""
    # an FSDP shard (a DTensor) counts as the piece this rank holds
    params = [p.to_local() if hasattr(p, "to_local") else p for p in {id(p): p for p in model.parameters()}.values()]
    trainable = [p for p in params if p.requires_grad]
    hf = max((m for m in model.modules() if hasattr(getattr(m, "config", None), "vocab_size")),
             key=lambda m: sum(p.numel() for p in m.parameters()))
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    hidden = getattr(config, "hidden_size", None) or config.d_model
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    estimate = training_estimate(
        parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
        param_bytes=max(p.element_size() for p in params), precision=precision, sequences=sequences, tokens=tokens,
        hidden=hidden, layers=layers, vocab=config.vocab_size, lora=any("lora_" in name for name, _ in model.named_parameters()),
        checkpointing=checkpointing,
    )
    estimate.loaded = estimate.parts["weights"]
    estimate.device = str(next(iter(params)).device)
    return estimate


def check_training_memory(system: torch.nn.Module, *, batch_size: int, k: int, tokens: int, precision: str,
                          checkpointing: bool = False) -> Estimate:
    """Fail fast if training `system` (built, trainable flags set, optimiser not yet made) on micro-batches
    of `batch_size` examples with `k` passages each, prompts of up to `tokens` tokens, will not fit."""
    estimate = model_training_estimate(system, sequences=batch_size * k, tokens=tokens, precision=precision, checkpointing=checkpointing)
    check_memory(estimate)
    return estimate


def _host_available() -> int | None:
    """Available host memory: psutil's or /proc/meminfo's MemAvailable, capped by a cgroup v2 limit."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        meminfo = Path("/proc/meminfo")
        lines = meminfo.read_text().splitlines() if meminfo.is_file() else []
        found = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
        available = found[0] if found else None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory that can still be allocated on `device` (free GPU memory on CUDA); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _host_available() if device.type == "cpu" else None


def check_memory(estimate: Estimate, available: int | None = None) -> None:
    """Raise a UserError if `estimate` needs more than `available` (default: what `available_bytes`
    reports on the estimate's device) beyond what is loaded already; skipped by JOINTRAG_NO_MEMORY_CHECK=1."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    available = available_bytes(estimate.device) if available is None else available
    needed = estimate.total - estimate.loaded
    if available is None or needed <= available:
        return
    parts = ", ".join(f"{name} {gib(size)}" for name, size in estimate.parts.items())
    loaded = f", of which {gib(estimate.loaded)} is loaded already" if estimate.loaded else ""
    where = "GPU memory" if estimate.device.startswith("cuda") else "memory"
    raise UserError(
        f"{estimate.what} needs about {gib(estimate.total)} ({parts}){loaded}, but only {gib(available)} of {where} "
        f"is available; {estimate.suggestion}. Set {SKIP_ENV}=1 to skip this check."
    )
