"""Tests for jointrag.retrieval.sharded: sharding, the top-k merge, and 2 gloo processes under torchrun
searching exactly as one process does (random vectors and the tiny encoder, uneven shards, k above a shard)
and building with `jointrag index` the index directory one process builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import write_jsonl
from jointrag.cli import main
from jointrag.retrieval.sharded import ShardedIndex, merge_topk, shard_rows
from jointrag.errors import UserError
from jointrag.retrieval.index import EMBEDDINGS, MANIFEST, ExactIndex, RetrievalIndex, build_index
from jointrag.retrieval.encoders import load_retriever

from conftest import PASSAGES

TORCHRUN = Path(sys.executable).with_name("torchrun")
KS = (1, 3, 6, 20)  # 6: above the 5- and 6-row shards of 11 rows; 20: above the corpus
QUESTIONS = ["What is the capital of France?", "Who won Super Bowl 50?", "Which river flows through Vienna?"]

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from jointrag.data.corpus import Corpus
    from jointrag.distributed import process_group, rank as rank_of
    from jointrag.retrieval.sharded import ShardedIndex
    from jointrag.retrieval.encoders import load_retriever

    work, encoder = Path(sys.argv[1]), sys.argv[2]
    with process_group(timeout_s=120):  # the CLI's own set-up and teardown
        rank = rank_of()
        data = np.load(work / "vectors.npz")
        mine = data["queries"][:3] if rank == 0 else data["queries"][3:]  # 3 and 2 queries
        results = {}
        for kind in ("exact", "flat"):
            index = ShardedIndex(data["corpus"][[0, 6][rank] : [6, 11][rank]], range([0, 6][rank], [6, 11][rank]), 11, kind)
            for k in (1, 3, 6, 20):
                results[f"{kind}-{k}-scores"], results[f"{kind}-{k}-rows"] = index.search(mine, k)
        retriever = load_retriever(encoder)
        queries = np.load(work / "queries.npy")[rank::2]
        for name, index in (("encode", ShardedIndex.encode(retriever, Corpus.open(work / "index"), batch_size=1)),
                            ("open", ShardedIndex.open(work / "index", retriever))):
            for k in (3, 6, 9):
                results[f"{name}-{k}-scores"], results[f"{name}-{k}-rows"] = index.search(queries, k)
        np.savez(work / f"rank{rank}.npz", **results)
    """
)


def test_shard_rows_cover_the_corpus_contiguously():
    for count, world in [(11, 2), (10, 3), (1, 2), (0, 2), (8, 8)]:
        shards = [shard_rows(count, rank, world) for rank in range(world)]
        assert [row for shard in shards for row in shard] == list(range(count))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_rows(11, 0, 2) == range(0, 6) and shard_rows(11, 1, 2) == range(6, 11)


def test_merge_orders_by_score_then_row_and_puts_missing_last():
    scores = np.array([[1.0, 2.0, 2.0, -np.inf, 0.5, 2.0]], dtype=np.float32)
    rows = np.array([[4, 9, 3, -1, 0, 5]])
    merged_scores, merged_rows = merge_topk(scores, rows, 6)
    assert merged_rows.tolist() == [[3, 5, 9, 4, 0, -1]]
    assert merged_scores.tolist() == [[2.0, 2.0, 2.0, 1.0, 0.5, -np.inf]]


def test_single_process_without_a_process_group_equals_exact_search():
    rng = np.random.default_rng(0)
    corpus, queries = rng.standard_normal((11, 8), dtype=np.float32), rng.standard_normal((4, 8), dtype=np.float32)
    for k in KS:
        expected = ExactIndex(corpus).search(queries, k)
        for kind in ("exact", "flat"):
            found = ShardedIndex(corpus, range(11), 11, kind).search(queries, k)
            np.testing.assert_array_equal(found[1], expected[1])
            np.testing.assert_allclose(found[0], expected[0], rtol=1e-6)


def test_ties_go_to_the_lower_row():
    corpus = np.array([[1, 0], [2, 0], [1, 0], [2, 0], [1, 0]], dtype=np.float32)  # integer scores: exact ties
    scores, rows = ShardedIndex(corpus, range(5), 5).search(np.array([[1, 0]], dtype=np.float32), 4)
    assert rows.tolist() == [[1, 3, 0, 2]] and scores.tolist() == [[2, 2, 1, 1]]


