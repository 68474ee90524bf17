"""Tests for jointrag.retrieval.index: every index kind, exact search, the manifest checks, safe rebuilds,
stored embeddings and differentiable scoring over them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertModel

import jointrag.retrieval.index as index_module
from jointrag.data.corpus import Corpus
from jointrag.errors import UserError
from jointrag.retrieval.index import KINDS, ExactIndex, RetrievalIndex, build_index
from jointrag.retrieval.encoders import load_retriever
from jointrag.types import Passage

QUESTIONS = ["What is the capital of France?", "Who won Super Bowl 50?", "Which river flows through Vienna?"]


@pytest.fixture(scope="module")
def retriever(tiny_dir):
    return load_retriever(str(tiny_dir / "encoder"))


@pytest.fixture(scope="module")
def other_encoder_dir(tiny_dir, tmp_path_factory):
    """The tiny encoder's architecture and tokenizer with other random weights."""
    directory = tmp_path_factory.mktemp("other-encoder") / "encoder"
    shutil.copytree(tiny_dir / "encoder", directory)
    config = BertModel.from_pretrained(tiny_dir / "encoder").config
    torch.manual_seed(1)
    BertModel(config).save_pretrained(directory)
    return directory


def synthetic_passages(count: int, seed: int = 0) -> list[Passage]:
    rng = np.random.default_rng(seed)
    words = [f"w{j}" for j in range(400)]
    return [Passage(f"s{i}", f"T{i}", " ".join(rng.choice(words, 10))) for i in range(count)]


def build(passages, out, retriever, kind="exact", **kwargs):
    return build_index(passages, out, retriever=None if kind == "bm25" else retriever, kind=kind, **kwargs)


def siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


# --- round trip for every kind ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_every_kind(tmp_path, passages, retriever, tiny_dir, kind):
    out = tmp_path / "index"
    built = build(passages, out, retriever, kind)
    k = len(passages) + 3
    scores, rows = built.search(QUESTIONS, k)
    assert scores.shape == rows.shape == (len(QUESTIONS), k)
    assert rows.dtype == np.int64
    found = rows[:, : len(passages)]
    assert ((found >= 0) & (found < len(passages))).all()
    for row in found:
        assert sorted(row.tolist()) == list(range(len(passages)))  # every passage, once
    assert (rows[:, len(passages) :] == -1).all()
    assert np.isfinite(scores[:, : len(passages)]).all()
    # padding scores: -inf (exact, bm25) or faiss's -FLT_MAX; never above a real result
    assert (scores[:, len(passages) :] < scores[:, len(passages) - 1 : len(passages)]).all()
    assert (np.diff(scores[:, : len(passages)], axis=1) <= 1e-6).all()  # best first

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["count"] == len(passages)
    assert manifest["corpus"]["count"] == len(passages)
    assert (manifest["encoder"] is None) == (kind == "bm25")

    fresh = None if kind == "bm25" else load_retriever(str(tiny_dir / "encoder"))  # a new instance
    reopened = RetrievalIndex.open(out, fresh)
    again_scores, again_rows = reopened.search(QUESTIONS, k)
    np.testing.assert_array_equal(again_rows, rows)
    np.testing.assert_allclose(again_scores, scores, rtol=1e-5, atol=1e-5)
    assert [p.id if p else None for p in reopened.passages(rows)[0]] == [
        passages[r].id if r >= 0 else None for r in rows[0]
    ]
    assert not [name for name in siblings(out) if name != "index"]  # no temporary leftovers


def test_exact_and_flat_agree(tmp_path, passages, retriever):
    exact = build(passages, tmp_path / "exact", retriever, "exact")
    flat = build(passages, tmp_path / "flat", retriever, "flat")
    exact_scores, exact_rows = exact.search(QUESTIONS, 3)
    flat_scores, flat_rows = flat.search(QUESTIONS, 3)
    np.testing.assert_array_equal(exact_rows[:, 0], flat_rows[:, 0])
    np.testing.assert_allclose(exact_scores, flat_scores, rtol=1e-5, atol=1e-5)


