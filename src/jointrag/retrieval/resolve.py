"""Indexes by name: the default index location, building an index from a corpus file, and opening an
index with its towers (the default: the embedded SQuAD index, built on first use)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from ..data.corpus import chunk_passages, read_passages
from ..data.qa import EMBEDDED_SQUAD
from ..errors import UserError
from ..io import check_out_dir
from ..models import default_home
from ..types import Passage
from .encoders import load_retriever
from .index import RetrievalIndex, build_index, read_manifest
from .sharded import build_index_sharded


def default_index_dir() -> Path:
    return default_home() / "indexes" / "squad-v1.1-dev-minilm"


def non_empty(passages: Iterator[Passage], source: Path) -> Iterator[Passage]:
    """`passages`, refusing at their end a file that held none (named, rather than the build's temporary directory)."""
    count = 0
    for passage in passages:
        count += 1
        yield passage
    if not count:
        raise UserError(f"{source}: no passages; the corpus file is empty")


def build_from_file(
    corpus: str | Path | None = None,
    out: str | Path | None = None,
    *,
    format: str | None = None,
    chunk_words: int | None = None,
    retriever: str | None = None,
    kind: str = "exact",
    params: dict | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    memory_check: bool = True,
    sharded: bool = False,
) -> RetrievalIndex | None:
    """Store and encode the passages of `corpus` (default: the embedded SQuAD paragraphs) and build a
    `kind` index in `out` (default: the default index location). `sharded`: under torchrun, every rank
    encodes its share of the corpus and only rank 0 gets the index (None elsewhere)."""
    corpus_path = Path(corpus) if corpus else EMBEDDED_SQUAD
    if corpus_path.is_dir():
        raise UserError(f"--corpus {corpus_path} is a directory; give the corpus file (.jsonl, .tsv or SQuAD .json)")
    if not corpus_path.is_file():
        raise UserError(f"corpus file {corpus_path} does not exist")
    check_out_dir(Path(out) if out else default_index_dir())  # before the encoder loads
    passages = non_empty(read_passages(corpus_path, format), corpus_path)
    if chunk_words:
        passages = chunk_passages(passages, chunk_words)
    encoder = None if kind == "bm25" else load_retriever(retriever)
    return (build_index_sharded if sharded else build_index)(
        passages, Path(out) if out else default_index_dir(), retriever=encoder, kind=kind, params=params or {},
        batch_size=batch_size, precision=precision, source=str(corpus_path), memory_check=memory_check,
    )


def resolve_index(index: str | Path | None, retriever_name: str | None = None, params: dict | None = None) -> RetrievalIndex:
    """Open `index` (default: the embedded SQuAD index, built on first use) with its passage tower
    and the query tower `retriever_name` (default: the encoder named in the manifest)."""
    if index is None:
        directory = default_index_dir()
        if not (directory / "manifest.json").is_file():
            print(f"building the default index in {directory} (once)", file=sys.stderr)
            return build_from_file()
    else:
        directory = Path(index)
    manifest = read_manifest(directory)
    encoder = manifest.get("encoder")
    retriever = None
    if encoder is not None:
        retriever = load_retriever(
            retriever_name or encoder["name"],
            pooling=encoder["pooling"],
            normalize=encoder["normalize"],
            max_length=encoder["max_length"],
            passage_template=encoder["passage_template"],
            query_template=encoder.get("query_template", "{question}"),  # recorded since LLM retrievers (instruction prefixes)
        )
    return RetrievalIndex.open(directory, retriever, params or {})
