"""Search at scale (issue 8): flat, HNSW and IVF-PQ through jointrag against raw faiss, 100k and 1M vectors.

Run from the repository root (one thread: the figures are for one core):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py [--sizes 100000,1000000] [--quick]
        [--kinds flat,hnsw,ivfpq] [--queries 1000] [--repeats 5] [--no-calibration]
        [--real-index DIR --real-queries FILE.jsonl] [--out runs/bench/scale.json]

For every size and kind it builds our index (`FaissIndex.build` with `FaissIndex.default_params`,
saved and re-opened with `FaissIndex.load`, as `RetrievalIndex.open` does, so IVF-PQ re-ranks from the
memory-mapped `embeddings.npy`) and a raw faiss index with the same settings, built as faiss's docs
show (IVF-PQ: `train` on all the vectors, which faiss subsamples to 256 per list; ours trains on
`FaissIndex.train_size` vectors). It reports build time, the median time of a 1000-query, k=10
search (interleaved samples), recall@10 against exact search (`faiss.knn`), the serialised index
size, and memory read from /proc/self/status: the peak RSS growth during the build (VmHWM, reset
through /proc/self/clear_refs) and the anonymous memory the built / opened index keeps (RssAnon).
Above 200k vectors HNSW uses M=16, efConstruction=40 (`HNSW_LARGE`) on both sides: the default
(M=32, efConstruction=200) takes about 20 minutes per 1M build on one core. An IVF-PQ sweep shows
recall and latency over nprobe and rerank.

The vectors are synthetic (no 1M-passage corpus can be encoded here: MiniLM encodes ~30 passages/s
on this CPU) but shaped like MiniLM sentence embeddings (`synthetic_corpus`): unit vectors from a
hierarchy of anisotropic Gaussian clusters (domain > topic > subtopic > article > section >
passage), queries near (not at) corpus vectors. Uniform random vectors would be meaningless: they
have no neighbourhoods (IVF-PQ recall@10 0.05 at 100k). `--calibration` (on by default) encodes the
embedded SQuAD corpus and test questions with all-MiniLM-L6-v2 and prints their statistics next to
those of a 24-article sample of the synthetic 1M corpus. `--real-index` adds an IVF-PQ check on a
real index directory (its `embeddings.npy`) with real queries, next to a synthetic set of its size.

Prints the tables; writes everything to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench_retrieval import cpu_busy_seconds, cpu_model, log, quiet_stderr, timed_pairs

K = 10
GOAL_RECALL = 0.9  # IVF-PQ recall@10 against exact search at 1M
HNSW_LARGE = {"M": 16, "ef_construction": 40, "ef_search": 128}  # above HNSW_LARGE_FROM vectors, both sides
HNSW_LARGE_FROM = 200_000
SWEEP_NPROBE = (16, 32, 64, 128, 256)
SWEEP_RERANK = (0, 5, 10, 20)

# --- synthetic corpus shaped like MiniLM sentence embeddings ---------------------------------------------

# Variance of each level of the cluster hierarchy, as a share of a passage vector's squared norm before
# normalising. Passages of one article share 0.41 of it (SQuAD: mean cosine 0.41 within an article),
# of one section (5 consecutive passages) 0.61; the global mean direction gives unrelated passages a
# mean cosine of ~0.03. Every level draws from the same anisotropic spectrum, eigenvalue j ∝ j^-0.65
# in a random basis (participation ratio ~62, as SQuAD's MiniLM embeddings).
VARIANCE = {"global": 0.015, "domain": 0.06, "topic": 0.08, "subtopic": 0.1, "article": 0.155, "section": 0.2, "passage": 0.39}
SPECTRUM_DECAY = 0.65
FANOUT = 8  # subtopics per topic, etc. (on average; parents are drawn at random)
ARTICLE_SIZES = (20, 60)  # passages per article, uniform (SQuAD's 24 articles: 21-58)
SECTION = 5  # passages per section
QUERY_KEEP = 0.5  # share of its source passage's own deviation that a query keeps
QUERY_NOISE = 1.3  # variance of the query's fresh deviation


class World:
    """The cluster hierarchy of an n-passage corpus: articles and their centres; passages on demand."""

    def __init__(self, n: int, dim: int, seed: int):
        self.rng = np.random.default_rng(seed)
        spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -SPECTRUM_DECAY
        self.scale = np.sqrt(spectrum / spectrum.sum()).astype(np.float32)  # (D,)
        self.basis = np.linalg.qr(self.rng.standard_normal((dim, dim)))[0].astype(np.float32)
        sizes = self.rng.integers(ARTICLE_SIZES[0], ARTICLE_SIZES[1] + 1, size=n // ARTICLE_SIZES[0] + 2)
        sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
        sizes[-1] -= sizes.sum() - n  # exactly n passages
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        counts = [len(sizes)]
        for _ in ("subtopic", "topic", "domain"):
            counts.append(max(1, -(-counts[-1] // FANOUT)))
        glob = self.draw(1, 1.0)
        centres = glob * np.sqrt(VARIANCE["global"]) / np.linalg.norm(glob) + self.draw(counts[3], VARIANCE["domain"])
        for level, count, parents in (("topic", counts[2], counts[3]), ("subtopic", counts[1], counts[2]), ("article", counts[0], counts[1])):
            centres = centres[self.rng.integers(0, parents, count)] + self.draw(count, VARIANCE[level])
        self.article_centres = centres  # (A, D)

    def draw(self, count: int, variance: float) -> np.ndarray:
        """(count, D) anisotropic Gaussian deviations of total variance `variance`."""
        z = self.rng.standard_normal((count, len(self.scale)), dtype=np.float32)
        return (z * (self.scale * np.float32(np.sqrt(variance)))) @ self.basis.T

    def passages(self, articles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Unit vectors of the passages of `articles` (in order), their article ids, and the unnormalised
        cluster centre (article + section) and own deviation of each."""
        article = np.repeat(articles, self.sizes[articles])
        position = np.arange(len(article)) - np.repeat(np.cumsum(self.sizes[articles]) - self.sizes[articles], self.sizes[articles])
        new_section = np.r_[True, (article[1:] != article[:-1]) | (position[1:] // SECTION != position[:-1] // SECTION)]
        section = np.cumsum(new_section) - 1
        base = self.article_centres[article] + self.draw(section[-1] + 1, VARIANCE["section"])[section]
        own = self.draw(len(article), VARIANCE["passage"])
        x = base + own
        return x / np.linalg.norm(x, axis=1, keepdims=True), article, base, own

    def queries(self, base: np.ndarray, own: np.ndarray) -> np.ndarray:
        """A query near each passage: its cluster centre, part of its own deviation, fresh deviation."""
        q = base + QUERY_KEEP * own + self.draw(len(base), QUERY_NOISE)
        return q / np.linalg.norm(q, axis=1, keepdims=True)


def synthetic_corpus(n: int, dim: int, n_queries: int, seed: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) unit passage vectors (written into `out` if given, e.g. a memory map) and (n_queries, D)
    queries near random passages, generated a few thousand articles at a time."""
    world = World(n, dim, seed)
    x = np.empty((n, dim), np.float32) if out is None else out
    sources = np.sort(world.rng.choice(n, size=n_queries, replace=False))
    queries = np.empty((n_queries, dim), np.float32)
    for first in range(0, len(world.sizes), 2000):
        articles = np.arange(first, min(first + 2000, len(world.sizes)))
        lo, hi = world.starts[articles[0]], world.starts[articles[-1] + 1]
        x[lo:hi], _, base, own = world.passages(articles)
        pick = (sources >= lo) & (sources < hi)
        queries[pick] = world.queries(base[sources[pick] - lo], own[sources[pick] - lo])
    order = world.rng.permutation(n_queries)  # queries in random order, not corpus order
    return x, queries[order]


def statistics_of(x: np.ndarray, article: np.ndarray, q: np.ndarray, q_article: np.ndarray) -> dict:
    """Shape statistics of a small set: cosines between passages and from queries to passages."""
    s = x @ x.T
    upper = np.triu_indices(len(x), 1)
    same = article[:, None] == article[None, :]
    np.fill_diagonal(same, False)
    other = article[:, None] != article[None, :]
    ranked = -np.sort(-np.where(np.eye(len(x), dtype=bool), -9, s), 1)
    eig = np.linalg.eigvalsh(np.cov(x.T))
    qs = q @ x.T
    q_ranked = -np.sort(-qs, 1)
    q_other = np.where(article[None, :] != q_article[:, None], qs, -9)
    q_own = np.where(article[None, :] == q_article[:, None], qs, -9)
    return {
        "random pair cosine, mean": s[upper].mean(),
        "random pair cosine, std": s[upper].std(),
        "same-article pair cosine, mean": s[same].mean(),
        "other-article pair cosine, 99.9th percentile": np.percentile(s[other], 99.9),
        "passage: cosine to its nearest neighbour": ranked[:, 0].mean(),
        "passage: cosine to its 10th neighbour": ranked[:, 9].mean(),
        "norm of the mean vector": np.linalg.norm(x.mean(0)),
        "participation ratio (effective dimensions)": eig.sum() ** 2 / (eig**2).sum(),
        "query: cosine to the 1st passage": q_ranked[:, 0].mean(),
        "query: cosine to the 10th passage": q_ranked[:, 9].mean(),
        "query: cosine to the 100th passage": q_ranked[:, 99].mean(),
        "query: best passage outside its article": q_other.max(1).mean(),
        "query: top passage in its own article (share)": (q_own.max(1) > q_other.max(1)).mean(),
    }


def calibration(seed: int) -> dict:
    """SQuAD's MiniLM embeddings (913 passages in 24 articles, 672 test questions, the question's article
    being its gold passage's) against 24 random articles of the synthetic 1M corpus."""
    import torch

    from jointrag.data.corpus import read_passages
    from jointrag.data.qa import EMBEDDED_SQUAD, embedded_examples
    from jointrag.retrieval.encoders import load_retriever

    passages = list(read_passages(EMBEDDED_SQUAD))
    examples = embedded_examples("test")
    retriever = load_retriever()
    retriever.eval()
    with torch.no_grad():
        x = retriever.passage_encoder.encode(retriever.passage_texts(passages), 64, "fp32")
        q = retriever.encode_queries([e.question for e in examples])
    x = np.asarray(x, dtype=np.float32)
    titles = {t: i for i, t in enumerate(dict.fromkeys(p.title for p in passages))}
    article = np.array([titles[p.title] for p in passages])
    row = {p.id: i for i, p in enumerate(passages)}
    q_article = np.array([article[row[e.gold_ids[0]]] for e in examples])
    real = statistics_of(x, article, np.asarray(q, dtype=np.float32), q_article)

    world = World(1_000_000, x.shape[1], seed)
    chosen = np.sort(world.rng.choice(len(world.sizes), size=len(titles), replace=False))
    sx, sa, base, own = world.passages(chosen)
    src = world.rng.integers(0, len(sx), len(examples))
    synthetic = statistics_of(sx, sa, world.queries(base[src], own[src]), sa[src])
    return {"real": {"set": f"SQuAD MiniLM ({len(x)} passages, {len(titles)} articles, {len(q)} questions)", **real},
            "synthetic": {"set": f"synthetic ({len(sx)} passages of {len(titles)} random articles of the 1M corpus, {len(examples)} queries)", **synthetic}}


# --- measurement helpers ---------------------------------------------------------------------------------


def memory() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs); then trim malloc's free pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact_ids.tolist())]))


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def build_raw(x: np.ndarray, kind: str, params: dict):
    """The faiss index a faiss user would build with the same settings."""
    import faiss

    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    index.add(x)
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivfpq":
        index.nprobe = params["nprobe"]
    return index


def bench_kind(kind: str, x: np.ndarray, q: np.ndarray, exact_ids: np.ndarray, directory: Path, repeats: int) -> dict:
    """Build, open and search ours and raw faiss for one kind; memory from /proc/self/status."""
    import faiss

    from jointrag.retrieval.index import FaissIndex

    n, d = x.shape
    params = FaissIndex.default_params(kind, n, d)
    if kind == "hnsw" and n > HNSW_LARGE_FROM:
        params = dict(HNSW_LARGE)
    row: dict = {"params": params}

    reset_peak()
    before = memory()
    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        row["ours_build_s"], built = timed(lambda: FaissIndex.build(x, kind, params))
    after = memory()
    row["ours_build_peak_bytes"] = after["VmHWM"] - before["VmRSS"]
    row["ours_built_anon_bytes"] = after["RssAnon"] - before["RssAnon"]
    built.save(directory)
    row["ours_index_bytes"] = (directory / "index.faiss").stat().st_size
    del built
    reset_peak()
    before = memory()
    ours = FaissIndex.load(directory, kind, params)  # memory-maps embeddings.npy for IVF-PQ re-ranking
    opened = memory()
    row["ours_open_anon_bytes"] = opened["RssAnon"] - before["RssAnon"]
    log(f"    ours built in {row['ours_build_s']:.1f} s, index {row['ours_index_bytes'] / 2**20:.0f} MiB")

    reset_peak()
    before = memory()
    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        row["raw_build_s"], raw = timed(lambda: build_raw(x, kind, params))
    after = memory()
    row["raw_build_peak_bytes"] = after["VmHWM"] - before["VmRSS"]
    row["raw_built_anon_bytes"] = after["RssAnon"] - before["RssAnon"]
    faiss.write_index(raw, str(directory / "raw.faiss"))
    row["raw_index_bytes"] = (directory / "raw.faiss").stat().st_size
    (directory / "raw.faiss").unlink()
    log(f"    raw built in {row['raw_build_s']:.1f} s, index {row['raw_index_bytes'] / 2**20:.0f} MiB")

    file_before = memory()["RssFile"]
    ours_t, raw_t, ours_all, raw_all = timed_pairs(lambda: ours.search(q, K), lambda: raw.search(q, K), repeats, min_sample_s=0.2, warmup_s=0.5)
    row["ours_search_rss_file_bytes"] = memory()["RssFile"] - file_before  # embeddings.npy pages re-ranking touched
    row.update(ours_search_s=ours_t, raw_search_s=raw_t, ours_search_all_s=ours_all, raw_search_all_s=raw_all)
    row["ours_recall"] = recall(ours.search(q, K)[1], exact_ids)
    row["raw_recall"] = recall(raw.search(q, K)[1], exact_ids)
    log(f"    search {1e3 * ours_t:.1f} ms (raw {1e3 * raw_t:.1f} ms), recall@10 {row['ours_recall']:.3f} (raw {row['raw_recall']:.3f})")
    if kind == "ivfpq":
        row["sweep"] = sweep(ours, raw, params, q, exact_ids)
    ours = raw = None  # free both before the next kind
    (directory / "index.faiss").unlink()
    return row


def sweep(ours, raw, params: dict, q: np.ndarray, exact_ids: np.ndarray, samples: int = 3) -> list[dict]:
    """IVF-PQ recall and latency over nprobe (raw and ours) and rerank (ours): the median of `samples`
    searches, after one that warms the setting."""

    def measure(search) -> tuple[float, np.ndarray]:
        _, ids = search()
        return statistics.median(timed(search)[0] for _ in range(samples)), ids

    rows = []
    for nprobe in sorted({*SWEEP_NPROBE, params["nprobe"]}):
        if nprobe > params["nlist"]:
            continue
        raw.nprobe = nprobe
        seconds, ids = measure(lambda: raw.search(q, K))
        rows.append({"nprobe": nprobe, "rerank": None, "side": "raw", "recall": recall(ids, exact_ids), "search_s": seconds})
        for rerank in sorted({*SWEEP_RERANK, params["rerank"]}):
            ours.configure({**params, "nprobe": nprobe, "rerank": rerank})
            seconds, ids = measure(lambda: ours.search(q, K))
            rows.append({"nprobe": nprobe, "rerank": rerank, "side": "ours", "recall": recall(ids, exact_ids), "search_s": seconds})
        log(f"    sweep nprobe {nprobe}: " + ", ".join(f"{r['side']} rerank {r['rerank']}: {r['recall']:.3f} {1e3 * r['search_s']:.0f} ms" for r in rows if r["nprobe"] == nprobe))
    raw.nprobe = params["nprobe"]
    ours.configure(params)
    return rows


def bench_size(n: int, dim: int, kinds: list[str], args, workdir: Path) -> dict:
    import faiss

    directory = workdir / f"n{n}"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # the corpus goes straight into the index directory's embeddings.npy, which IVF-PQ re-ranks from
    stored = np.lib.format.open_memmap(directory / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    _, q = synthetic_corpus(n, dim, args.queries, args.seed, out=stored)
    stored.flush()
    del stored
    x = np.load(directory / "embeddings.npy")  # in RAM: the input both sides build from
    generate_s = time.perf_counter() - started
    exact_s, (_, exact_ids) = timed(lambda: faiss.knn(q, x, K, metric=faiss.METRIC_INNER_PRODUCT))
    log(f"  {n:,} x {dim}: generated in {generate_s:.1f} s, exact top-{K} of {len(q)} queries in {exact_s:.1f} s")
    result = {"count": n, "dim": dim, "queries": len(q), "k": K, "generate_s": generate_s, "exact_knn_s": exact_s, "kinds": {}}
    for kind in kinds:
        log(f"  {kind}:")
        result["kinds"][kind] = bench_kind(kind, x, q, exact_ids, directory, args.repeats)
    x = None  # frees the corpus before the next size
    shutil.rmtree(directory)
    return result


def real_check(index_dir: Path, queries_file: Path, args) -> dict:
    """IVF-PQ (default settings) on a real index's embeddings and real queries, and on synthetic vectors of
    the same count: recall@10 against exact search, ours and raw faiss."""
    import faiss
    import torch

    from jointrag.retrieval.index import FaissIndex, read_manifest
    from jointrag.retrieval.encoders import load_retriever

    manifest = read_manifest(index_dir)
    x = np.ascontiguousarray(np.load(index_dir / "embeddings.npy"), dtype=np.float32)
    questions = [json.loads(line)["question"] for line in queries_file.read_text().splitlines() if line.strip()][: args.queries]
    retriever = load_retriever()
    retriever.eval()
    if retriever.identity()["fingerprint"] != manifest["encoder"]["fingerprint"]:
        sys.exit(f"{index_dir} was not built with the default retriever")
    with torch.no_grad():
        q = np.ascontiguousarray(retriever.encode_queries(questions), dtype=np.float32)
    sets = {f"real: {index_dir}": (x, q), "synthetic, same size": synthetic_corpus(len(x), x.shape[1], len(q), args.seed)}
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-real-") as tmp:
        for name, (vectors, queries) in sets.items():
            _, exact_ids = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
            np.save(Path(tmp) / "embeddings.npy", vectors)
            params = FaissIndex.default_params("ivfpq", len(vectors), vectors.shape[1])
            with warnings.catch_warnings(), quiet_stderr():
                warnings.simplefilter("ignore")
                FaissIndex.build(vectors, "ivfpq", params).save(Path(tmp))
                raw = build_raw(vectors, "ivfpq", params)
            ours = FaissIndex.load(Path(tmp), "ivfpq", params)
            out[name] = {"count": len(vectors), "queries": len(queries), "params": params, "sweep": sweep(ours, raw, params, queries, exact_ids),
                         "ours_recall": recall(ours.search(queries, K)[1], exact_ids), "raw_recall": recall(raw.search(queries, K)[1], exact_ids)}
            log(f"  {name}: {len(vectors):,} vectors, ours {out[name]['ours_recall']:.3f}, raw {out[name]['raw_recall']:.3f}")
    return out


# --- report ----------------------------------------------------------------------------------------------


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f}"


def params_text(params: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items())


def sweep_table(rows: list[dict], default: dict) -> list[str]:
    reranks = sorted({r["rerank"] for r in rows if r["side"] == "ours"})
    lines = ["| nprobe | raw faiss | " + " | ".join(f"ours rerank={r}" for r in reranks) + " |",
             "|---:|---:|" + "---:|" * len(reranks)]
    for nprobe in dict.fromkeys(r["nprobe"] for r in rows):
        cells = []
        for side, rerank in [("raw", None)] + [("ours", r) for r in reranks]:
            r = next(r for r in rows if r["nprobe"] == nprobe and r["side"] == side and r["rerank"] == rerank)
            mark = "**" if side == "ours" and nprobe == default["nprobe"] and rerank == default["rerank"] else ""
            cells.append(f"{mark}{r['recall']:.3f} / {1e3 * r['search_s']:.0f}{mark}")
        lines.append(f"| {nprobe} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    lines = []
    if report.get("calibration"):
        real, synthetic = report["calibration"]["real"], report["calibration"]["synthetic"]
        lines += [f"Data shape: {real['set']} against {synthetic['set']}", "",
                  "| statistic | SQuAD MiniLM | synthetic |", "|---|---:|---:|"]
        lines += [f"| {key} | {real[key]:.3f} | {synthetic[key]:.3f} |" for key in real if key != "set"]
        lines.append("")
    q = next(iter(report["sizes"].values()))
    lines += [f"Search: {q['queries']} queries, k={K}; time per batch of {q['queries']} queries (median of {report['config']['repeats']} "
              "interleaved samples; the 'best samples' ratio compares the fastest sample of each side, which other load on the machine "
              "disturbs least); recall@10 against exact search", "",
              "| vectors | index | settings | build ours (s) | build raw (s) | search ours (ms) | search raw (ms) | ours / raw | ours / raw, best samples | recall@10 ours | recall@10 raw |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in report["sizes"].values():
        for kind, r in size["kinds"].items():
            lines.append(f"| {size['count']:,} | {kind} | {params_text(r['params'])} | {r['ours_build_s']:.1f} | {r['raw_build_s']:.1f} | "
                         f"{1e3 * r['ours_search_s']:.1f} | {1e3 * r['raw_search_s']:.1f} | {r['ours_search_s'] / r['raw_search_s']:.2f} | "
                         f"{min(r['ours_search_all_s']) / min(r['raw_search_all_s']):.2f} | "
                         f"{r['ours_recall']:.3f} | {r['raw_recall']:.3f} |")
    lines += ["", "Memory (MiB): serialised index; peak RSS growth during the build; anonymous memory kept by the built index (raw) "
              "or the opened index (ours); RSS of embeddings.npy pages mapped by ours' re-ranking during the search (page cache, reclaimable)", "",
              "| vectors | index | index ours | index raw | build peak ours | build peak raw | kept ours | kept raw | re-ranking file pages ours |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size in report["sizes"].values():
        for kind, r in size["kinds"].items():
            lines.append(f"| {size['count']:,} | {kind} | {mib(r['ours_index_bytes'])} | {mib(r['raw_index_bytes'])} | {mib(r['ours_build_peak_bytes'])} | "
                         f"{mib(r['raw_build_peak_bytes'])} | {mib(r['ours_open_anon_bytes'])} | {mib(r['raw_built_anon_bytes'])} | "
                         f"{mib(r['ours_search_rss_file_bytes'])} |")
    for size in report["sizes"].values():
        if "ivfpq" in size["kinds"]:
            r = size["kinds"]["ivfpq"]
            lines += ["", f"IVF-PQ sweep, {size['count']:,} vectors ({params_text({k: v for k, v in r['params'].items() if k not in ('nprobe', 'rerank')})}): "
                      f"recall@10 / ms per {size['queries']} queries (median of 3 searches); bold: the defaults", ""]
            lines += sweep_table(r["sweep"], r["params"])
    for name, r in (report.get("real") or {}).items():
        lines += ["", f"IVF-PQ on {name} ({r['count']:,} vectors, {r['queries']} queries; {params_text(r['params'])}): recall@10 / ms", ""]
        lines += sweep_table(r["sweep"], r["params"])
    goal = report.get("goal")
    if not goal:
        lines += ["", f"Goal IVF-PQ recall@10 ≥ {GOAL_RECALL} against exact at 1,000,000 vectors: not measured (no 1M IVF-PQ run)"]
    else:
        lines += ["", f"Goal IVF-PQ recall@10 ≥ {GOAL_RECALL} against exact at {goal['count']:,} vectors: "
                      f"{'MET' if goal['met'] else 'NOT MET'} (ours {goal['recall']:.3f} with {params_text(goal['params'])}; raw faiss, same settings without re-ranking: {goal['raw_recall']:.3f})"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated corpus sizes")
    parser.add_argument("--quick", action="store_true", help="only the sizes below 1M (a smoke run)")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per side (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="faiss (and torch) threads")
    parser.add_argument("--no-calibration", action="store_true", help="skip encoding SQuAD for the data-shape table")
    parser.add_argument("--real-index", type=Path, help="an index directory built with the default retriever (its embeddings.npy)")
    parser.add_argument("--real-queries", type=Path, help="JSONL with a `question` field: queries for --real-index")
    parser.add_argument("--workdir", type=Path, default=None, help="where the embeddings files go (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s < 1_000_000] or [min(sizes)]
    kinds = args.kinds.split(",")
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "faiss": faiss.__version__,
               "numpy": np.__version__, "torch": torch.__version__, "python": platform.python_version()}
    machine["line"] = f"{machine['cpu']}, {machine['cores']} cores ({args.threads} faiss thread{'s' if args.threads > 1 else ''}), faiss {machine['faiss']}, numpy {machine['numpy']}"
    print(f"Machine: {machine['line']}", flush=True)
    started = time.perf_counter()
    busy_start, self_start = cpu_busy_seconds()

    report: dict = {"command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python", "benchmarks/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
                    "machine": machine, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "data": {"variance": VARIANCE, "spectrum_decay": SPECTRUM_DECAY, "fanout": FANOUT, "article_sizes": ARTICLE_SIZES,
                             "section": SECTION, "query_keep": QUERY_KEEP, "query_noise": QUERY_NOISE}}
    if not args.no_calibration:
        log("calibration: SQuAD MiniLM embeddings against the synthetic corpus")
        report["calibration"] = {side: {k: (v if isinstance(v, str) else float(v)) for k, v in stats.items()} for side, stats in calibration(args.seed).items()}
    if args.real_index:
        if not args.real_queries:
            sys.exit("--real-index needs --real-queries")
        log(f"real check: {args.real_index}")
        report["real"] = real_check(args.real_index, args.real_queries, args)
    report["sizes"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.workdir) as tmp:
        for n in sizes:
            log(f"size {n:,}")
            report["sizes"][str(n)] = bench_size(n, args.dim, kinds, args, Path(tmp))
    largest = report["sizes"][str(max(sizes))]
    if "ivfpq" in largest["kinds"] and largest["count"] >= 1_000_000:
        r = largest["kinds"]["ivfpq"]
        report["goal"] = {"count": largest["count"], "recall": r["ours_recall"], "raw_recall": r["raw_recall"], "params": r["params"],
                          "met": r["ours_recall"] >= GOAL_RECALL}
    busy_end, self_end = cpu_busy_seconds()
    elapsed = time.perf_counter() - started
    machine["other_load_cores"] = max(0.0, (busy_end - busy_start) - (self_end - self_start)) / elapsed
    report["total_seconds"] = elapsed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(markdown(report))
    print(f"\n(total {elapsed:.0f} s; other processes used {machine['other_load_cores']:.2f} cores on average meanwhile; JSON written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
