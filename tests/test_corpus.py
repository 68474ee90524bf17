"""Tests for jointrag.data.corpus: readers, chunking, and the memory-mapped store."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import jointrag.data.corpus as corpus_module
from jointrag.data.corpus import Corpus, chunk_passages, read_passages
from jointrag.errors import UserError
from jointrag.types import Passage

SQUAD_RESOURCE = Path(corpus_module.__file__).parent.parent / "resources" / "squad-v1.1-dev-part-a.json.gz"

CORPUS_FILES = ["corpus.arrow", "corpus.json"]
PASSAGES = [
    Passage("a", "Alpha", "the first passage"),
    Passage("b", "", "the second passage"),
    Passage("c", "Gamma", "the third passage, with a tab\tand a \"quote\""),
]


def write(path: Path, content: str) -> Path:
    """Write `content` as UTF-8, gzipped when the name ends in .gz."""
    data = content.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def build(passages: list[Passage], directory: Path) -> Corpus:
    return Corpus.build(passages, directory, batch_size=2, progress=False)


# --- readers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_jsonl(tmp_path: Path, name: str) -> None:
    lines = [
        {"id": 7, "title": "T", "text": "seven"},
        {"id": "x", "text": "no title"},
        {"id": "y", "title": None, "text": "null title", "extra": 1},
    ]
    path = write(tmp_path / name, "\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert list(read_passages(path)) == [
        Passage("7", "T", "seven"),
        Passage("x", "", "no title"),
        Passage("y", "", "null title"),
    ]


@pytest.mark.parametrize("name", ["c.tsv", "c.tsv.gz"])
def test_tsv_dpr_layout_with_quoted_text(tmp_path: Path, name: str) -> None:
    content = (
        "id\ttext\ttitle\n"
        '1\t"Aaron is a prophet"\tAaron\n'
        '2\t"a tab\there, ""quotes"" and\na newline"\tB "title"\n'
        "3\tunquoted text\tC\n"
    )
    path = write(tmp_path / name, content)
    assert list(read_passages(path)) == [
        Passage("1", "Aaron", "Aaron is a prophet"),
        Passage("2", 'B "title"', 'a tab\there, "quotes" and\na newline'),
        Passage("3", "C", "unquoted text"),
    ]


def test_tsv_columns_found_by_header_and_title_optional(tmp_path: Path) -> None:
    path = write(tmp_path / "c.tsv", "text\tid\nhello world\tp1\n")
    assert list(read_passages(path)) == [Passage("p1", "", "hello world")]


def squad_json() -> str:
    paragraph = {"context": "", "qas": [{"id": "q", "question": "?", "answers": []}]}
    return json.dumps(
        {
            "version": "1.1",
            "data": [
                {
                    "title": "Art_A",
                    "paragraphs": [{**paragraph, "context": "a0"}, {**paragraph, "context": "a1"}],
                },
                {"title": "Art_B", "paragraphs": [{**paragraph, "context": "b0"}]},
            ],
        }
    )


@pytest.mark.parametrize("name", ["s.json", "s.json.gz"])
def test_squad_ids_are_title_and_paragraph_index(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, squad_json())
    assert list(read_passages(path)) == [
        Passage("Art_A#0", "Art_A", "a0"),
        Passage("Art_A#1", "Art_A", "a1"),
        Passage("Art_B#0", "Art_B", "b0"),
    ]


def test_embedded_squad_resource() -> None:
    passages = list(read_passages(SQUAD_RESOURCE))
    assert passages[0].id == "Super_Bowl_50#0"
    assert passages[0].text.startswith("Super Bowl 50 was an American football game")
    assert len({p.id for p in passages}) == len(passages)


def test_explicit_format_overrides_suffix(tmp_path: Path) -> None:
    path = write(tmp_path / "passages.txt", '{"id": "a", "text": "x"}\n')
    assert list(read_passages(path, fmt="jsonl")) == [Passage("a", "", "x")]


def test_unknown_suffix_names_file_and_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "passages.txt", "")
    with pytest.raises(UserError, match=r"passages\.txt.*\.jsonl.*\.tsv.*\.json"):
        list(read_passages(path))


def test_unknown_format_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", "")
    with pytest.raises(UserError, match="unknown corpus format 'csv'.*jsonl, tsv, squad"):
        list(read_passages(path, fmt="csv"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.jsonl: corpus file not found"):
        list(read_passages(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', r"c\.jsonl, line 2: invalid JSON \(Expecting value\)"),
        ('{"id": "a", "text": "x"}\n\n{"id": "b"}\n', r"c\.jsonl, line 3, field 'text': missing"),
        ('{"text": "x"}\n', r"c\.jsonl, line 1, field 'id': missing"),
        ('{"id": 1.5, "text": "x"}\n', r"line 1, field 'id': wrong type float"),
        ('{"id": true, "text": "x"}\n', r"line 1, field 'id': wrong type bool"),
        ('{"id": "a", "text": 3}\n', r"line 1, field 'text': wrong type int"),
        ('["a", "x"]\n', r"line 1: expected a JSON object, got list$"),
    ],
)
def test_bad_jsonl(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "c.jsonl", content)
    with pytest.raises(UserError, match=expected):
        list(read_passages(path))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "id\ttext\ttitle\n1\tok\tT\n2\tonly text\n",
            r"c\.tsv, line 3, field 'title': missing column",
        ),
        ("id\ttext\ttitle\n1\n", r"c\.tsv, line 2, field 'text': missing column"),
        ("id\ttext\ttitle\n1\ta\tb\tc\n", r"c\.tsv, line 2: 4 tab-separated columns"),
        ("1\tsome text\tTitle\n", r"c\.tsv, line 1: header has no 'id' column"),
        ("", r"c\.tsv: empty file"),
    ],
)
def test_bad_tsv(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "c.tsv", content)
    with pytest.raises(UserError, match=expected):
        list(read_passages(path))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"version": "1.1"}, r"field 'data': missing"),
        ({"data": [{"paragraphs": []}]}, r"field 'data\[0\]\.title': missing"),
        (
            {"data": [{"title": "T", "paragraphs": [{"qas": []}]}]},
            r"field 'data\[0\]\.paragraphs\[0\]\.context': missing",
        ),
    ],
)
def test_bad_squad(tmp_path: Path, data: dict, expected: str) -> None:
    path = write(tmp_path / "s.json", json.dumps(data))
    with pytest.raises(UserError, match=expected):
        list(read_passages(path))


def test_squad_invalid_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", '{"data": [\n\n}')
    with pytest.raises(UserError, match=r"s\.json, line 3: invalid JSON"):
        list(read_passages(path))


def test_invalid_utf8_and_corrupt_gzip(tmp_path: Path) -> None:
    bad_utf8 = tmp_path / "c.jsonl"
    bad_utf8.write_bytes(b'{"id": "a", "text": "\xff"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl: not valid UTF-8"):
        list(read_passages(bad_utf8))
    truncated = tmp_path / "c.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"id": "a", "text": "x"}\n' * 100)[:40])
    with pytest.raises(UserError, match=r"c\.jsonl\.gz: corrupt or truncated gzip"):
        list(read_passages(truncated))


# --- chunking ------------------------------------------------------------------------------------


def test_chunking_splits_long_passages_and_keeps_short_ones() -> None:
    short = Passage("s", "Short", "  exactly   three words ")
    long = Passage("l", "Long", " ".join(f"w{i}" for i in range(7)))
    chunks = list(chunk_passages([short, long], max_words=3))
    assert chunks[0] is short  # fits: untouched, same id, spacing kept
    assert chunks[1:] == [
        Passage("l@0", "Long", "w0 w1 w2"),
        Passage("l@1", "Long", "w3 w4 w5"),
        Passage("l@2", "Long", "w6"),
    ]
    assert all(len(chunk.text.split()) <= 3 for chunk in chunks)


def test_chunking_is_lazy_and_rejects_nonpositive_limit() -> None:
    def endless() -> Iterator[Passage]:
        while True:
            yield Passage("x", "", "a b")

    assert next(chunk_passages(endless(), max_words=1)).id == "x@0"
    with pytest.raises(UserError, match="max_words must be at least 1, got 0"):
        chunk_passages([], max_words=0)


# --- the store -----------------------------------------------------------------------------------


def test_build_open_round_trip(tmp_path: Path) -> None:
    built = build(PASSAGES, tmp_path / "corpus")
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == CORPUS_FILES
    meta = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert meta == {"count": 3, "fingerprint": built.fingerprint, "format": 1}

    corpus = Corpus.open(tmp_path / "corpus")
    assert len(corpus) == 3
    assert corpus.fingerprint == built.fingerprint
    assert [corpus[i] for i in range(3)] == PASSAGES
    assert corpus.get([2, -1, 0]) == [PASSAGES[2], None, PASSAGES[0]]
    assert list(corpus.iter_batches(2)) == [PASSAGES[:2], PASSAGES[2:]]
    assert list(corpus.iter_batches(5)) == [PASSAGES]
    assert [corpus.row_of(p.id) for p in PASSAGES] == [0, 1, 2]
    assert corpus.row_of("missing") is None


def test_out_of_range_rows_raise(tmp_path: Path) -> None:
    corpus = build(PASSAGES, tmp_path)
    for row in (3, -1, -2):
        with pytest.raises(IndexError):
            corpus[row]
    with pytest.raises(IndexError):
        corpus.get([0, -2])


def test_build_streams_from_reader_and_chunker(tmp_path: Path) -> None:
    passages = list(chunk_passages(read_passages(SQUAD_RESOURCE), max_words=100))
    corpus = Corpus.build(iter(passages), tmp_path, batch_size=64, progress=False)
    assert len(corpus) == len(passages)
    assert corpus[len(passages) - 1] == passages[-1]
    assert [p for batch in corpus.iter_batches(100) for p in batch] == passages
    assert corpus.row_of(passages[500].id) == 500


def test_fingerprint_depends_on_content_only(tmp_path: Path) -> None:
    first = build(PASSAGES, tmp_path / "1").fingerprint
    assert build(PASSAGES, tmp_path / "2").fingerprint == first
    assert Corpus.build(PASSAGES, tmp_path / "3", batch_size=1, progress=False).fingerprint == first
    changed = [*PASSAGES[:2], Passage("c", "Gamma", "another text")]
    assert build(changed, tmp_path / "4").fingerprint != first
    retitled = [Passage("a", "", "the first passage"), *PASSAGES[1:]]
    assert build(retitled, tmp_path / "5").fingerprint != first
    # Moving characters across a field boundary must change the fingerprint.
    shifted_a = [Passage("a", "xy", "z")]
    shifted_b = [Passage("a", "x", "yz")]
    shifted_fingerprint = build(shifted_b, tmp_path / "7").fingerprint
    assert build(shifted_a, tmp_path / "6").fingerprint != shifted_fingerprint


@pytest.mark.parametrize(
    ("passages", "expected"),
    [
        ([PASSAGES[0], Passage("b", "T", "  \n ")], r"passage 'b' \(position 1\) has empty text"),
        ([Passage(" ", "T", "text")], r"passage at position 0 has an empty id"),
        (
            [*PASSAGES, Passage("b", "Again", "other")],
            r"duplicate passage id 'b' at positions 1 and 3",
        ),
        ([], r"the corpus is empty"),
    ],
)
def test_bad_passages_rejected(tmp_path: Path, passages: list[Passage], expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        build(passages, tmp_path / "corpus")
    assert not (tmp_path / "corpus" / "corpus.json").exists()


def test_hash_collisions_are_confirmed_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus_module, "_id_hash", lambda passage_id: 42)  # every id collides
    corpus = build(PASSAGES, tmp_path / "ok")  # distinct ids: no false duplicate
    assert [corpus.row_of(p.id) for p in PASSAGES] == [0, 1, 2]
    assert corpus.row_of("missing") is None
    with pytest.raises(UserError, match=r"duplicate passage id 'a' at positions 0 and 3"):
        build([*PASSAGES, PASSAGES[0]], tmp_path / "dup")


def failing_midway() -> Iterator[Passage]:
    yield Passage("new1", "", "new text")
    yield Passage("new2", "", "new text")
    raise UserError("reader failed")


def test_failed_build_keeps_existing_corpus(tmp_path: Path) -> None:
    original = build(PASSAGES, tmp_path)
    with pytest.raises(UserError, match="reader failed"):
        Corpus.build(failing_midway(), tmp_path, batch_size=1, progress=False)
    reopened = Corpus.open(tmp_path)
    assert reopened.fingerprint == original.fingerprint
    assert [reopened[i] for i in range(len(reopened))] == PASSAGES
    assert sorted(p.name for p in tmp_path.iterdir()) == CORPUS_FILES


def test_failed_build_in_fresh_directory_leaves_no_corpus(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="reader failed"):
        Corpus.build(failing_midway(), tmp_path / "fresh", batch_size=1, progress=False)
    assert list((tmp_path / "fresh").iterdir()) == []
    with pytest.raises(UserError, match="not a complete corpus"):
        Corpus.open(tmp_path / "fresh")


def test_crash_between_renames_leaves_a_corpus_open_rejects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(PASSAGES, tmp_path)
    real_replace = os.replace

    def replace_then_crash_on_meta(src: Path, dst: Path) -> None:
        if Path(dst).name == "corpus.json":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        build([Passage("z", "", "a new corpus")], tmp_path)
    # The new arrow file is in place, but the old corpus.json must not vouch for it.
    with pytest.raises(UserError, match=r"not a complete corpus \(no corpus\.json"):
        Corpus.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.arrow"]


def test_open_rejects_missing_and_mismatched_files(tmp_path: Path) -> None:
    hint = r"jointrag index --corpus PATH --out DIR"
    with pytest.raises(UserError, match=rf"no such directory.*{hint}"):
        Corpus.open(tmp_path / "absent")
    with pytest.raises(UserError, match=rf"no corpus\.json.*{hint}"):
        Corpus.open(tmp_path)

    build(PASSAGES, tmp_path)
    meta_path = tmp_path / "corpus.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "count": 4}))
    with pytest.raises(UserError, match=r"corpus\.json says 4 passages, corpus\.arrow holds 3"):
        Corpus.open(tmp_path)
    meta_path.write_text(json.dumps({**meta, "format": 2}))
    with pytest.raises(UserError, match=r"format 2, expected 1"):
        Corpus.open(tmp_path)
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "corpus.arrow").write_bytes(b"not arrow")
    with pytest.raises(UserError, match=r"corpus\.arrow is not a readable Arrow file"):
        Corpus.open(tmp_path)
    (tmp_path / "corpus.arrow").unlink()
    with pytest.raises(UserError, match=rf"no corpus\.arrow.*{hint}"):
        Corpus.open(tmp_path)
