"""Retrieval benchmark (issue 2): corpus encoding vs sentence-transformers, search vs raw FAISS.

Run from the repository root:

    .venv/bin/python benchmarks/bench_retrieval.py [--passages N] [--repeats R] [--synthetic N]
                                                   [--threads T] [--out runs/bench_retrieval.json]

Part 1 encodes the embedded SQuAD corpus with `SentenceTransformer.encode` and with our passage
tower (`Encoder.encode`) at fp32 and at the `auto` precision, same model, texts, batch size (64) and
max length (256), and reports the best of `--repeats` timings, plus gold-passage recall@5 on the
embedded test split for each set of passage embeddings (queries always from the fp32 query tower,
exact search).

Part 2 times `FaissIndex.search` (flat, hnsw, ivfpq) against `.search` on the very same faiss index
object, and `ExactIndex.search` against a raw `faiss.IndexFlatIP` over the same vectors, on the
SQuAD passage embeddings and on `--synthetic` random unit vectors; medians of several interleaved
runs; overhead % = (ours / raw - 1) * 100. It also reports recall@10 of hnsw and ivfpq against exact
search.

Prints the machine, the figures and a Markdown table; writes everything to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

GOAL_SPEEDUP = 1.2  # ours / sentence-transformers passages per second
GOAL_RECALL_POINTS = 1.0  # |recall@5(auto) - recall@5(fp32)| in points
GOAL_OVERHEAD_PCT = 10.0  # ours / raw faiss - 1, in %
BATCH_SIZE = 64
MAX_LENGTH = 256
K_SEARCH = 10
K_RECALL = 5
N_QUERIES = 1000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=None, help="encode only the first N passages (default all 913)")
    parser.add_argument("--repeats", type=int, default=2, help="encoding timings per encoder; the best is kept")
    parser.add_argument("--search-repeats", type=int, default=7, help="search timings per index; the median is kept")
    parser.add_argument("--synthetic", type=int, default=100_000, help="random unit vectors in the synthetic search set")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and faiss threads (default all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_retrieval.json"))
    return parser.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) since boot / start."""
    import resource

    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (faiss prints k-means "please provide at least N training points"
    warnings there when IVF-PQ trains on a small corpus; errors still raise)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- part 1: corpus encoding --------------------------------------------------------------------------


def bench_encoding(args, retriever, passages, examples, precisions: list[str]) -> dict:
    from sentence_transformers import SentenceTransformer

    from jointrag.retrieval.index import ExactIndex
    from jointrag.metrics import gold_recall_at_k, mean
    from jointrag.models import default_retriever_path

    texts = retriever.passage_texts(passages)
    st = SentenceTransformer(str(default_retriever_path()), device="cpu")
    st.max_seq_length = MAX_LENGTH
    tower = retriever.passage_encoder
    assert tower.max_length == MAX_LENGTH, tower.max_length

    encoders = {"sentence-transformers": lambda t: st.encode(t, batch_size=BATCH_SIZE, show_progress_bar=False, convert_to_numpy=True)}
    for precision in precisions:
        encoders[f"ours {precision}"] = lambda t, p=precision: tower.encode(t, BATCH_SIZE, p)

    for name, encode in encoders.items():  # warm-up: first call pays lazy initialisation
        encode(texts[:8])
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    embeddings: dict[str, np.ndarray] = {}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits every encoder alike
        for name, encode in encoders.items():
            started = time.perf_counter()
            out = encode(texts)
            seconds[name].append(time.perf_counter() - started)
            embeddings[name] = np.ascontiguousarray(out, dtype=np.float32)
            log(f"  encode {name:24s} repeat {r + 1}/{args.repeats}: {seconds[name][-1]:.2f} s")

    # quality: gold recall@5 on the test questions whose gold passage is in the (possibly cut) corpus
    ids = [p.id for p in passages]
    present = set(ids)
    scored = [e for e in examples if any(g in present for g in e.gold_ids)]
    queries = retriever.encode_queries([e.question for e in scored]) if scored else None
    recall: dict[str, float | None] = {}
    for name, emb in embeddings.items():
        if not scored:
            recall[name] = None
            continue
        _, rows = ExactIndex(emb).search(queries, K_RECALL)
        recall[name] = mean(gold_recall_at_k([ids[j] for j in row if j >= 0], e.gold_ids, K_RECALL) for e, row in zip(scored, rows.tolist()))

    st_best = min(seconds["sentence-transformers"])
    results = {}
    for name in encoders:
        best = min(seconds[name])
        results[name] = {
            "seconds_best": best,
            "seconds_all": seconds[name],
            "passages_per_s": len(texts) / best,
            "speedup_vs_st": st_best / best,
            "recall_at_5": recall[name],
            "cosine_to_st_min": float(
                np.min(np.sum(embeddings[name] * embeddings["sentence-transformers"], 1)
                       / (np.linalg.norm(embeddings[name], axis=1) * np.linalg.norm(embeddings["sentence-transformers"], axis=1)))
            ),
        }
    return {
        "passages": len(texts),
        "test_questions_scored": len(scored),
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "encoders": results,
        "embeddings": embeddings,  # dropped before writing JSON
    }


