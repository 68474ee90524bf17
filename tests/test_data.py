"""Tests for jointrag.data.qa: the QA formats, format detection, the embedded split and input errors."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from jointrag.data.qa import (
    EMBEDDED_SQUAD,
    embedded_examples,
    load_examples,
    split_of_article,
)
from jointrag.errors import UserError
from jointrag.types import Example

SQUAD_DOC = {
    "version": "1.1",
    "data": [
        {
            "title": "Cats",
            "paragraphs": [
                {
                    "context": "Cats purr.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "What do cats do?",
                            "answers": [
                                {"text": "purr", "answer_start": 5},
                                {"text": "purr", "answer_start": 5},
                                {"text": "Cats purr", "answer_start": 0},
                            ],
                        }
                    ],
                },
                {
                    "context": "Cats sleep a lot.",
                    "qas": [
                        {
                            "id": "q2",
                            "question": "How much do cats sleep?",
                            "answers": [{"text": "a lot", "answer_start": 11}],
                        }
                    ],
                },
            ],
        },
        {
            "title": "Dogs",
            "paragraphs": [
                {
                    "context": "Dogs bark.",
                    "qas": [
                        {
                            "id": "q3",
                            "question": "What do dogs do?",
                            "answers": [{"text": "bark", "answer_start": 5}],
                        }
                    ],
                }
            ],
        },
    ],
}

DPR_DOC = [
    {
        "question": "who wrote hamlet",
        "answers": ["Shakespeare", "William Shakespeare"],
        "positive_ctxs": [
            {"passage_id": "101", "title": "Hamlet", "text": "Hamlet is by Shakespeare."},
            {"id": 102, "title": "Shakespeare", "text": "William Shakespeare wrote plays."},
        ],
        "negative_ctxs": [],
    },
    {"question": "capital of france", "answers": ["Paris"], "positive_ctxs": []},
]


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path`, gzipped when the name ends in `.gz`."""
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, doc: object) -> Path:
    return write_text(path, json.dumps(doc, indent=1))


def write_jsonl(path: Path, records: list[object]) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def user_error(path: Path, fmt: str | None = None) -> str:
    """The message of the UserError that loading `path` must raise."""
    with pytest.raises(UserError) as info:
        load_examples(path, fmt)
    return str(info.value)


# --- the formats ------------------------------------------------------------------------------------


EXPECTED_SQUAD = [
    Example("q1", "What do cats do?", ("purr", "Cats purr"), ("Cats#0",)),
    Example("q2", "How much do cats sleep?", ("a lot",), ("Cats#1",)),
    Example("q3", "What do dogs do?", ("bark",), ("Dogs#0",)),
]


@pytest.mark.parametrize("name", ["squad.json", "squad.json.gz"])
def test_squad_ids_answers_and_gold_paragraphs(tmp_path: Path, name: str) -> None:
    path = write_json(tmp_path / name, SQUAD_DOC)
    assert load_examples(path) == EXPECTED_SQUAD
    assert load_examples(path, "squad") == EXPECTED_SQUAD


@pytest.mark.parametrize("name", ["qa.jsonl", "qa.jsonl.gz"])
def test_jsonl_fields_defaults_and_blank_lines(tmp_path: Path, name: str) -> None:
    text = (
        json.dumps({"id": "a", "question": "Q1?", "answers": ["x", "y", "x"], "gold_ids": ["P#0"]})
        + "\n\n   \n"
        + json.dumps({"question": "Q2?", "answers": ["z"]})
        + "\n"
    )
    path = write_text(tmp_path / name, text)
    assert load_examples(path) == [
        Example("a", "Q1?", ("x", "y"), ("P#0",)),
        Example("qa:4", "Q2?", ("z",), ()),  # default id: file stem and 1-based line, blank lines counted
    ]