def test_hnsw_agrees_with_exact_top1(tmp_path, retriever):
    passages = synthetic_passages(60)
    exact = build(passages, tmp_path / "exact", retriever, "exact")
    hnsw = build(passages, tmp_path / "hnsw", retriever, "hnsw")
    questions = QUESTIONS + [p.text for p in passages[:5]]
    np.testing.assert_array_equal(hnsw.search(questions, 1)[1], exact.search(questions, 1)[1])


def test_hnsw_search_params_override(tmp_path, passages, retriever):
    build(passages, tmp_path / "hnsw", retriever, "hnsw", params={"M": 8})
    assert json.loads((tmp_path / "hnsw" / "manifest.json").read_text())["params"]["M"] == 8
    opened = RetrievalIndex.open(tmp_path / "hnsw", retriever, {"ef_search": 16})
    assert opened.vectors.index.hnsw.efSearch == 16


def test_ivfpq_on_a_few_hundred_passages(tmp_path, retriever):
    passages = synthetic_passages(300)
    out = tmp_path / "ivfpq"
    built = build(passages, out, retriever, "ivfpq")
    params = built.manifest["params"]
    assert {"nlist", "m", "nbits", "nprobe"} <= params.keys() and params["nlist"] > 1
    scores, rows = built.search(QUESTIONS, 5)
    assert rows.shape == (3, 5) and ((rows >= 0) & (rows < 300)).all()
    assert all(len(set(row)) == 5 for row in rows.tolist())
    reopened = RetrievalIndex.open(out, retriever)
    np.testing.assert_array_equal(reopened.search(QUESTIONS, 5)[1], rows)
    # probing every list gives exhaustive search over the PQ codes
    everything = RetrievalIndex.open(out, retriever, {"nprobe": params["nlist"]})
    assert everything.search(QUESTIONS, 300)[1].min() >= 0


def test_bm25_finds_the_passage_sharing_rare_words(tmp_path, passages):
    index = build(passages, tmp_path / "bm25", None, "bm25")
    questions = ["Which team did the Denver Broncos beat?", "the Danube", "carbon dioxide and oxygen", "Lisbon Atlantic"]
    scores, rows = index.search(questions, 2)
    assert [passages[r].id for r in rows[:, 0]] == ["p6", "p5", "p7", "p4"]
    assert (scores[:, 0] > scores[:, 1]).all()


def test_unknown_kind_and_missing_retriever(tmp_path, passages):
    with pytest.raises(UserError, match="index kind"):
        build_index(passages, tmp_path / "x", retriever=None, kind="annoy")
    with pytest.raises(UserError, match="needs a retriever"):
        build_index(passages, tmp_path / "x", retriever=None, kind="flat")
    assert not (tmp_path / "x").exists()


# --- ExactIndex against brute force ---------------------------------------------------------------