# --- part 2: search overhead -----------------------------------------------------------------------------


def timed_pairs(ours, raw, repeats: int, min_sample_s: float = 0.2, warmup_s: float = 1.0) -> tuple[float, float, list[float], list[float]]:
    """Median seconds per call of `ours()` and `raw()`, run alternately.

    After warm-up calls (at least one each, for at least `warmup_s`), every sample times `calls`
    back-to-back calls (enough for about `min_sample_s`, the same count for both sides) and divides,
    so that millisecond searches are not lost in timer and scheduler noise.
    """
    started = time.perf_counter()
    warmups = 0
    while warmups < 1 or time.perf_counter() - started < warmup_s:
        ours()
        raw()
        warmups += 1
    calls = max(1, math.ceil(min_sample_s / max((time.perf_counter() - started) / (2 * warmups), 1e-6)))
    t_ours, t_raw = [], []
    for r in range(repeats):
        pair = [("ours", ours), ("raw", raw)] if r % 2 == 0 else [("raw", raw), ("ours", ours)]
        for name, fn in pair:
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            (t_ours if name == "ours" else t_raw).append((time.perf_counter() - started) / calls)
    return statistics.median(t_ours), statistics.median(t_raw), t_ours, t_raw


def wrapper_params(kind: str, n: int, d: int) -> dict:
    """The default settings, IVF-PQ without re-ranking: this measures what the wrapper costs over the very
    faiss search it wraps (bench_scale.py measures re-ranking, which does more work for more recall)."""
    from jointrag.retrieval.index import FaissIndex

    return {**FaissIndex.default_params(kind, n, d), **({"rerank": 0} if kind == "ivfpq" else {})}


def recall_vs_exact(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, exact_ids)]))


def bench_search(name: str, emb: np.ndarray, queries: np.ndarray, repeats: int) -> dict:
    from jointrag.retrieval.index import ExactIndex, FaissIndex

    n, d = emb.shape
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = {}
    exact_ids = flat = None
    # flat first: its underlying faiss.IndexFlatIP is then, already warm, the raw baseline of "exact"
    for kind in ("flat", "exact", "hnsw", "ivfpq"):
        started = time.perf_counter()
        if kind == "exact":
            ours, raw = ExactIndex(emb), flat.index  # raw: a plain faiss.IndexFlatIP over the same vectors
        else:
            with warnings.catch_warnings(), quiet_stderr():
                warnings.simplefilter("ignore")
                ours = FaissIndex.build(emb, kind, wrapper_params(kind, n, d))
            raw = ours.index  # the very faiss object our wrapper searches
        build_s = time.perf_counter() - started
        if kind == "flat":
            flat = ours
        ours_t, raw_t, all_ours, all_raw = timed_pairs(lambda: ours.search(queries, K_SEARCH), lambda: raw.search(queries, K_SEARCH), repeats)
        _, ids = ours.search(queries, K_SEARCH)
        if exact_ids is None:
            exact_ids = ids  # faiss flat: exact inner-product search
        rows[kind] = {
            "ours_s": ours_t, "raw_s": raw_t, "overhead_pct": (ours_t / raw_t - 1) * 100,
            "ours_all_s": all_ours, "raw_all_s": all_raw,
            "raw": "faiss.IndexFlatIP.search (same vectors)" if kind == "exact" else "same faiss index object, .search",
            "recall_at_10_vs_exact": recall_vs_exact(ids, exact_ids), "build_s": build_s,
            "params": wrapper_params(kind, n, d),
        }
        log(f"  search {name} {kind:5s} (built in {build_s:.1f} s): ours {ours_t * 1e3:.2f} ms, raw {raw_t * 1e3:.2f} ms")
    rows = {kind: rows[kind] for kind in ("exact", "flat", "hnsw", "ivfpq")}
    return {"count": n, "dim": d, "queries": len(queries), "k": K_SEARCH, "indexes": rows}


def unit_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# --- report --------------------------------------------------------------------------------------------