def test_jsonl_integer_id_becomes_string(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": 7, "question": "Q?", "answers": ["a"]}])
    assert load_examples(path)[0].id == "7"


def test_nq_open_lines_use_answer_field(tmp_path: Path) -> None:
    records = [
        {"question": "when was the last moon landing", "answer": ["14 December 1972 UTC", "December 1972"]},
        {"question": "one string answer", "answer": "Bob"},
    ]
    path = write_jsonl(tmp_path / "NQ-open.dev.jsonl", records)
    expected = [
        Example("NQ-open.dev:1", records[0]["question"], ("14 December 1972 UTC", "December 1972")),
        Example("NQ-open.dev:2", "one string answer", ("Bob",)),
    ]
    assert load_examples(path) == expected
    assert load_examples(path, "nq-open") == expected


@pytest.mark.parametrize("name", ["dpr.json", "dpr.json.gz"])
def test_dpr_gold_ids_from_positive_contexts(tmp_path: Path, name: str) -> None:
    path = write_json(tmp_path / name, DPR_DOC)
    expected = [
        Example("dpr:0", "who wrote hamlet", ("Shakespeare", "William Shakespeare"), ("101", "102")),
        Example("dpr:1", "capital of france", ("Paris",), ()),
    ]
    assert load_examples(path) == expected
    assert load_examples(path, "dpr") == expected


def test_explicit_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "questions.txt", [{"question": "Q?", "answers": ["a"]}])
    assert load_examples(path, "jsonl") == [Example("questions:1", "Q?", ("a",))]


# --- the embedded SQuAD split -----------------------------------------------------------------------


def test_split_rule() -> None:
    assert [split_of_article(i) for i in range(12)] == [
        "train", "train", "train", "train", "dev", "test",
        "train", "train", "train", "train", "dev", "test",
    ]  # fmt: skip


def articles_of(examples: list[Example]) -> set[str]:
    return {gold.split("#")[0] for ex in examples for gold in ex.gold_ids}


def test_embedded_splits_partition_by_article() -> None:
    splits = {name: embedded_examples(name) for name in ("train", "dev", "test")}
    everything = embedded_examples("all")
    assert len(everything) == 4961
    assert sum(len(examples) for examples in splits.values()) == 4961
    assert Counter(ex.id for examples in splits.values() for ex in examples) == Counter(
        ex.id for ex in everything
    )
    articles = {name: articles_of(examples) for name, examples in splits.items()}
    assert [len(articles[name]) for name in ("train", "dev", "test")] == [16, 4, 4]
    assert articles["train"].isdisjoint(articles["dev"])
    assert articles["train"].isdisjoint(articles["test"])
    assert articles["dev"].isdisjoint(articles["test"])
    assert len(articles_of(everything)) == 24


def test_embedded_test_split_is_articles_5_11_17_23() -> None:
    # Articles 5, 11, 17, 23 of the file, in order; pinned so the split can never drift silently.
    titles = articles_of(embedded_examples("test"))
    assert titles == {"1973_oil_crisis", "Newcastle_upon_Tyne", "Jacksonville,_Florida", "Force"}


def test_embedded_examples_match_loading_the_file() -> None:
    assert embedded_examples("all") == load_examples(EMBEDDED_SQUAD)


def test_unknown_split_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="'validation'.*train, dev, test, all"):
        embedded_examples("validation")


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    message = user_error(path)
    assert str(path) in message and "no such file" in message


def test_unknown_format_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answers": ["a"]}])
    assert "unknown QA format 'csv'" in user_error(path, "csv")


def test_undetectable_suffix(tmp_path: Path) -> None:
    path = write_text(tmp_path / "qa.txt", "{}")
    message = user_error(path)
    assert str(path) in message and "cannot tell the QA format" in message


def test_jsonl_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "qa.jsonl", '{"question": "Q?", "answers": ["a"]}\n\n{"question": \n')
    message = user_error(path)
    assert message.startswith(f"{path}, line 3: invalid JSON")


