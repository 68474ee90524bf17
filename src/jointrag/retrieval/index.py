"""Vector and sparse indexes behind one search contract, and the index directory that holds them.

The contract is faiss's: `search(x (n, D), k) -> (scores (n, k), ids (n, k))`, ids are corpus rows,
-1 where fewer than k results exist. Kinds: "exact" (blockwise inner product over the stored embeddings),
"flat", "hnsw", "ivfpq" (faiss), and "bm25" (bm25s; it searches texts, not vectors).

An index directory holds the corpus store, `embeddings.npy` (the passage-tower embeddings, kept so
that training can score candidates without re-encoding them), the index files, and `manifest.json`,
written last: a directory without a manifest is not an index. A build goes to a temporary sibling
directory and replaces the target only when complete, so a failed build leaves an earlier index intact.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.corpus import ARROW_NAME, Corpus
from ..errors import UserError
from ..io import staging_directory, swap_in
from ..memory import FLOAT32, Estimate, check_memory, gib
from .encoders import BiEncoder
from ..runtime import resolve_precision
from ..types import Passage

ADD_BATCH = 100_000  # vectors `FaissIndex.build` adds to an IVF-PQ index at once
BYTES_PER_WORD = 6  # English text, word plus space: turns a corpus size into a BM25 token count

KINDS = ("exact", "flat", "hnsw", "ivfpq", "bm25")
SETTINGS = {"hnsw": ("M", "ef_construction", "ef_search"), "ivfpq": ("nlist", "m", "nbits", "nprobe", "rerank")}  # --param of `index`
SEARCH_SETTINGS = {"hnsw": ("ef_search",), "ivfpq": ("nprobe", "rerank")}  # --param when searching


def check_setting_names(kind: str, params: dict, allowed: dict[str, tuple[str, ...]], what: str) -> None:
    """Refuse a setting the index kind does not have (it would be ignored), naming the ones it has."""
    names = allowed.get(kind, ())
    unknown = sorted(set(params) - set(names))
    if unknown:
        takes = f"it takes {', '.join(names)}" if names else "it takes none"
        article = "an" if kind[0] in "aeioh" else "a"
        raise UserError(f"{what} '{unknown[0]}' does not apply to {article} '{kind}' index; {takes}")
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"


class VectorIndex(Protocol):
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, directory: Path) -> None: ...


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (n, k') results to (n, k) with -inf scores and -1 ids."""
    n, found = ids.shape
    if found == k:
        return scores, ids
    pad_scores = np.full((n, k - found), -np.inf, dtype=np.float32)
    pad_ids = np.full((n, k - found), -1, dtype=np.int64)
    return np.concatenate([scores, pad_scores], 1), np.concatenate([ids, pad_ids], 1)


class ExactIndex:
    """Exact maximum inner product search over (N, D) embeddings, which may be memory-mapped.

    The corpus is scanned in blocks, so only one block need be in memory at a time. Each block is
    searched with `faiss.knn`, the brute-force kernel behind IndexFlatIP (BLAS scores, fused top-k),
    without copying the corpus into an index; its top k are merged into the running best.
    """

    def __init__(self, embeddings: np.ndarray, block: int = 262_144):
        self.embeddings = embeddings
        self.block = block

    def __len__(self) -> int:
        return len(self.embeddings)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        queries = np.ascontiguousarray(x, dtype=np.float32)  # (n, D)
        best_scores = np.empty((len(queries), 0), dtype=np.float32)
        best_ids = np.empty((len(queries), 0), dtype=np.int64)
        for start in range(0, len(self.embeddings), self.block):
            block = np.ascontiguousarray(self.embeddings[start : start + self.block], dtype=np.float32)
            # at most len(block) results, so faiss never pads (with -1 ids that the offset would corrupt)
            scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            merged_scores = np.concatenate([best_scores, scores], 1)  # (n, <= 2k)
            merged_ids = np.concatenate([best_ids, ids + start], 1)
            keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]  # stable: earlier rows win ties
            best_scores = np.take_along_axis(merged_scores, keep, 1)
            best_ids = np.take_along_axis(merged_ids, keep, 1)
        return _pad(best_scores, best_ids, k)

    def save(self, directory: Path) -> None:
        """Nothing to write: the embeddings file is the index."""