@pytest.mark.parametrize(("count", "block", "k"), [(50, 1000, 5), (50, 7, 5), (50, 7, 13), (50, 16, 50), (20, 6, 31), (1, 4, 3)])
def test_exact_index_matches_brute_force(count, block, k):
    rng = np.random.default_rng(count + block + k)
    embeddings = rng.standard_normal((count, 8)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    scores, ids = ExactIndex(embeddings, block=block).search(queries, k)
    assert scores.shape == ids.shape == (4, k)
    brute = queries @ embeddings.T
    order = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    found = min(k, count)
    np.testing.assert_array_equal(ids[:, :found], order[:, :found])
    np.testing.assert_allclose(scores[:, :found], np.take_along_axis(brute, order, 1)[:, :found], rtol=1e-5, atol=1e-5)
    assert (ids[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


def test_exact_index_reads_a_memory_map(tmp_path):
    embeddings = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    np.save(tmp_path / "e.npy", embeddings)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    query = embeddings[:3]
    np.testing.assert_array_equal(ExactIndex(mapped, block=8).search(query, 4)[1], ExactIndex(embeddings).search(query, 4)[1])


# --- manifest checks ----------------------------------------------------------------------------


def test_refuses_another_passage_encoder(tmp_path, passages, retriever, tiny_dir, other_encoder_dir):
    build(passages, tmp_path / "index", retriever, "flat")
    other = load_retriever(str(other_encoder_dir))
    with pytest.raises(UserError) as error:
        RetrievalIndex.open(tmp_path / "index", other)
    message = str(error.value)
    assert str(tiny_dir / "encoder") in message and str(other_encoder_dir) in message
    assert "fingerprint" in message


def test_refuses_flipped_normalisation(tmp_path, passages, retriever, tiny_dir):
    build(passages, tmp_path / "index", retriever, "exact")
    flipped = load_retriever(str(tiny_dir / "encoder"), normalize=not retriever.passage_encoder.normalize)
    with pytest.raises(UserError, match="normalize"):
        RetrievalIndex.open(tmp_path / "index", flipped)
    with pytest.raises(UserError, match="passage_template"):
        RetrievalIndex.open(tmp_path / "index", load_retriever(str(tiny_dir / "encoder"), passage_template="{text}"))


def test_dense_index_needs_a_retriever(tmp_path, passages, retriever):
    build(passages, tmp_path / "index", retriever, "exact")
    with pytest.raises(UserError, match="needs a retriever"):
        RetrievalIndex.open(tmp_path / "index", None)


@pytest.mark.parametrize("make", ["missing", "empty", "files"])
def test_directory_without_manifest_is_not_an_index(tmp_path, retriever, make):
    directory = tmp_path / "d"
    if make != "missing":
        directory.mkdir()
    if make == "files":
        (directory / "embeddings.npy").write_bytes(b"")
    with pytest.raises(UserError, match="is not an index"):
        RetrievalIndex.open(directory, retriever)


def test_corrupt_manifest_is_a_user_error(tmp_path, passages, retriever):
    build(passages, tmp_path / "index", retriever, "exact")
    (tmp_path / "index" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        RetrievalIndex.open(tmp_path / "index", retriever)


def test_refuses_a_corpus_other_than_the_one_indexed(tmp_path, passages, retriever):
    out = tmp_path / "index"
    build(passages, out, retriever, "exact")
    Corpus.build(passages[:-1] + [Passage("p7", "Photosynthesis", "Changed text.")], out, progress=False)
    with pytest.raises(UserError, match="corpus does not match"):
        RetrievalIndex.open(out, retriever)


def test_refuses_a_manifest_fingerprint_that_does_not_match(tmp_path, passages):
    out = tmp_path / "index"
    build(passages, out, None, "bm25")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["corpus"]["fingerprint"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="corpus does not match"):
        RetrievalIndex.open(out)


# --- failed builds lose no data -----------------------------------------------------------------


def failing_after(passages, count, error):
    for passage in passages[:count]:
        yield passage
    raise error


@pytest.mark.parametrize("kind", ["exact", "hnsw", "bm25"])
@pytest.mark.parametrize("failure", ["reader", "empty text", "encoding", "interrupt"])
def test_failed_build_keeps_the_earlier_index(tmp_path, passages, retriever, monkeypatch, kind, failure):
    out = tmp_path / "index"
    build(passages, out, retriever, kind)
    before_files = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    before = RetrievalIndex.open(out, retriever).search(QUESTIONS, 4)

    replacement = synthetic_passages(20)
    expected: type[BaseException] = UserError
    if failure == "reader":
        source = failing_after(replacement, 5, UserError("corpus.jsonl, line 6: invalid JSON"))
    elif failure == "empty text":
        source = replacement[:5] + [Passage("bad", "", "   ")] + replacement[5:]
    elif failure == "interrupt":
        source, expected = failing_after(replacement, 5, KeyboardInterrupt()), KeyboardInterrupt
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("encoder crashed")

        monkeypatch.setattr(index_module, "encode_corpus", broken)
        monkeypatch.setattr(index_module.BM25Index, "build", broken)
        source, expected = replacement, RuntimeError
    with pytest.raises(expected):
        build(source, out, retriever, kind)

    assert siblings(out) == {"index"}  # no temporary or swapped-out directories left
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before_files
    after = RetrievalIndex.open(out, retriever).search(QUESTIONS, 4)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_rebuild_replaces_an_index(tmp_path, passages, retriever):
    out = tmp_path / "index"
    build(passages, out, retriever, "exact")
    rebuilt = build(synthetic_passages(12), out, retriever, "flat")
    assert rebuilt.kind == "flat" and len(rebuilt.corpus) == 12
    reopened = RetrievalIndex.open(out, retriever)
    assert reopened.kind == "flat" and reopened.corpus[0].id == "s0"
    assert siblings(out) == {"index"}


def test_build_into_an_empty_directory(tmp_path, passages, retriever):
    out = tmp_path / "index"
    out.mkdir()
    assert len(build(passages, out, retriever, "exact").corpus) == len(passages)
    assert siblings(out) == {"index"}


def test_refuses_a_non_empty_directory_that_is_not_an_index(tmp_path, passages, retriever):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match="not an index directory"):
        build(passages, out, retriever, "exact")
    assert (out / "notes.txt").read_text() == "precious"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert {p.name for p in out.rglob("*")} == {"notes.txt", "sub", "data.bin"}
    assert siblings(out) == {"results"}


def test_refuses_a_file_as_the_index_directory(tmp_path, passages, retriever):
    out = tmp_path / "index"
    out.write_text("not a directory")
    with pytest.raises(UserError, match="not an index directory"):
        build(passages, out, retriever, "exact")
    assert out.read_text() == "not a directory"
    assert siblings(out) == {"index"}


# --- stored embeddings and differentiable scores ------------------------------------------------


def test_embeddings_and_score(tmp_path, passages, retriever):
    index = build(passages, tmp_path / "index", retriever, "exact", precision="fp32")
    k = len(passages) + 2
    search_scores, rows = index.search(QUESTIONS, k)
    embeddings = index.embeddings(rows)
    assert embeddings.shape == (len(QUESTIONS), k, retriever.passage_encoder.dim)
    assert embeddings.dtype == torch.float32
    stored = np.load(tmp_path / "index" / "embeddings.npy")
    valid = rows >= 0
    np.testing.assert_array_equal(embeddings.numpy()[valid], stored[rows[valid]])
    assert (embeddings.numpy()[~valid] == 0).all()
    # the stored vectors are the passage tower's encodings
    encoded = retriever.passage_encoder.encode(retriever.passage_texts(passages))
    np.testing.assert_allclose(stored, encoded, rtol=1e-4, atol=1e-5)

    retriever.zero_grad(set_to_none=True)
    scores = retriever.score(QUESTIONS, embeddings)
    assert scores.shape == (len(QUESTIONS), k)
    expected = np.einsum("bd,bkd->bk", retriever.encode_queries(QUESTIONS), embeddings.numpy())
    np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores.detach().numpy()[valid], search_scores[valid], rtol=1e-4, atol=1e-4)

    scores.sum().backward()
    query_grads = [p.grad for p in retriever.query_encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in query_grads)
    assert all(p.grad is None for p in retriever.passage_encoder.parameters())
    retriever.zero_grad(set_to_none=True)


def test_embeddings_of_a_faiss_index(tmp_path, passages, retriever):
    index = build(passages, tmp_path / "index", retriever, "hnsw")
    rows = np.array([[3, -1], [0, 7]])
    embeddings = index.embeddings(rows)
    stored = np.load(tmp_path / "index" / "embeddings.npy")
    np.testing.assert_array_equal(embeddings[0, 0].numpy(), stored[3])
    assert (embeddings[0, 1] == 0).all()
    np.testing.assert_array_equal(embeddings[1].numpy(), stored[[0, 7]])


# --- precision ----------------------------------------------------------------------------------


def test_precision_is_recorded(tmp_path, passages, retriever):
    fp32 = build(passages, tmp_path / "fp32", retriever, "exact", precision="fp32")
    bf16 = build(passages, tmp_path / "bf16", retriever, "exact", precision="bf16")
    auto = build(passages, tmp_path / "auto", retriever, "exact")
    for index, precision in ((fp32, "fp32"), (bf16, "bf16")):
        assert index.manifest["precision"] == precision
        assert json.loads((index.directory / "manifest.json").read_text())["precision"] == precision
    assert auto.manifest["precision"] in ("fp32", "bf16")  # resolved, never "auto"
    a = np.load(tmp_path / "fp32" / "embeddings.npy")
    b = np.load(tmp_path / "bf16" / "embeddings.npy")
    assert a.dtype == b.dtype == np.float32
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_no_stray_files_in_the_working_directory(tmp_path, passages, retriever, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build(passages, "relative-index", retriever, "exact")
    assert os.listdir(tmp_path) == ["relative-index"]
    assert RetrievalIndex.open("relative-index", retriever).search(QUESTIONS[:1], 1)[1][0, 0] >= 0


@pytest.mark.parametrize(
    "params, message",
    [({"nlist": 10_000}, "nlist=10000 is larger than the corpus"), ({"m": 5}, "m=5 must divide"), ({"nlist": "abc"}, "positive integer"), ({"nbits": 12}, "nbits=12 needs")],
)
def test_bad_ivfpq_settings_are_user_errors(params, message):
    from jointrag.retrieval.index import FaissIndex

    embeddings = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    with pytest.raises(UserError, match=message):
        FaissIndex.build(embeddings, "ivfpq", {**FaissIndex.default_params("ivfpq", 300, 32), **params})


def test_faiss_padding_is_minus_infinity():
    from jointrag.retrieval.index import FaissIndex

    embeddings = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    scores, ids = FaissIndex.build(embeddings, "flat", {}).search(embeddings[:2], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


# --- IVF-PQ re-ranking and training sample ------------------------------------------------------


def clustered_vectors(count: int, dim: int = 32, clusters: int = 20, queries: int = 50, seed: int = 0):
    """Unit vectors in Gaussian clusters, and queries near (not at) corpus vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, count, queries)] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_at(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact_ids.tolist())]))


def test_ivfpq_reranking_raises_recall_and_returns_exact_scores():
    from jointrag.retrieval.index import FaissIndex

    x, q = clustered_vectors(4000)
    params = FaissIndex.default_params("ivfpq", len(x), x.shape[1])
    assert params["rerank"] == FaissIndex.RERANK > 0  # on by default
    index = FaissIndex.build(x, "ivfpq", params)
    exact_ids = ExactIndex(x).search(q, 10)[1]
    scores, ids = index.search(q, 10)
    index.configure({**params, "rerank": 0})
    approx_scores, approx_ids = index.search(q, 10)
    assert recall_at(ids, exact_ids) >= recall_at(approx_ids, exact_ids)
    assert recall_at(ids, exact_ids) > 0.9
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", q, x[ids]), rtol=1e-5, atol=1e-6)  # exact, not PQ, scores
    assert (np.diff(scores, axis=1) <= 0).all()
    assert not np.allclose(approx_scores, np.einsum("nd,nkd->nk", q, x[approx_ids]), atol=1e-3)  # PQ scores are approximate


def test_ivfpq_reranking_over_the_whole_corpus_is_exact_search():
    from jointrag.retrieval.index import FaissIndex

    x, q = clustered_vectors(600, queries=20)
    params = FaissIndex.default_params("ivfpq", len(x), x.shape[1])
    params.update(nprobe=params["nlist"], rerank=len(x))  # every list probed, every vector a candidate
    scores, ids = FaissIndex.build(x, "ivfpq", params).search(q, 10)
    exact_scores, exact_ids = ExactIndex(x).search(q, 10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)
    # more results than passages: padded with -1 and -inf, as every index pads
    scores, ids = FaissIndex.build(x[:300], "ivfpq", {**FaissIndex.default_params("ivfpq", 300, 32), "rerank": 2}).search(q[:2], 400)
    assert (ids[:, :300] >= 0).all() and (ids[:, 300:] == -1).all() and np.isneginf(scores[:, 300:]).all()
    assert sorted(ids[0, :300].tolist()) == list(range(300))


def test_ivfpq_rerank_setting_through_an_index_directory(tmp_path, retriever):
    passages = synthetic_passages(300)
    out = tmp_path / "ivfpq"
    built = build(passages, out, retriever, "ivfpq")
    assert built.manifest["params"]["rerank"] == built.vectors.rerank > 0
    assert isinstance(built.vectors.embeddings, np.memmap)  # re-ranking reads the stored embeddings from disk
    queries = retriever.encode_queries(QUESTIONS)
    stored = np.load(out / "embeddings.npy")
    scores, rows = built.search_embeddings(queries, 5)
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, stored[rows]), rtol=1e-5, atol=1e-6)
    plain = RetrievalIndex.open(out, retriever, {"rerank": 0})
    assert plain.vectors.rerank == 0 and plain.search_embeddings(queries, 5)[1].shape == (3, 5)
    with pytest.raises(UserError, match="rerank=-1 must be a non-negative integer"):
        RetrievalIndex.open(out, retriever, {"rerank": -1})
    with pytest.raises(UserError, match="rerank=-1 must be a non-negative integer"):
        build(passages, tmp_path / "bad", retriever, "ivfpq", params={"rerank": -1})


def test_ivfpq_rerank_needs_the_embeddings(tmp_path):
    from jointrag.retrieval.index import FaissIndex

    x, _ = clustered_vectors(600)
    params = FaissIndex.default_params("ivfpq", len(x), x.shape[1])
    FaissIndex.build(x, "ivfpq", params).save(tmp_path)  # no embeddings.npy next to it
    with pytest.raises(UserError, match="rerank needs the index's float32 embeddings"):
        FaissIndex.load(tmp_path, "ivfpq", params)
    assert FaissIndex.load(tmp_path, "ivfpq", {**params, "rerank": 0}).search(x[:2], 3)[1].shape == (2, 3)


def test_ivfpq_training_sample_is_capped(monkeypatch):
    import faiss

    from jointrag.retrieval.index import FaissIndex

    params = FaissIndex.default_params("ivfpq", 1_000_000, 384)
    size = FaissIndex.train_size(1_000_000, params)
    assert 39 * params["nlist"] <= size == FaissIndex.TRAIN_PER_LIST * params["nlist"] < 1_000_000 // 3
    assert FaissIndex.train_size(100, {"nlist": 2, "nbits": 4}) == 100  # never more than the corpus
    assert FaissIndex.train_size(100_000, {"nlist": 16, "nbits": 8}) == 256 * 256  # PQ k-means: 256 per centroid

    trained = []
    original = faiss.IndexIVFPQ.train
    monkeypatch.setattr(faiss.IndexIVFPQ, "train", lambda self, x: trained.append(len(x)) or original(self, x))
    x, _ = clustered_vectors(20_000)
    params = {"nlist": 40, "m": 8, "nbits": 6, "nprobe": 8, "rerank": 0}
    FaissIndex.build(x, "ivfpq", params)
    assert trained == [FaissIndex.train_size(20_000, params)] == [max(64 * 40, 256 * 64)]