def test_refuses_other_kinds_and_bm25_indexes(tmp_path, passages):
    with pytest.raises(UserError, match="exact, flat"):
        ShardedIndex(np.zeros((2, 4), np.float32), range(2), 2, "hnsw")
    build_index(passages, tmp_path / "bm25", retriever=None, kind="bm25")
    with pytest.raises(UserError, match="no embeddings"):
        ShardedIndex.open(tmp_path / "bm25")


def test_two_processes_search_as_one(tmp_path, tiny_dir):
    rng = np.random.default_rng(1)
    corpus, queries = rng.standard_normal((11, 8), dtype=np.float32), rng.standard_normal((5, 8), dtype=np.float32)
    np.savez(tmp_path / "vectors.npz", corpus=corpus, queries=queries)
    retriever = load_retriever(str(tiny_dir / "encoder"))
    index = build_index(PASSAGES[:7], tmp_path / "index", retriever=retriever, batch_size=1, precision="fp32")  # 7 rows: 4 + 3
    text_queries = retriever.encode_queries(QUESTIONS)
    np.save(tmp_path / "queries.npy", text_queries)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(tmp_path / "worker.py"), str(tmp_path), str(tiny_dir / "encoder")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]

    def joined(name: str, order=None) -> np.ndarray:
        parts = np.concatenate([r[name] for r in ranks])
        return parts if order is None else parts[np.argsort(order, kind="stable")]

    for kind in ("exact", "flat"):
        for k in KS:
            scores, rows = ExactIndex(corpus).search(queries, k)
            np.testing.assert_array_equal(joined(f"{kind}-{k}-rows"), rows)
            np.testing.assert_allclose(joined(f"{kind}-{k}-scores"), scores, rtol=1e-6)
    order = [0, 2, 1]  # rank 0 searched questions 0 and 2, rank 1 question 1
    for name in ("encode", "open"):
        for k in (3, 6, 9):
            scores, rows = index.search_embeddings(text_queries, k)
            np.testing.assert_array_equal(joined(f"{name}-{k}-rows", order), rows)
            np.testing.assert_allclose(joined(f"{name}-{k}-scores", order), scores, rtol=1e-5, atol=1e-6)


def torchrun_index(*args) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m jointrag index ARGS` on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "jointrag", "index", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_build_the_index_one_process_builds(tmp_path, tiny_dir):
    """A flat index of 7 passages (shards of 4 and 3): the same corpus store, manifest (but the build
    time), embeddings up to rounding and search results; only rank 0 reports."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES[:7]])
    args = ["--corpus", corpus, "--retriever", tiny_dir / "encoder", "--kind", "flat", "--precision", "fp32", "--batch-size", "2"]
    assert main(["index", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    done = torchrun_index(*args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built a flat index of 7 passages") == 1
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    manifests = [json.loads((d / MANIFEST).read_text()) for d in (one, two)]
    assert [{k: v for k, v in m.items() if k != "build_seconds"} for m in manifests] == [
        {k: v for k, v in manifests[0].items() if k != "build_seconds"}] * 2
    for name in (p.name for p in one.iterdir() if p.name not in (MANIFEST, EMBEDDINGS, "index.faiss")):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    np.testing.assert_allclose(np.load(two / EMBEDDINGS), np.load(one / EMBEDDINGS), rtol=1e-5, atol=1e-6)
    retriever = load_retriever(str(tiny_dir / "encoder"))
    found = [RetrievalIndex.open(d, retriever).search(QUESTIONS, 7) for d in (one, two)]
    np.testing.assert_array_equal(found[1][1], found[0][1])
    np.testing.assert_allclose(found[1][0], found[0][0], rtol=1e-5, atol=1e-6)


def test_two_ranks_report_a_user_error_and_leave_nothing(tmp_path, tiny_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not an index")
    done = torchrun_index("--corpus", corpus, "--retriever", tiny_dir / "encoder", "--out", tmp_path / "taken")
    assert done.returncode != 0
    assert done.stderr.count("jointrag: error: ") == 2 and "is not an index directory" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "taken"]