class FaissIndex:
    """A faiss inner-product index: flat, HNSW or IVF-PQ.

    IVF-PQ scores candidates with its compressed codes, which are too coarse to order the top k of a
    large corpus (recall@10 against exact search 0.6-0.75 in benchmarks/bench_scale.py). So by
    default it re-ranks: the search setting `rerank` (R, default `RERANK`) makes faiss return k·R
    candidates, whose exact inner products are recomputed from the float32 `embeddings` (the index
    directory's `embeddings.npy`, memory-mapped, so RAM holds only the rows read), and keeps the best
    k; the returned scores are then exact too. `rerank=0` turns it off (faiss's approximate scores).
    Flat and HNSW keep full vectors and never re-rank.
    """

    RERANK = 20  # IVF-PQ candidates per result re-scored exactly
    PROBE_FRACTION = 32  # IVF-PQ probes about 1/32 of its lists by default: a power of 2, at least 16
    # IVF-PQ training vectors per list (faiss wants >= 39). faiss's own cap, 256, took 2.8x as long to build at
    # 1M x 384 for 1.3 points more recall@10 without re-ranking (benchmarks/bench_scale.py)
    TRAIN_PER_LIST = 64

    def __init__(self, index, kind: str, embeddings: np.ndarray | None = None):
        self.index = index
        self.kind = kind
        self.embeddings = embeddings  # (N, D) float32, may be memory-mapped; for re-ranking
        self.rerank = 0
        self.ef_search = 128

    def __len__(self) -> int:
        return self.index.ntotal

    @staticmethod
    def default_params(kind: str, count: int, dim: int) -> dict:
        """Build and search settings; IVF-PQ's adapt to the corpus size so small corpora still train."""
        if kind == "hnsw":
            return {"M": 32, "ef_construction": 200, "ef_search": 128}
        if kind == "ivfpq":
            m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m > 0 and dim % m == 0)
            nlist = max(1, min(int(4 * math.sqrt(count)), count // 39))
            return {
                "nlist": nlist,
                "m": m,
                "nbits": 8 if count >= 256 * 39 else max(1, min(8, int(math.log2(max(count, 2))) - 1)),
                "nprobe": 2 ** max(4, round(math.log2(nlist / FaissIndex.PROBE_FRACTION))),
                "rerank": FaissIndex.RERANK,
            }
        return {}

    @staticmethod
    def train_size(count: int, params: dict) -> int:
        """IVF-PQ training sample: `TRAIN_PER_LIST` vectors per list for the coarse k-means, and at least
        the 256 per PQ centroid that faiss's PQ k-means uses, never more than the corpus."""
        return min(count, max(FaissIndex.TRAIN_PER_LIST * params["nlist"], 256 * 2 ** params["nbits"]))

    @staticmethod
    def check_values(params: dict) -> None:
        for key, value in params.items():
            if key == "rerank":
                if not isinstance(value, int) or value < 0:
                    raise UserError(f"index setting rerank={value!r} must be a non-negative integer (0: no re-ranking)")
            elif not isinstance(value, int) or value < 1:
                raise UserError(f"index setting {key}={value!r} must be a positive integer")

    @staticmethod
    def check_params(kind: str, params: dict, count: int, dim: int) -> None:
        """Refuse settings faiss would crash on, with the reason and the allowed range."""
        FaissIndex.check_values(params)
        if kind == "ivfpq":
            if params["nlist"] > count:
                raise UserError(f"nlist={params['nlist']} is larger than the corpus ({count} passages); use nlist <= {count}")
            if dim % params["m"]:
                raise UserError(f"m={params['m']} must divide the embedding dimension {dim}")
            if 2 ** params["nbits"] > count or params["nbits"] > 16:
                raise UserError(f"nbits={params['nbits']} needs at least {2 ** params['nbits']} passages to train (corpus: {count}) and at most 16")

    @classmethod
    def build(cls, embeddings: np.ndarray, kind: str, params: dict, batch: int = ADD_BATCH) -> "FaissIndex":
        """Build over (N, D) `embeddings` (may be memory-mapped; kept for IVF-PQ re-ranking, not copied)."""
        import faiss

        count, dim = embeddings.shape
        cls.check_params(kind, params, count, dim)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
        else:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
            size = cls.train_size(count, params)
            sample = slice(None) if size == count else np.sort(np.random.default_rng(0).choice(count, size=size, replace=False))
            index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))  # no copy of an in-memory float32 corpus
        if kind == "ivfpq":  # in batches: faiss computes float32 residuals for every vector it adds at once
            for start in range(0, count, batch):
                index.add(np.ascontiguousarray(embeddings[start : start + batch], dtype=np.float32))
        else:  # at once: growing the stored vectors batch by batch briefly held ~2x them (1M x 384: 2.4 GiB, not 1.4)
            index.add(np.ascontiguousarray(embeddings, dtype=np.float32))  # no copy of a float32 array or memory map
        built = cls(index, kind, embeddings if kind == "ivfpq" else None)
        built.configure(params)
        return built

    def configure(self, params: dict) -> None:
        """Apply search-time settings (HNSW efSearch, IVF nprobe, IVF-PQ rerank)."""
        import faiss

        if self.kind == "hnsw":
            self.ef_search = params.get("ef_search", 128)
        elif self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = params.get("nprobe", 16)
            rerank = params.get("rerank", self.RERANK)
            if not isinstance(rerank, int) or rerank < 0:
                raise UserError(f"index setting rerank={rerank!r} must be a non-negative integer (0: no re-ranking)")
            if rerank and self.embeddings is None:
                raise UserError("rerank needs the index's float32 embeddings (embeddings.npy); set rerank=0 to search without them")
            self.rerank = rerank

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(x, dtype=np.float32)  # (n, D)
        if self.rerank:
            _, candidates = self.index.search(queries, k * self.rerank)  # (n, k·R)
            return self._rescore(queries, candidates.astype(np.int64), k)
        if self.kind == "hnsw":  # HNSW finds at most efSearch neighbours: never fewer than the k asked for
            self.index.hnsw.efSearch = max(self.ef_search, k)
        scores, ids = self.index.search(queries, k)
        scores[ids < 0] = -np.inf  # faiss pads with -FLT_MAX; the contract says -inf
        return scores, ids.astype(np.int64)

    def _rescore(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query (n, D) with its candidates (n, k·R; -1: none), best k first.
        One query at a time, so its candidates' rows (k·R·D floats) stay in cache between the gather
        and the product."""
        stored = np.asarray(self.embeddings)  # a memory map as a plain array: no np.memmap indexing overhead
        exact = np.full(candidates.shape, -np.inf, dtype=np.float32)  # (n, k·R)
        for i, (rows, query) in enumerate(zip(candidates, queries)):
            valid = rows >= 0
            exact[i, valid] = np.asarray(stored[rows[valid]], dtype=np.float32) @ query
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # stable: faiss's order breaks ties
        scores = np.take_along_axis(exact, best, 1)
        ids = np.where(np.isneginf(scores), -1, np.take_along_axis(candidates, best, 1))
        return scores, ids

    def save(self, directory: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(directory / "index.faiss"))

    @classmethod
    def load(cls, directory: Path, kind: str, params: dict) -> "FaissIndex":
        """Read `index.faiss` (and, for IVF-PQ, memory-map `embeddings.npy` for re-ranking) and apply `params`."""
        import faiss

        stored = directory / EMBEDDINGS
        embeddings = np.load(stored, mmap_mode="r") if kind == "ivfpq" and stored.is_file() else None
        path = directory / "index.faiss"
        if not path.is_file():
            raise UserError(f"{path}: missing; the index is damaged: rebuild it")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise UserError(f"{path}: unreadable or truncated ({str(error).strip().splitlines()[-1]}); rebuild the index") from None
        loaded = cls(index, kind, embeddings)
        loaded.configure(params)
        return loaded


class BM25Index:
    """Sparse BM25 baseline (bm25s); searches query texts instead of vectors."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def build(cls, texts: list[str]) -> "BM25Index":
        import bm25s

        model = bm25s.BM25()
        model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        return cls(model)

    def search_texts(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        import bm25s

        count = self.model.scores["num_docs"]
        tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        ids, scores = self.model.retrieve(tokens, k=min(k, count), show_progress=False, n_threads=0)
        return _pad(scores.astype(np.float32), ids.astype(np.int64), k)

    def save(self, directory: Path) -> None:
        self.model.save(str(directory / "bm25"))

    @classmethod
    def load(cls, directory: Path) -> "BM25Index":
        import bm25s

        return cls(bm25s.BM25.load(str(directory / "bm25")))


def encode_corpus(
    retriever: BiEncoder, corpus: Corpus, path: Path | None, *, batch_size: int = 64, precision: str = "fp32", chunk: int = 8192,
    rows: range | None = None, progress: bool = True,
) -> np.ndarray:
    """Encode the passages at `rows` (default: all) with the passage tower into (len(rows), D) float32:
    a memory-mapped file at `path`, or an array in memory when `path` is None.

    Passages are read and encoded `chunk` at a time, so memory stays flat whatever the corpus size.
    """
    tower = retriever.passage_encoder
    rows = range(len(corpus)) if rows is None else rows
    shape = (len(rows), tower.dim)
    embeddings = np.empty(shape, np.float32) if path is None else np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    with tqdm(total=len(rows), unit="passage", desc="encoding corpus", dynamic_ncols=True, disable=not progress) as bar:
        for start in range(0, len(rows), chunk):
            passages = corpus.get(rows[start : start + chunk])
            embeddings[start : start + len(passages)] = tower.encode(retriever.passage_texts(passages), batch_size, precision, bar.update)
    if path is not None:
        embeddings.flush()
    return embeddings


def _replace_directory(new: Path, target: Path) -> None:
    """Move a complete build into place; an existing index there is swapped out, not overwritten."""
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise UserError(f"{target} exists and is not an index directory; choose another --out")
    swap_in(new, target)


def build_index(
    passages: Iterable[Passage],
    out: Path | str,
    *,
    retriever: BiEncoder | None,
    kind: str = "exact",
    params: dict | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    source: str | None = None,
    memory_check: bool = True,
) -> "RetrievalIndex":
    """Store the corpus, encode it, build the index and write the manifest last. Once the corpus is
    stored, and before encoding, the memory the index needs is checked (`memory.check_memory`)."""
    started = time.time()
    out = Path(out).resolve()
    tmp, corpus, params = stage_build(passages, out, retriever=retriever, kind=kind, params=params, memory_check=memory_check)
    try:
        embeddings = None
        if kind != "bm25":
            precision = resolve_precision(precision, retriever.passage_encoder.device)
            embeddings = encode_corpus(retriever, corpus, tmp / EMBEDDINGS, batch_size=batch_size, precision=precision)
        finish_build(tmp, out, corpus, embeddings, retriever=retriever, kind=kind, params=params, precision=precision,
                     source=source, started=started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RetrievalIndex.open(out, retriever)


def stage_build(passages: Iterable[Passage], out: Path, *, retriever: BiEncoder | None, kind: str, params: dict | None,
                memory_check: bool) -> tuple[Path, Corpus, dict]:
    """The first part of a build: check the settings, store the corpus in a temporary sibling of `out`
    and check the memory the index needs. (temporary directory, corpus, index settings)."""
    if kind not in KINDS:
        raise UserError(f"index kind must be one of {', '.join(KINDS)}, not '{kind}'")
    if kind != "bm25" and retriever is None:
        raise UserError(f"a '{kind}' index needs a retriever to encode the corpus")
    check_setting_names(kind, params or {}, SETTINGS, "index setting")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise UserError(f"{out} exists and is not an index directory; choose another --out")
    tmp = staging_directory(out)
    try:
        corpus = Corpus.build(passages, tmp)
        dim = None if retriever is None else retriever.passage_encoder.dim
        if kind != "bm25":
            params = {**FaissIndex.default_params(kind, len(corpus), dim), **(params or {})}
        if kind in ("flat", "hnsw", "ivfpq"):
            FaissIndex.check_params(kind, params, len(corpus), dim)
        if memory_check:
            check_memory(index_estimate(kind, len(corpus), dim, params, text_bytes=(tmp / ARROW_NAME).stat().st_size))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, corpus, params or {}


def finish_build(tmp: Path, out: Path, corpus: Corpus, embeddings: np.ndarray | None, *, retriever: BiEncoder | None, kind: str,
                 params: dict, precision: str, source: str | None, started: float) -> None:
    """The last part of a build: the BM25 index, or the faiss structure over `embeddings` (stored in
    `tmp`), then the manifest, written last, and `tmp` moved into place as `out`."""
    manifest: dict = {"format": 1, "kind": kind, "count": len(corpus)}
    if kind == "bm25":
        texts = [f"{p.title} {p.text}" for batch in corpus.iter_batches(8192) for p in batch]
        BM25Index.build(texts).save(tmp)
        manifest["encoder"] = None
    else:
        manifest["precision"] = precision
        if kind != "exact":
            FaissIndex.build(embeddings, kind, params).save(tmp)
        manifest["encoder"] = retriever.identity()
        manifest["dim"] = int(embeddings.shape[1])
    manifest["params"] = params
    manifest["corpus"] = {"fingerprint": corpus.fingerprint, "count": len(corpus), "source": source}
    manifest["build_seconds"] = round(time.time() - started, 1)
    manifest["jointrag_version"] = __version__
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _replace_directory(tmp, out)


def read_manifest(directory: Path | str) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{directory} is not an index (no {MANIFEST}); build one with `jointrag index --corpus PATH --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error}); rebuild the index") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object; rebuild the index")
    dense = manifest.get("kind") != "bm25"
    for key, kind in (("kind", str), ("count", int), ("corpus", dict), ("params", dict)) + ((("encoder", dict), ("dim", int)) if dense else ()):
        if not isinstance(manifest.get(key), kind):
            raise UserError(f"{path}: field '{key}' is missing or not a {kind.__name__}; the index is damaged: rebuild it")
    if manifest["kind"] not in KINDS or not isinstance(manifest["corpus"].get("fingerprint"), str):
        raise UserError(f"{path}: field '{'kind' if manifest['kind'] not in KINDS else 'corpus.fingerprint'}' is not one "
                        "jointrag writes; the index is damaged: rebuild it")
    return manifest


def stored_embeddings(directory: Path, manifest: dict) -> np.ndarray:
    """The index's (N, D) passage embeddings, memory-mapped, checked against its manifest."""
    path = directory / EMBEDDINGS
    try:
        embeddings = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the index is damaged: rebuild it") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable or truncated ({error}); rebuild the index") from None
    expected = (manifest["count"], manifest["dim"])
    if embeddings.shape != expected:
        raise UserError(f"{path}: holds {embeddings.shape[0]} x {embeddings.shape[1] if embeddings.ndim > 1 else '?'} "
                        f"embeddings, the manifest {expected[0]} x {expected[1]}; it belongs to another index: rebuild it")
    return embeddings


def check_encoder(manifest: dict, retriever: BiEncoder, directory: Path, built_by: str | None = None) -> None:
    """Refuse to search an index with a passage tower other than the one that built it. `built_by`: the
    fingerprint of the tower that built it, when a training checkpoint records it (a stale index between refreshes)."""
    built = manifest["encoder"]
    current = retriever.identity()
    if built_by is not None:
        current["fingerprint"] = built_by
    diffs = [key for key in ("fingerprint", "pooling", "normalize", "max_length", "passage_template", "dim") if built.get(key) != current[key]]
    if diffs:
        raise UserError(
            f"index {directory} was built with passage encoder '{built['name']}' "
            f"(fingerprint {built['fingerprint']}), but the retriever given is '{current['name']}' "
            f"(fingerprint {current['fingerprint']}); they differ in {', '.join(diffs)}. "
            "Use the encoder that built the index, or rebuild it with `jointrag index`."
        )


class RetrievalIndex:
    """An opened index directory: corpus, vectors (or BM25), manifest, and the retriever to query it."""

    def __init__(self, directory: Path, manifest: dict, corpus: Corpus, retriever: BiEncoder | None, vectors, bm25):
        self.directory = directory
        self.manifest = manifest
        self.corpus = corpus
        self.retriever = retriever
        self.vectors = vectors
        self.bm25 = bm25

    @classmethod
    def open(cls, directory: Path | str, retriever: BiEncoder | None = None, search_params: dict | None = None,
             built_by: str | None = None) -> "RetrievalIndex":
        """Open and verify an index. A dense index needs the retriever whose passage tower built it."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        corpus = Corpus.open(directory)
        if corpus.fingerprint != manifest["corpus"]["fingerprint"]:
            raise UserError(f"{directory}: the corpus does not match the one the index was built over; rebuild it")
        kind = manifest["kind"]
        check_setting_names(kind, search_params or {}, SEARCH_SETTINGS, "search setting")
        FaissIndex.check_values(search_params or {})
        if kind == "bm25":
            return cls(directory, manifest, corpus, retriever, None, BM25Index.load(directory))
        if retriever is None:
            raise UserError(f"a '{kind}' index needs a retriever to encode queries")
        check_encoder(manifest, retriever, directory, built_by)
        params = {**manifest.get("params", {}), **(search_params or {})}
        if kind == "exact":
            vectors = ExactIndex(stored_embeddings(directory, manifest))
        else:
            vectors = FaissIndex.load(directory, kind, params)
        return cls(directory, manifest, corpus, retriever, vectors, None)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def search(self, questions: Sequence[str], k: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (B, k), rows (B, k)) for each question, -1 rows where fewer exist. No gradient."""
        if self.bm25 is not None:
            return self.bm25.search_texts(questions, k)
        return self.search_embeddings(self.retriever.encode_queries(questions, batch_size), k)

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (B, k), rows (B, k)) for query embeddings (B, D) from any query tower."""
        if self.vectors is None:
            raise UserError(f"{self.directory}: a '{self.kind}' index cannot be searched with embeddings; use a dense index")
        return self.vectors.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def passages(self, rows: np.ndarray) -> list[list[Passage | None]]:
        """Passages for a (B, k) array of rows."""
        return [self.corpus.get(list(r)) for r in rows.tolist()]

    def embeddings(self, rows: np.ndarray) -> torch.Tensor:
        """Stored passage embeddings (B, K, D) of the given rows (row -1 gives zeros)."""
        stored = np.load(self.directory / EMBEDDINGS, mmap_mode="r")
        flat = rows.reshape(-1)
        out = np.zeros((len(flat), stored.shape[1]), dtype=np.float32)
        valid = flat >= 0
        out[valid] = stored[flat[valid]]
        return torch.from_numpy(out.reshape(*rows.shape, stored.shape[1]))


def index_estimate(kind: str, count: int, dim: int | None, params: dict | None = None, text_bytes: int = 0) -> Estimate:
    """Host memory to build and search an index of `count` passages of `dim` float32 values.

    exact: the vectors (memory-mapped: they need not fit, but search then reads them from disk each
    time); flat: the vectors; hnsw: the vectors and the graph, an int32 per link, 2M links on level 0
    and M on each of the expected 1/(M-1) upper levels, plus a level and an offset per node; ivfpq:
    the PQ codes and int64 ids of the inverted lists, the coarse and PQ centroids, the float32 training
    sample (`FaissIndex.train_size`) and its residuals for the PQ k-means, and the float32 residuals of a
    batch of vectors being added (the embeddings it re-ranks from stay memory-mapped); bm25: the corpus texts
    (`text_bytes`) held as Python strings, their token ids as Python ints, and the sparse score matrix.
    """
    params = {**FaissIndex.default_params(kind, count, dim or 1), **(params or {})}
    vectors = count * (dim or 0) * FLOAT32
    what = f"{'a' if kind == 'flat' else 'an'} {kind} index of {count:,} x {dim} float32"
    if kind in ("exact", "flat"):
        parts = {"vectors": vectors}
    elif kind == "hnsw":
        m = params["M"]
        parts = {"vectors": vectors, "graph": round(count * (FLOAT32 * (2 * m + m / max(m - 1, 1)) + 4 + 8))}
    elif kind == "ivfpq":
        nlist, m, nbits = params["nlist"], params["m"], params["nbits"]
        parts = {
            "codes and ids": count * (math.ceil(m * nbits / 8) + 8),
            "centroids": (nlist + 2**nbits) * dim * FLOAT32,
            "training sample": FaissIndex.train_size(count, params) * dim * FLOAT32,
            "training residuals": min(FaissIndex.train_size(count, params), 256 * 2**nbits) * dim * FLOAT32,
            "add batch": min(count, ADD_BATCH) * dim * FLOAT32,
        }
    else:
        what = f"a bm25 index of {count:,} passages ({gib(text_bytes)} of text)"
        words = text_bytes // BYTES_PER_WORD
        parts = {"texts": text_bytes + 50 * count, "token ids": words * 36, "score matrix": words * 8}
    return Estimate(what, parts, _index_suggestion(kind, count, dim, params))


def _index_suggestion(kind: str, count: int, dim: int | None, params: dict) -> str:
    if kind == "bm25":
        return "use a dense index (--kind ivfpq)"
    if kind == "ivfpq":
        return f"lower --param nlist (the build trains on {FaissIndex.TRAIN_PER_LIST} vectors per list) or --param m"
    ivfpq = index_estimate("ivfpq", count, dim).parts
    return (f"use --kind ivfpq: with the default settings its index holds {gib(ivfpq['codes and ids'] + ivfpq['centroids'])} "
            f"and its build needs {gib(ivfpq['training sample'] + ivfpq['training residuals'] + ivfpq['add batch'])} more "
            f"for training and adding vectors")