def test_gzipped_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "qa.jsonl.gz", '{"question": "Q?", "answers": ["a"]}\n{"question": "Q?"}\n')
    assert user_error(path).startswith(f"{path}, line 2, field 'answers': missing field")


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"answers": ["a"]}, "question", "missing field"),
        ({"question": 3, "answers": ["a"]}, "question", "expected a string, got an integer"),
        ({"question": "  ", "answers": ["a"]}, "question", "empty question"),
        ({"question": "Q?"}, "answers", "missing field"),
        ({"question": "Q?", "answers": "a"}, "answers", "expected a list of strings, got a string"),
        (
            {"question": "Q?", "answers": ["a", 1]},
            "answers",
            "expected a list of strings, got a list containing an integer",
        ),
        ({"question": "Q?", "answer": []}, "answer", "empty list; answers are needed to evaluate (an unanswerable question has"),
        ({"question": "Q?", "answer": [None]}, "answer", "expected a list of strings"),
        ({"question": "Q?", "answers": ["a"], "id": ["x"]}, "id", "expected a string or integer id"),
        ({"question": "Q?", "answers": ["a"], "gold_ids": "P#0"}, "gold_ids", "expected a list of strings"),
    ],
)
def test_jsonl_bad_record_names_line_and_field(
    tmp_path: Path, record: dict, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "ok?", "answers": ["a"]}, record])
    message = user_error(path)
    assert message.startswith(f"{path}, line 2, field '{field}': {problem}")


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_text(tmp_path / "qa.jsonl", '{"question": "Q?", "answers": ["a"]}\n["Q?", "a"]\n')
    assert user_error(path).startswith(f"{path}, line 2: expected a JSON object, got a list")


@pytest.mark.parametrize("indent", [None, 1])  # one line, or pretty-printed over many
def test_squad_file_read_as_jsonl_is_a_wrong_format(tmp_path: Path, indent: int | None) -> None:
    path = write_text(tmp_path / "squad.jsonl", json.dumps(SQUAD_DOC, indent=indent))
    message = user_error(path, "jsonl")
    assert message.startswith(str(path)) and "SQuAD" in message and "'squad'" in message


def test_dpr_file_read_as_squad_is_a_wrong_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dpr.json", DPR_DOC)
    message = user_error(path, "squad")
    assert message.startswith(str(path)) and "'dpr'" in message


def test_squad_file_read_as_dpr_is_a_wrong_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "squad.json", SQUAD_DOC)
    message = user_error(path, "dpr")
    assert message.startswith(str(path)) and "'squad'" in message


def test_jsonl_file_read_as_json_suggests_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answers": ["a"]}] * 2)
    message = user_error(path, "squad")
    assert message.startswith(f"{path}, line 2: invalid JSON") and "'jsonl'" in message


def test_json_that_is_neither_squad_nor_dpr(tmp_path: Path) -> None:
    path = write_json(tmp_path / "other.json", {"questions": []})
    message = user_error(path)
    assert message.startswith(str(path)) and "neither SQuAD" in message


def test_invalid_json_document_names_the_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "squad.json", '{\n  "data": [\n    oops\n  ]\n}\n')
    assert user_error(path).startswith(f"{path}, line 3: invalid JSON")


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    message = user_error(path)
    assert message.startswith(f"{path}: cannot read")


# --- unanswerable questions ------------------------------------------------------------------------

CLAPNQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "clapnq-dev"


def test_jsonl_empty_answers_mark_an_unanswerable_question(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "u1", "question": "Who won in 2030?", "answers": [], "gold_ids": ["p1"]},
        {"id": "u2", "question": "Who won in 2031?", "answers": ["", "  "]},  # ClapNQ's unanswerable answer is ""
        {"id": "a1", "question": "Who won?", "answers": ["", "Denver Broncos"]},
    ])
    assert load_examples(path) == [
        Example("u1", "Who won in 2030?", (), ("p1",)),
        Example("u2", "Who won in 2031?", ()),
        Example("a1", "Who won?", ("Denver Broncos",)),
    ]


def test_squad_is_impossible_marks_an_unanswerable_question(tmp_path: Path) -> None:
    def impossible(doc: dict) -> None:
        doc["data"][1]["paragraphs"][0]["qas"][0].update(answers=[], is_impossible=True)

    examples = load_examples(write_json(tmp_path / "squad.json", squad_with(impossible)))
    assert examples[2] == Example("q3", "What do dogs do?", (), ("Dogs#0",))
    assert examples[:2] == EXPECTED_SQUAD[:2]


