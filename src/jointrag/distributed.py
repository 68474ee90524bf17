"""Multi-process training under `torchrun`: the process group and the few collectives the loop needs.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; without them (or with one process) every function
here is the single-process no-op, so the training loop has one code path. Each rank runs on its own
device (cuda:LOCAL_RANK; the CPU with gloo when there is no GPU).

Gradients are synchronised by an explicit all-reduce of the trainable parameters' gradients after the
last micro-batch of a step, not by wrapping the system in `DistributedDataParallel`: DDP prepares its
reducer in `forward()`, but an objective calls several methods of the system (search, prior scores,
generator log-probabilities) and never its `forward()`; most of the system is frozen, and which
parameters receive a gradient changes from batch to batch (JSA trains the generator on the sampled
passages only). One averaging all-reduce per optimiser step is exact for all of that, and with
gradient accumulation it runs once per step, as DDP's `no_sync` would.

With `train.fsdp` the generator is sharded instead (`shard_module`: PyTorch's FSDP2, `fully_shard`):
each rank holds 1/N of its weights, gradients and AdamW moments as DTensor shards, FSDP gathers a
block's weights for its forward and backward and reduce-scatters (averages) its gradients itself, so
`average_gradients` leaves sharded parameters alone and `clip_grad_norm` sums their squared gradients
over the ranks. Checkpoints hold whole tensors (`gathered`, collective) and are cut back into shards
on loading (`shard_like`, `shard_optimizer_state`), so they load with or without FSDP, on any number
of ranks.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .errors import UserError
from .runtime import use_cuda


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group(timeout_s: int):
    """Join torchrun's process group for the duration of a run (nccl on CUDA, gloo on the CPU).
    `timeout_s` bounds every wait, including the other ranks' wait while rank 0 evaluates alone."""
    if world_size() == 1 or active():
        yield
        return
    if use_cuda():
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise UserError(f"torchrun started more processes on this node than its {count} GPU(s); "
                            f"pass --nproc_per_node={count} or fewer")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda() else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()  # no rank tears its connections down while another still talks to it
    finally:
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where collective tensors live: the rank's GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(items: list) -> list:
    """This rank's contiguous slice of a global batch of world_size equal parts."""
    size = len(items) // world_size()
    return items[rank() * size : (rank() + 1) * size]


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_parameters(parameters: list[torch.Tensor]) -> None:
    """Start every rank from rank 0's weights."""
    if active():
        for p in parameters:
            dist.broadcast(p.data, 0)


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace each gradient by its mean over ranks; a parameter without a gradient on a rank counts as
    zero. FSDP shards are skipped: FSDP has averaged their gradients in the backward pass."""
    if not active():
        return
    parameters = [p for p in parameters if not isinstance(p, DTensor)]
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    works = [dist.all_reduce(p.grad, async_op=True) for p in parameters]
    for work in works:
        work.wait()
    for p in parameters:
        p.grad.div_(world_size())


def shard_module(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` (a Hugging Face model, or a PEFT model around one) over the ranks with FSDP2, and
    return the sharded root. Each transformer block (the classes in the model's `_no_split_modules`)
    is one unit, gathered for its forward and its backward and freed after; the rest (embeddings, tied
    head, final norm) is the root's, which FSDP keeps whole from its forward to the end of its backward
    (which needs it first), or from an explicit `root.unshard()` to the next backward. Parameter names
    do not change. Every rank must then run `model` the same number of times."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if hasattr(model, "get_base_model"):  # PEFT: its generate() calls the inner model, whose hooks must gather
        model = model.get_base_model()
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    # FSDP takes the first module to run forward as the root; an encoder-decoder's generate() runs
    # its encoder's blocks first, so make `model` the root now
    fully_shard.state(model)._lazy_init()
    # and gather each unit once now, so that its whole-weight buffers are not made under generate()'s
    # inference mode, where they could not be written by training afterwards
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()
    return model


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over parameters of which some may be FSDP shards: each rank
    holds another piece of those, so their squared gradients are summed over the ranks; the others'
    gradients are whole and alike on every rank (after `average_gradients`). Returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    with torch.no_grad():
        pieces = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        squares = [g.float().pow(2).sum() for g in pieces]
        sharded = torch.stack([s for s, g in zip(squares, grads) if isinstance(g, DTensor)]).sum()
        dist.all_reduce(sharded)
        whole = sum((s for s, g in zip(squares, grads) if not isinstance(g, DTensor)), torch.zeros((), device=sharded.device))
        total = (sharded + whole).sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grad_norm_
        for g in pieces:
            g.mul_(scale.to(g.device, g.dtype))
    return total


def gathered(value):
    """`value` (a tensor, or dicts, lists and tuples holding tensors, such as a state dict) with each
    FSDP shard replaced by its whole tensor. Collective when it holds shards: every rank calls it."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: gathered(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gathered(item) for item in value)
    return value


def shard_like(value: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """`value`, a whole tensor shaped like `reference`, cut as `reference` is if that is an FSDP shard
    (each rank keeps its own piece of its copy: no communication); else `value` itself."""
    if not isinstance(reference, DTensor):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach().to(reference.device, reference.dtype), reference.device_mesh, reference.placements, src_data_rank=None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a whole state (a checkpoint's), cut each FSDP-sharded
    parameter's state tensors (AdamW's moments) as the parameter is cut."""
    for p in (p for group in optimizer.param_groups for p in group["params"] if isinstance(p, DTensor)):
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:  # not AdamW's step
                state[key] = shard_like(value, p)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over ranks (every rank logs the same keys)."""
    if not active():
        return values
    keys = sorted(values)
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return dict(zip(keys, (total / world_size()).tolist()))


def all_gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def from_main(value):
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def share_example_state(objective, ids: list[str]) -> None:
    """Keep an objective's per-example state (dict entries keyed by example id, e.g. JSA's chain cache)
    the same on every rank: each rank sends the entries of the examples it just trained on and takes
    everyone else's, in rank order, which is the order of the global batch. Every rank then holds what
    one process would hold, so rank 0 saves the whole state and any world size can resume it."""
    if not active():
        return
    state = objective.state_dict()
    mine = {key: {i: table[i] for i in ids if i in table} for key, table in state.items() if isinstance(table, dict)}
    if not mine:
        return
    for theirs in all_gather(mine):
        for key, entries in theirs.items():
            state[key].update(entries)
    objective.load_state_dict(state)
