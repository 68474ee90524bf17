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
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError


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
    if torch.cuda.is_available():
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise UserError(f"torchrun started more processes on this node than its {count} GPU(s); "
                            f"pass --nproc_per_node={count} or fewer")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield
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
    """Replace each gradient by its mean over ranks; a parameter without a gradient on a rank counts as zero."""
    if not active():
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    works = [dist.all_reduce(p.grad, async_op=True) for p in parameters]
    for work in works:
        work.wait()
    for p in parameters:
        p.grad.div_(world_size())


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