def fmt_recall(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown(report: dict) -> str:
    enc = report["encoding"]
    lines = [
        f"Machine: {report['machine']['line']}",
        "",
        f"Corpus encoding: {enc['passages']} passages, batch {enc['batch_size']}, max length {enc['max_length']}, "
        f"best of {report['config']['repeats']}; recall@5 over {enc['test_questions_scored']} test questions",
        "",
        "| encoder | seconds | passages/s | × sentence-transformers | gold recall@5 (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    g = report["goals"]
    for name, row in enc["encoders"].items():
        label = f"{name} (auto)" if name == f"ours {g['auto_precision']}" and g["auto_precision"] != "fp32" else name
        lines.append(f"| {label} | {row['seconds_best']:.2f} | {row['passages_per_s']:.1f} | {row['speedup_vs_st']:.2f} | {fmt_recall(row['recall_at_5'])} |")
    lines += [
        "",
        f"recall@5 of ours {g['auto_precision']} − ours fp32: {g['recall_diff_points']:+.2f} points" if g["recall_diff_points"] is not None else "recall@5 difference: n/a",
        "",
        f"Search: {N_QUERIES} queries, k={K_SEARCH}, median of {report['config']['search_repeats']} interleaved samples",
        "",
        "| set | index | ours (ms) | raw faiss (ms) | overhead (%) | recall@10 vs exact |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for set_name, result in report["search"].items():
        for kind, row in result["indexes"].items():
            label = f"{set_name} ({result['count']:,} × {result['dim']})"
            lines.append(
                f"| {label} | {kind} | {row['ours_s'] * 1e3:.2f} | {row['raw_s'] * 1e3:.2f} | {row['overhead_pct']:+.1f} | {row['recall_at_10_vs_exact']:.3f} |"
            )
    lines += [
        "",
        f"Goal encoding ≥ {GOAL_SPEEDUP}× sentence-transformers with recall@5 within {GOAL_RECALL_POINTS:g} point: "
        f"{'MET' if g['encoding_met'] else 'NOT MET'} (ours {g['auto_precision']}: {g['speedup']:.2f}×, {g['recall_diff_points']:+.2f} points)"
        if g["recall_diff_points"] is not None
        else f"Goal encoding: speedup {g['speedup']:.2f}×, recall not measurable on this cut corpus",
        f"Goal search overhead < {GOAL_OVERHEAD_PCT:g}% of raw FAISS: {'MET' if g['search_met'] else 'NOT MET'} "
        f"(worst: {g['worst_overhead']['set']} {g['worst_overhead']['index']} {g['worst_overhead']['pct']:+.1f}%)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss
    import torch
    import sentence_transformers
    import transformers

    from jointrag.data.corpus import read_passages
    from jointrag.data.qa import EMBEDDED_SQUAD, embedded_examples
    from jointrag.retrieval.encoders import load_retriever
    from jointrag.runtime import resolve_precision

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    machine["line"] = (
        f"{machine['cpu']}, {machine['cores']} cores ({args.threads} threads), torch {machine['torch']}, "
        f"faiss {machine['faiss']}, sentence-transformers {machine['sentence_transformers']}, transformers {machine['transformers']}"
    )
    print(f"Machine: {machine['line']}", flush=True)
    started = time.perf_counter()
    busy_start, self_start = cpu_busy_seconds()

    passages = list(read_passages(EMBEDDED_SQUAD))
    if args.passages is not None:
        passages = passages[: args.passages]
    examples = embedded_examples("test")
    retriever = load_retriever()
    retriever.eval()
    auto = resolve_precision("auto", retriever.passage_encoder.device)
    precisions = ["fp32"] + ([auto] if auto != "fp32" else [])
    log(f"part 1: encoding {len(passages)} passages (auto precision = {auto})")
    encoding = bench_encoding(args, retriever, passages, examples, precisions)
    embeddings = encoding.pop("embeddings")

    log("part 2: search")
    questions = retriever.encode_queries([e.question for e in examples])
    squad_queries = np.resize(questions, (N_QUERIES, questions.shape[1]))  # tiles the rows
    rng = np.random.default_rng(args.seed)
    search = {
        "squad": bench_search("squad", embeddings["ours fp32"], squad_queries, args.search_repeats),
        "synthetic": bench_search("synthetic", unit_vectors(rng, args.synthetic, questions.shape[1]), unit_vectors(rng, N_QUERIES, questions.shape[1]), args.search_repeats),
    }

    encoders = encoding["encoders"]
    auto_name = f"ours {auto}"
    diff = None
    if encoders[auto_name]["recall_at_5"] is not None:
        diff = 100 * (encoders[auto_name]["recall_at_5"] - encoders["ours fp32"]["recall_at_5"])
    worst = max(
        ((s, k, row["overhead_pct"]) for s, res in search.items() for k, row in res["indexes"].items()),
        key=lambda t: t[2],
    )
    goals = {
        "auto_precision": auto,
        "speedup": encoders[auto_name]["speedup_vs_st"],
        "speedup_fp32": encoders["ours fp32"]["speedup_vs_st"],
        "recall_diff_points": diff,
        "encoding_met": encoders[auto_name]["speedup_vs_st"] >= GOAL_SPEEDUP and diff is not None and abs(diff) <= GOAL_RECALL_POINTS,
        "worst_overhead": {"set": worst[0], "index": worst[1], "pct": worst[2]},
        "search_met": worst[2] < GOAL_OVERHEAD_PCT,
    }
    busy_end, self_end = cpu_busy_seconds()
    elapsed = time.perf_counter() - started
    other_cores = max(0.0, (busy_end - busy_start) - (self_end - self_start)) / elapsed
    machine["other_load_cores"] = other_cores  # CPU used by other processes during the run, in cores
    if other_cores > 0.1:
        log(f"WARNING: other processes used {other_cores:.2f} cores on average during this run; timings are disturbed")
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_retrieval.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "encoding": encoding,
        "search": search,
        "goals": goals,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report).split("\n", 1)[1])  # the machine line is already printed
    print(f"\n(total {report['total_seconds']:.0f} s; other processes used {other_cores:.2f} cores on average meanwhile; JSON written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
