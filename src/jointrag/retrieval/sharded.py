"""Corpus encoding and search sharded over the ranks of a torch.distributed job (run under torchrun).

Each of the W ranks holds a contiguous 1/W of the corpus rows (`shard_rows`; the first N mod W ranks
hold one row more): it encodes them itself (`ShardedIndex.encode`) or takes them from a built index
directory (`ShardedIndex.open`), and searches only them, so no rank holds the whole corpus and no rank
serves the others. `ShardedIndex.search` is collective: every rank calls it with its own queries (any
number, none included); the queries are all-gathered, every rank finds each query's top k in its
shard, the (scores, corpus rows) are all-gathered, and each rank keeps the top k of its own queries.
Results are ordered by score, then by row (`merge_topk`), so they do not depend on the number of
ranks, and they equal one process's search. Works with gloo (CPU tensors) and nccl (CUDA tensors);
without an initialised process group it is a single-process index over the whole corpus.

`build_index_sharded` is `index.build_index` with the encoding spread over the ranks (`jointrag index`
under torchrun): rank 0 stores the corpus and checks the memory, every rank encodes its rows straight
into the one embeddings file, and rank 0 builds the faiss structure and writes the manifest last. The
directory is the one a single process builds.

Shapes: n this rank's queries, Q all ranks' queries, W ranks, k results, D embedding size.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import distributed
from ..data.corpus import Corpus
from ..errors import UserError
from .index import (
    EMBEDDINGS, ExactIndex, FaissIndex, RetrievalIndex, build_index, check_encoder, encode_corpus, finish_build, index_estimate,
    read_manifest, stage_build,
)
from ..memory import check_memory
from .encoders import BiEncoder
from ..runtime import resolve_precision
from ..types import Passage

SHARD_KINDS = ("exact", "flat")


def shard_rows(count: int, rank: int, world: int) -> range:
    """The contiguous rows of a `count`-row corpus that `rank` of `world` holds."""
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def merge_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of (n, M) candidates: score descending, then row ascending; -1 rows (no result) last."""
    last = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    order = np.lexsort((last, -scores))[:, :k]  # sorts each row by -score, then by row
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `x`, in rank order; their first dimensions may differ."""
    if not dist.is_initialized():
        return [x]
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device), group=group)
    sizes = [int(size) for size in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: len(x)] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [tensor[:size] for tensor, size in zip(gathered, sizes)]


def _check_shard_memory(kind: str, rows: range, dim: int) -> None:
    """Fail fast if the shards of this host's ranks (torchrun's LOCAL_WORLD_SIZE) will not fit its memory."""
    check_memory(index_estimate(kind, len(rows) * int(os.environ.get("LOCAL_WORLD_SIZE", 1)), dim))


class ShardedIndex:
    """This rank's shard, rows `rows` of a `total`-row corpus, searched together with the other ranks'."""

    def __init__(self, embeddings: np.ndarray, rows: range, total: int, kind: str = "exact", group=None):
        if kind not in SHARD_KINDS:
            raise UserError(f"a sharded index is one of {', '.join(SHARD_KINDS)}, not '{kind}'")
        if len(embeddings) != len(rows):
            raise ValueError(f"{len(embeddings)} embeddings for the {len(rows)} rows {rows}")
        self.rows, self.total, self.kind, self.group = rows, total, kind, group
        self.local = ExactIndex(embeddings) if kind == "exact" else FaissIndex.build(embeddings, "flat", {})

    @classmethod
    def encode(cls, retriever: BiEncoder, corpus: Corpus, *, kind: str = "exact", batch_size: int = 64,
               precision: str = "fp32", group=None) -> "ShardedIndex":
        """Encode this rank's rows of `corpus` with the passage tower (place it on this rank's device first)."""
        rank, world = _rank_world(group)
        rows = shard_rows(len(corpus), rank, world)
        _check_shard_memory(kind, rows, retriever.passage_encoder.dim)
        embeddings = encode_corpus(retriever, corpus, None, batch_size=batch_size, precision=precision, rows=rows, progress=rank == 0)
        return cls(embeddings, rows, len(corpus), kind, group)

    @classmethod
    def open(cls, directory: Path | str, retriever: BiEncoder | None = None, *, kind: str = "exact", group=None) -> "ShardedIndex":
        """This rank's rows of a built dense index's stored embeddings (memory-mapped for `exact`: only
        the shard is read). With `retriever`, refuse an index built by another passage tower."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest["kind"] == "bm25":
            raise UserError(f"{directory}: a bm25 index has no embeddings to shard; build a dense index")
        if retriever is not None:
            check_encoder(manifest, retriever, directory)
        stored = np.load(directory / EMBEDDINGS, mmap_mode="r")
        rank, world = _rank_world(group)
        rows = shard_rows(len(stored), rank, world)
        _check_shard_memory(kind, rows, stored.shape[1])
        return cls(stored[rows.start : rows.stop], rows, len(stored), kind, group)

    def _device(self) -> torch.device:
        if dist.is_initialized() and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (n, k), corpus rows (n, k)) of this rank's queries (n, D) over the whole corpus,
        -1 rows where it has fewer than k. Collective: every rank of the group must call it."""
        device = self._device()
        mine = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(device)
        everyone = _all_gather(mine, self.group)  # W x (n_r, D)
        scores, rows = self.local.search(torch.cat(everyone).cpu().numpy(), k)  # (Q, k), shard rows
        rows = np.where(rows >= 0, rows + self.rows.start, -1)
        all_scores = _all_gather(torch.from_numpy(scores).to(device), self.group)  # W x (Q, k)
        all_rows = _all_gather(torch.from_numpy(rows).to(device), self.group)
        rank, _ = _rank_world(self.group)
        start = sum(len(q) for q in everyone[:rank])
        mine_only = slice(start, start + len(mine))
        candidates = [np.concatenate([t[mine_only].cpu().numpy() for t in gathered], 1) for gathered in (all_scores, all_rows)]
        return merge_topk(*candidates, k)  # (n, W * k) -> (n, k)


def build_index_sharded(
    passages: Iterable[Passage], out: Path | str, *, retriever: BiEncoder | None, kind: str = "exact", params: dict | None = None,
    batch_size: int = 64, precision: str = "auto", source: str | None = None, memory_check: bool = True, chunk: int = 8192,
) -> RetrievalIndex | None:
    """`index.build_index` over the ranks of the default process group; collective. Rank 0 stores the
    corpus in a temporary sibling of `out`, checks the memory and creates the (N, D) embeddings file;
    each rank encodes its `shard_rows` of the stored corpus into that file, `chunk` passages at a time;
    after a barrier rank 0 alone builds the faiss structure, writes the manifest and moves the directory
    into place, while the other ranks are done. `out` must be on a filesystem every rank sees. The
    result equals one process's build, embeddings up to rounding (a rank batches only its own rows).
    Returns the index on rank 0 and None on the others; one process (or bm25): `build_index` itself."""
    rank, world = _rank_world(None)
    if world == 1 or kind == "bm25":
        return build_index(passages, out, retriever=retriever, kind=kind, params=params, batch_size=batch_size,
                           precision=precision, source=source, memory_check=memory_check) if rank == 0 else None
    started = time.time()
    out = Path(out).resolve()
    job = None
    if rank == 0:
        try:
            tmp, _, params = stage_build(passages, out, retriever=retriever, kind=kind, params=params, memory_check=memory_check)
            shape = (len(Corpus.open(tmp)), retriever.passage_encoder.dim)
            np.lib.format.open_memmap(tmp / EMBEDDINGS, mode="w+", dtype=np.float32, shape=shape).flush()
            job = {"tmp": str(tmp), "params": params}
        except UserError as error:
            job = {"error": str(error)}
    job = distributed.from_main(job)
    if "error" in job:
        raise UserError(job["error"])
    tmp = Path(job["tmp"])
    if not (tmp / EMBEDDINGS).is_file():
        raise UserError(f"rank {rank} does not see {tmp}, which rank 0 made: --out must be on a filesystem every node shares")
    try:
        corpus, embeddings = Corpus.open(tmp), np.load(tmp / EMBEDDINGS, mmap_mode="r+")
        rows, tower = shard_rows(len(corpus), rank, world), retriever.passage_encoder
        precision = resolve_precision(precision, tower.device)
        with tqdm(total=len(rows), unit="passage", desc=f"encoding corpus (rank 0 of {world})", dynamic_ncols=True, disable=rank != 0) as bar:
            for start in range(rows.start, rows.stop, chunk):
                part = range(start, min(start + chunk, rows.stop))
                embeddings[part.start : part.stop] = tower.encode(retriever.passage_texts(corpus.get(part)), batch_size, precision, bar.update)
        embeddings.flush()
        del embeddings
        distributed.barrier()
        if rank:
            return None
        finish_build(tmp, out, corpus, np.load(tmp / EMBEDDINGS, mmap_mode="r"), retriever=retriever, kind=kind,
                     params=job["params"], precision=precision, source=source, started=started)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RetrievalIndex.open(out, retriever)