@pytest.mark.skipif(not CLAPNQ.is_dir(), reason=f"no ClapNQ data at {CLAPNQ}")
def test_clapnq_dev_as_jsonl(tmp_path: Path) -> None:
    """ClapNQ's records as our JSON Lines, answers = every `output[*].answer`: its 300 unanswerable
    questions (answer "") load with no answers, its 300 answerable ones with 1 to 7 long answers."""
    records = []
    for name in ("clapnq_dev_answerable.jsonl.gz", "clapnq_dev_unanswerable.jsonl.gz"):
        for line in gzip.open(CLAPNQ / name, "rt", encoding="utf-8"):
            row = json.loads(line)
            records.append({"id": row["id"], "question": row["input"], "answers": [o["answer"] for o in row["output"]]})
    examples = load_examples(write_jsonl(tmp_path / "clapnq.jsonl", records))
    assert sum(not e.answers for e in examples) == 300
    assert Counter(len(e.answers) for e in examples[:300]).keys() <= set(range(1, 8))
    assert all(e.answers for e in examples[:300]) and not any(e.answers for e in examples[300:])


def squad_with(change) -> dict:
    """A deep copy of SQUAD_DOC with `change` applied to it."""
    doc = json.loads(json.dumps(SQUAD_DOC))
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda d: d.pop("data"), None, "neither SQuAD"),
        (lambda d: d.update(data={}), "data", "expected a list, got an object"),
        (lambda d: d["data"][1].pop("title"), "data[1].title", "missing field"),
        (lambda d: d["data"][0].update(paragraphs=None), "data[0].paragraphs", "expected a list, got null"),
        (lambda d: d["data"][0]["paragraphs"][1].pop("qas"), "data[0].paragraphs[1].qas", "missing field"),
        (
            lambda d: d["data"][0]["paragraphs"][1]["qas"][0].pop("id"),
            "data[0].paragraphs[1].qas[0].id",
            "missing field",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(question=""),
            "data[0].paragraphs[1].qas[0].question",
            "empty question",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(answers=[]),
            "data[0].paragraphs[1].qas[0].answers",
            "empty list",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(answers=["a lot"]),
            "data[0].paragraphs[1].qas[0].answers[0]",
            "expected an object, got a string",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][1]["qas"][0]["answers"][0].update(text=5),
            "data[0].paragraphs[1].qas[0].answers[0].text",
            "expected a string, got an integer",
        ),
    ],
)
def test_squad_bad_field_is_named(tmp_path: Path, change, field: str | None, problem: str) -> None:
    path = write_json(tmp_path / "squad.json", squad_with(change))
    where = str(path) if field is None else f"{path}, field '{field}'"
    assert user_error(path).startswith(f"{where}: {problem}")


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"answers": ["a"]}, "[1].question", "missing field"),
        ({"question": "Q?"}, "[1].answers", "missing field"),
        ({"question": "Q?", "answers": [["a"]]}, "[1].answers", "expected a list of strings"),
        ({"question": "Q?", "answers": ["a"], "positive_ctxs": {}}, "[1].positive_ctxs", "expected a list"),
        (
            {"question": "Q?", "answers": ["a"], "positive_ctxs": [{"text": "t"}]},
            "[1].positive_ctxs[0].passage_id",
            "missing field",
        ),
        (
            {"question": "Q?", "answers": ["a"], "positive_ctxs": [{"id": 1.5}]},
            "[1].positive_ctxs[0].id",
            "expected a string or integer id, got a number",
        ),
    ],
)
def test_dpr_bad_field_is_named(tmp_path: Path, record: dict, field: str, problem: str) -> None:
    path = write_json(tmp_path / "dpr.json", [DPR_DOC[0], record])
    assert user_error(path).startswith(f"{path}, field '{field}': {problem}")
