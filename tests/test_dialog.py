"""Tests for jointrag.data.dialog (DSTC9/10, DSTC11, MTRAG-UN, OR-QuAC, DoQA loaders; dialog split) and the dialog
metrics of jointrag.metrics (BLEU, ROUGE-L, knowledge selection), the latter against hand computation.

The real-data tests read `../shared/data` (see its README for the counts) and are skipped without it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from jointrag import metrics
from jointrag.data.dialog import (
    FORMATS,
    dialog_id,
    history_query,
    load_dialog,
    load_doqa,
    load_dstc9,
    load_dstc11,
    load_mtrag,
    load_orquac,
    render_history,
    split_by_dialog,
)
from jointrag.errors import UserError
from jointrag.types import Example

FIXTURES = Path(__file__).parent / "fixtures" / "dialog"
ORQUAC = FIXTURES / "orquac_dev.txt"
DOQA = FIXTURES / "doqa-cooking-dev-v2.1.json"
DSTC9 = FIXTURES / "dstc9" / "val"  # DSTC9/10 track 2 layout: val/logs.json, val/labels.json, knowledge.json one up
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DSTC11 = SHARED / "dstc11-track5-val"
MTRAG = SHARED / "mtrag-un" / "reference.jsonl.gz"
real_data = pytest.mark.skipif(not DSTC11.is_dir() or not MTRAG.is_file(), reason=f"no shared data at {SHARED}")


# --- DSTC11 track 5 (real validation set) -----------------------------------------------------------


@pytest.fixture(scope="module")
def dstc11():
    return load_dstc11(DSTC11)


@real_data
def test_dstc11_counts_match_the_readme(dstc11):
    examples, passages = dstc11
    assert len(examples) == 2129  # knowledge-seeking instances
    kinds = Counter(p.id.split("/")[2] for p in passages)
    assert kinds == {"review": 8013, "faq": 2869}  # review sentences and FAQ pairs
    assert len({p.id.rsplit("/", 1)[0] for p in passages if "/review/" in p.id}) == 1430  # reviews
    entities = {tuple(p.id.split("/")[:2]) for p in passages}
    assert len(entities) == 143
    assert Counter(domain for domain, _ in entities) == {"hotel": 33, "restaurant": 110}
    assert len({p.id for p in passages}) == len(passages)
    gold = Counter(g.split("/")[2] for e in examples for g in e.gold_ids)
    assert gold == {"review": 8188, "faq": 481}
    ids = {p.id for p in passages}
    assert all(e.gold_ids and set(e.gold_ids) <= ids for e in examples)

    everything, _ = load_dstc11(DSTC11, knowledge_seeking_only=False)
    assert len(everything) == 4173
    others = [e for e in everything if not e.answers]
    assert len(others) == 4173 - 2129 and all(not e.gold_ids for e in others)


@real_data
def test_dstc11_example_fields(dstc11):
    examples, passages = dstc11
    by_id = {p.id: p for p in passages}
    faq = by_id["hotel/0/faq/0"]
    assert faq.title == "A AND B GUEST HOUSE"
    assert faq.text == "Are children welcomed at this location? Yes, you can stay with children at A and B Guest House."
    assert by_id["hotel/0/review/0/0"].text == "I was really happy with my recent stay at A and B Guest House."

    example = next(e for e in examples if e.id.endswith("#1"))  # instance 1 of the logs (instance 0 is not a target)
    assert example.history[0] == ("user", "Can you help me find guesthouses in the west of town?")
    assert example.history[-1] == ("user", "Are their bathrooms adequately sanitized?")
    assert example.gold_ids == ("hotel/20/review/9/4", "hotel/20/review/6/4", "hotel/20/review/4/2")
    assert example.answers[0].startswith("Yes, most of the guests at Hobsons House")
    assert example.question == " ".join(text for _, text in example.history[-3:])
    assert all(e.history[-1][0] == "user" for e in examples)
    assert {speaker for e in examples for speaker, _ in e.history} == {"user", "agent"}


@real_data
def test_dstc11_split_keeps_instances_of_one_dialog_together(dstc11):
    examples, _ = dstc11
    train, test = split_by_dialog(examples, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(examples)
    assert not {dialog_id(e) for e in train} & {dialog_id(e) for e in test}
    first_turns = lambda side: {e.history[0][1].lower() for e in side}  # noqa: E731
    assert not first_turns(train) & first_turns(test)


# --- MTRAG-UN (real reference tasks) ----------------------------------------------------------------


@real_data
def test_mtrag_counts_match_the_readme():
    examples, passages = load_mtrag(MTRAG)
    assert len(examples) == 507
    assert len(passages) == 1152 == len({p.id for p in passages})
    assert sum(1 for e in examples if not e.gold_ids) == 130
    assert max(len(e.gold_ids) for e in examples) == 38
    assert {len(e.history) for e in examples} <= set(range(1, 22)) and max(len(e.history) for e in examples) == 21
    assert all(e.history[-1][0] == "user" and len(e.answers) == 1 for e in examples)
    ids = {p.id for p in passages}
    assert all(set(e.gold_ids) <= ids for e in examples)

    tasks = {"govt": 157, "clapnq": 142, "ibmcloud": 131, "fiqa": 77}
    documents = {"govt": 435, "clapnq": 312, "ibmcloud": 248, "fiqa": 157}  # no document is in two collections
    for collection in tasks:
        subset, corpus = load_mtrag(MTRAG, collection=collection)
        assert (len(subset), len(corpus)) == (tasks[collection], documents[collection])
    assert sum(documents.values()) == 1152


@real_data
def test_mtrag_example_fields():
    examples, passages = load_mtrag(MTRAG)
    rows = [json.loads(line) for line in gzip.open(MTRAG, "rt", encoding="utf-8")]
    for row, example in zip(rows, examples):
        assert example.id == row["task_id"].replace("<::>", "#")
        assert dialog_id(example) == row["conversation_id"]
        assert example.answers == (row["targets"][0]["text"],)
        assert example.gold_ids == tuple(c["document_id"] for c in row["contexts"])
        assert example.history == tuple((t["speaker"], t["text"]) for t in row["input"])
    titled = {c["document_id"]: c["title"] for row in rows for c in row["contexts"] if "title" in c}
    assert all(p.title == titled.get(p.id, "") for p in passages)


@real_data
def test_real_formats_are_detected():
    assert len(load_dialog(DSTC11)[0]) == 2129
    assert len(load_dialog(DSTC11 / "val_logs.json.gz")[0]) == 2129
    assert len(load_dialog(MTRAG)[0]) == 507


# --- OR-QuAC and DoQA (fixtures in the published formats) -------------------------------------------


def _hash_id(prefix: str, text: str) -> str:
    return f"{prefix}/{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def test_orquac_fixture():
    examples, passages = load_orquac(ORQUAC)
    rows = [json.loads(line) for line in ORQUAC.read_text().splitlines()]
    assert len(examples) == 6
    assert len(passages) == 5 == len({e for row in rows for e in row["evidences"]})
    assert all(p.id == _hash_id("orquac", p.text) and p.title == "" for p in passages)

    third = examples[2]
    assert third.id == "C_1a2b3c4d5e6f47a8b9c0d1e2f3a4b5c6_1_q#2"
    assert third.history == (
        ("user", "What was Marie Curie known for?"),
        ("agent", "pioneering research on radioactivity"),
        ("user", "Did she win any awards?"),
        ("agent", "She was the first woman to win a Nobel Prize."),
        ("user", "What did she get the second one for?"),
    )
    assert third.question == (
        "Did she win any awards? She was the first woman to win a Nobel Prize. What did she get the second one for?"
    )
    assert third.answers == ("for the discovery of the elements polonium and radium",)
    assert third.gold_ids == (_hash_id("orquac", rows[2]["evidences"][1]),)
    assert len(examples[1].gold_ids) == 2  # two evidences labelled 1
    assert examples[4].answers == ("CANNOTANSWER",) and examples[4].gold_ids == ()
    assert examples[0].history == (("user", "What was Marie Curie known for?"),)
    assert {dialog_id(e) for e in examples} == {
        "C_1a2b3c4d5e6f47a8b9c0d1e2f3a4b5c6_1_q",
        "C_9f8e7d6c5b4a43a2b1c0f9e8d7c6b5a4_0_q",
    }


def test_doqa_fixture():
    examples, passages = load_doqa(DOQA)
    assert len(examples) == 5 and len(passages) == 2
    cake = passages[0]
    assert cake.title == "How do I stop my cake from getting tough?"
    assert cake.text.endswith("keeps the crumb soft.") and "CANNOTANSWER" not in cake.text
    assert cake.id == _hash_id("doqa", cake.text)

    first, second, third = examples[:3]
    assert first.answers == ("over-mixing develops gluten and makes the cake tough", "over-mixing develops gluten")
    assert first.history == (("user", "Why is my cake hard?"),)
    assert second.history[1] == ("agent", "over-mixing develops gluten and makes the cake tough")
    assert third.answers == ("CANNOTANSWER",)
    assert third.id == "C_0b1c2d3e4f5a46b7c8d9e0f1a2b3c4d5_q#2"
    assert all(e.gold_ids == (cake.id,) for e in examples[:3])
    assert all(e.gold_ids == (passages[1].id,) for e in examples[3:])
    assert len({dialog_id(e) for e in examples}) == 2


def test_load_dialog_detects_the_fixture_formats_and_accepts_explicit_ones():
    assert load_dialog(ORQUAC) == load_orquac(ORQUAC)
    assert load_dialog(DOQA) == load_doqa(DOQA)
    assert load_dialog(ORQUAC, "orquac", last_turns=1) == load_orquac(ORQUAC, last_turns=1)
    assert load_dialog(DSTC9) == load_dstc9(DSTC9)  # a folder whose knowledge has "docs"
    assert load_dialog(DSTC9 / "logs.json") == load_dialog(DSTC9, "dstc9")
    assert set(FORMATS) == {"dstc9", "dstc11", "mtrag", "orquac", "doqa"}


def test_load_dialog_refuses_unknown_or_undetectable_formats(tmp_path):
    with pytest.raises(UserError, match="unknown dialog format 'coqa'"):
        load_dialog(ORQUAC, "coqa")
    plain = tmp_path / "dialogs.jsonl"
    plain.write_text('{"question": "hi", "answers": ["hello"]}\n')
    with pytest.raises(UserError, match="cannot tell the dialog format.*dstc9, dstc11, mtrag, orquac, doqa"):
        load_dialog(plain)


def test_last_turns_sets_the_query():
    examples, _ = load_orquac(ORQUAC, last_turns=None)
    assert examples[2].question == " ".join(text for _, text in examples[2].history)
    examples, _ = load_orquac(ORQUAC, last_turns=1)
    assert examples[2].question == "What did she get the second one for?"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="last_turns must be a positive integer or None"):
            load_dialog(ORQUAC, last_turns=bad)


def test_history_query_and_render_history():
    history = (
        ("user", "Hi, a hotel? "),
        ("agent", "Which area?"),
        ("user", "North."),
        ("agent", "Ok."),
        ("user", "Pets?"),
    )
    assert history_query(history, 3) == "North. Ok. Pets?"
    assert history_query(history, None) == "Hi, a hotel? Which area? North. Ok. Pets?"
    assert history_query(history, 10) == history_query(history, None)
    assert render_history(history[:2]) == "User: Hi, a hotel?\nAgent: Which area?"
    assert render_history(history[:2], user="Guest", agent="Bot") == "Guest: Hi, a hotel?\nBot: Which area?"


# --- dialog split -----------------------------------------------------------------------------------


def _dialogs(n_dialogs: int, turns: int) -> list[Example]:
    return [Example(f"d{d}#{t}", "q", ("a",)) for d in range(n_dialogs) for t in range(turns)]


def test_split_by_dialog_keeps_dialogs_whole_and_is_seeded():
    examples = _dialogs(10, 3)
    train, test = split_by_dialog(examples, test_fraction=0.3, seed=1)
    assert len({dialog_id(e) for e in test}) == 3 and len(test) == 9 and len(train) == 21
    assert not {dialog_id(e) for e in train} & {dialog_id(e) for e in test}
    assert [e for e in examples if e in test] == test  # input order kept
    assert split_by_dialog(examples, 0.3, seed=1) == (train, test)
    assert split_by_dialog(list(reversed(examples)), 0.3, seed=1)[1] == list(reversed(test))
    assert any(split_by_dialog(examples, 0.3, seed=s)[1] != test for s in range(2, 6))


def test_split_by_dialog_bounds():
    assert len(split_by_dialog(_dialogs(3, 2), test_fraction=0.01)[1]) == 2  # at least one dialog
    assert len(split_by_dialog(_dialogs(3, 2), test_fraction=0.99)[0]) == 2  # at least one left to train
    with pytest.raises(UserError, match="test_fraction must be between 0 and 1"):
        split_by_dialog(_dialogs(3, 2), test_fraction=1.0)
    with pytest.raises(UserError, match="cannot split 1 dialog"):
        split_by_dialog(_dialogs(1, 4))
    assert dialog_id(Example("no-turn-marker", "q", ())) == "no-turn-marker"


# --- input errors name the file, the line or record, and the field ----------------------------------


def _write_dstc11(folder: Path, knowledge=None, logs=None, labels=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    knowledge = knowledge or {
        "hotel": {
            "7": {
                "name": "Blue Inn",
                "reviews": {"0": {"traveler_type": "Couples", "sentences": {"0": "Quiet rooms.", "1": "Great view."}}},
                "faqs": {"0": {"question": "Is there parking?", "answer": "Yes, free parking."}},
            }
        }
    }
    logs = logs or [
        [
            {"speaker": "U", "text": "A hotel in the north?"},
            {"speaker": "S", "text": "Blue Inn."},
            {"speaker": "U", "text": "Parking?"},
        ],
        [{"speaker": "U", "text": "Any hotel?"}],
    ]
    labels = labels or [
        {
            "target": True,
            "knowledge": [{"domain": "hotel", "entity_id": 7, "doc_type": "faq", "doc_id": 0}],
            "response": "Yes.",
        },
        {"target": False},
    ]
    (folder / "knowledge.json").write_text(json.dumps(knowledge))
    (folder / "logs.json").write_text(json.dumps(logs))
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def test_dstc11_official_layout_with_knowledge_one_folder_up(tmp_path):
    data = tmp_path / "data"
    _write_dstc11(data / "val")
    (data / "val" / "knowledge.json").rename(data / "knowledge.json")
    examples, passages = load_dialog(data / "val")
    assert [p.id for p in passages] == ["hotel/7/review/0/0", "hotel/7/review/0/1", "hotel/7/faq/0"]
    assert passages[2].text == "Is there parking? Yes, free parking." and passages[2].title == "Blue Inn"
    assert len(examples) == 1 and examples[0].gold_ids == ("hotel/7/faq/0",)
    assert examples[0].question == "A hotel in the north? Blue Inn. Parking?"
    assert examples[0].id.endswith("#0") and examples[0].id.startswith("dstc11/")


@pytest.mark.parametrize(
    "labels, message",
    [
        (
            [{"target": "yes"}, {"target": False}],
            r"labels.json, field '\[0\].target': expected a boolean, got a string",
        ),
        ([{"target": True, "knowledge": [], "response": "x"}], r"1 labels for the 2 instances"),
        (
            [{"target": True, "knowledge": [{"domain": "hotel", "entity_id": 7, "doc_type": "menu", "doc_id": 0}],
              "response": "x"}, {"target": False}],
            r"field '\[0\].knowledge\[0\].doc_type': expected 'review' or 'faq', got 'menu'",
        ),
        (
            [{"target": True, "knowledge": [{"domain": "hotel", "entity_id": 7, "doc_type": "review", "doc_id": 0}],
              "response": "x"}, {"target": False}],
            r"field '\[0\].knowledge\[0\].sent_id': missing field",
        ),
        (
            [{"target": True, "knowledge": [{"domain": "hotel", "entity_id": 8, "doc_type": "faq", "doc_id": 0}],
              "response": "x"}, {"target": False}],
            r"field '\[0\].knowledge\[0\]': hotel/8/faq/0 is not in the knowledge file",
        ),
        ([{"target": True, "knowledge": []}, {"target": False}], r"field '\[0\].response': missing field"),
    ],
)
def test_dstc11_label_errors(tmp_path, labels, message):
    folder = _write_dstc11(tmp_path / "val", labels=labels)
    with pytest.raises(UserError, match=message):
        load_dstc11(folder)


def test_dstc11_log_knowledge_and_file_errors(tmp_path):
    folder = _write_dstc11(tmp_path / "a", logs=[[{"speaker": "U", "text": "hi"}], [{"speaker": "X", "text": "hi"}]])
    message = r"logs.json, field '\[1\]\[0\].speaker': expected one of 'U', 'S', 'user', 'agent', got 'X'"
    with pytest.raises(UserError, match=message):
        load_dstc11(folder)
    folder = _write_dstc11(tmp_path / "b", logs=[[{"speaker": "U", "text": "hi"}], []])
    with pytest.raises(UserError, match=r"field '\[1\]': empty dialog"):
        load_dstc11(folder)
    knowledge = {"hotel": {"7": {"name": "Blue Inn", "reviews": {}, "faqs": {"0": {"question": "Parking?"}}}}}
    folder = _write_dstc11(tmp_path / "c", knowledge=knowledge)
    with pytest.raises(UserError, match=r"knowledge.json, field 'hotel.7.faqs.0.answer': missing field"):
        load_dstc11(folder)
    folder = _write_dstc11(tmp_path / "d")
    (folder / "labels.json").unlink()
    with pytest.raises(UserError, match="its labels file labels.json is not next to it"):
        load_dstc11(folder)
    with pytest.raises(UserError, match="expected one DSTC logs file"):
        load_dstc11(tmp_path)
    with pytest.raises(UserError, match="a DSTC logs file is named logs.json or \\*_logs.json"):
        load_dstc11(folder / "knowledge.json")


# --- DSTC9/10 track 2 (fixture in the published layout) --------------------------------------------


def test_dstc9_fixture():
    examples, passages = load_dstc9(DSTC9)
    knowledge = json.loads((DSTC9.parent / "knowledge.json").read_text())
    labels = json.loads((DSTC9 / "labels.json").read_text())
    assert [p.id for p in passages] == [f"{domain}/{entity}/faq/{doc}" for domain, entities in knowledge.items()
                                        for entity, record in entities.items() for doc in record["docs"]]
    by_id = {p.id: p for p in passages}
    assert by_id["hotel/11/faq/1"].title == "Acorn Guest House"
    assert by_id["hotel/11/faq/1"].text == "Are pets allowed? No, pets are not allowed at Acorn Guest House."
    assert by_id["taxi/*/faq/1"].title == "taxi"  # a domain-wide document (entity "*", name null)

    assert len(examples) == 7 == sum(label["target"] for label in labels)  # knowledge-seeking instances only
    assert [e.id.rpartition("#")[2] for e in examples] == ["1", "2", "3", "5", "6", "7", "8"]
    assert all(e.id.startswith("dstc9/") for e in examples)
    assert [e.gold_ids for e in examples][-2:] == [("restaurant/5/faq/1",), ("taxi/*/faq/1",)]
    pets = examples[1]
    assert pets.answers == ("I'm sorry, Acorn Guest House does not allow pets.",)
    assert pets.history == (
        ("user", "I need a guesthouse in the north with free parking."),
        ("agent", "Acorn Guest House is in the north. Shall I book it?"),
        ("user", "Does it allow pets?"),
    )
    assert pets.question == " ".join(text for _, text in pets.history)
    assert len({dialog_id(e) for e in examples}) == 4  # instances cut from one dialog share its id
    assert dialog_id(examples[1]) == dialog_id(examples[4])

    everything, _ = load_dstc9(DSTC9, knowledge_seeking_only=False)
    assert len(everything) == 10 and sum(1 for e in everything if not e.answers and not e.gold_ids) == 3


def test_dstc_formats_refuse_each_others_knowledge(tmp_path):
    with pytest.raises(UserError, match=r"knowledge.json, field 'hotel.11': has 'docs', the DSTC9 knowledge layout; "
                                        r"use format 'dstc9'"):
        load_dstc11(DSTC9)
    folder = _write_dstc11(tmp_path / "dstc11")
    with pytest.raises(UserError, match=r"field 'hotel.7': has 'reviews' and 'faqs', the DSTC11 knowledge layout; "
                                        r"use format 'dstc11'"):
        load_dstc9(folder)
    assert load_dialog(folder) == load_dstc11(folder)  # detected from the knowledge's shape
    (folder / "knowledge.json").write_text(json.dumps({"hotel": {"7": {"name": "Blue Inn"}}}))
    with pytest.raises(UserError, match="cannot tell DSTC9/10 knowledge .* pass the format, 'dstc9' or 'dstc11'"):
        load_dialog(folder)


def _write_dstc9(folder: Path, knowledge: dict | None = None, labels: list | None = None) -> Path:
    """The fixture's logs, with its labels and knowledge or the given ones, all in `folder`."""
    folder.mkdir(parents=True)
    shutil.copy(DSTC9 / "logs.json", folder / "logs.json")
    shutil.copy(DSTC9 / "labels.json", folder / "labels.json")
    shutil.copy(DSTC9.parent / "knowledge.json", folder / "knowledge.json")
    for name, value in (("labels.json", labels), ("knowledge.json", knowledge)):
        if value is not None:
            (folder / name).write_text(json.dumps(value))
    return folder


def _dstc9_labels(snippet: dict | None = None, **changes) -> list:
    """The fixture's labels with instance 1's first knowledge snippet replaced by `snippet` and its
    other fields updated by `changes`."""
    labels = json.loads((DSTC9 / "labels.json").read_text())
    if snippet is not None:
        labels[1]["knowledge"][0] = snippet
    labels[1].update(changes)
    return labels


@pytest.mark.parametrize(
    "labels, message",
    [
        (_dstc9_labels({"domain": "hotel", "entity_id": 23, "doc_id": 7}),
         r"labels.json, field '\[1\].knowledge\[0\]': hotel/23/faq/7 is not in the knowledge file"),
        (_dstc9_labels({"domain": "taxi", "entity_id": 3, "doc_id": 0}), r"taxi/3/faq/0 is not in the knowledge file"),
        (_dstc9_labels({"domain": "hotel", "entity_id": 23}), r"field '\[1\].knowledge\[0\].doc_id': missing field"),
        (_dstc9_labels({"domain": "hotel", "entity_id": 23, "doc_id": 0, "doc_type": "review", "sent_id": 0}),
         r"field '\[1\].knowledge\[0\].doc_type': expected 'faq' \(DSTC9/10 knowledge holds FAQ documents only"),
        (_dstc9_labels({"domain": "hotel", "entity_id": None, "doc_id": 0}),
         r"field '\[1\].knowledge\[0\].entity_id': expected a string or integer id, got null"),
        (_dstc9_labels(knowledge="hotel/23/faq/0"), r"field '\[1\].knowledge': expected a list, got a string"),
        (_dstc9_labels(target=1), r"field '\[1\].target': expected a boolean, got an integer"),
    ],
)
def test_dstc9_label_errors(tmp_path, labels, message):
    with pytest.raises(UserError, match=message):
        load_dstc9(_write_dstc9(tmp_path / "val", labels=labels))


def test_dstc9_knowledge_errors(tmp_path):
    knowledge = json.loads((DSTC9.parent / "knowledge.json").read_text())
    knowledge["taxi"]["*"]["name"] = 3
    with pytest.raises(UserError, match=r"knowledge.json, field 'taxi.\*.name': expected a string or null, got an integer"):
        load_dstc9(_write_dstc9(tmp_path / "a", knowledge=knowledge))
    knowledge = json.loads((DSTC9.parent / "knowledge.json").read_text())
    del knowledge["hotel"]["23"]["docs"]["1"]["body"]
    with pytest.raises(UserError, match=r"knowledge.json, field 'hotel.23.docs.1.body': missing field"):
        load_dstc9(_write_dstc9(tmp_path / "b", knowledge=knowledge))
    knowledge = json.loads((DSTC9.parent / "knowledge.json").read_text())
    knowledge["train"]["*"]["docs"] = ["Is there WiFi?"]
    with pytest.raises(UserError, match=r"field 'train.\*.docs': expected an object, got a list"):
        load_dstc9(_write_dstc9(tmp_path / "c", knowledge=knowledge))


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _mtrag_record(**changes) -> dict:
    record = {
        "conversation_id": "c1",
        "turn": "1",
        "Collection": "govt",
        "contexts": [{"document_id": "d1", "text": "Passports take six weeks.", "title": "Passports"}],
        "input": [{"speaker": "user", "text": "How long for a passport?"}],
        "targets": [{"speaker": "agent", "text": "About six weeks."}],
    }
    record.update(changes)
    return record


def test_mtrag_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "reference.jsonl"
    bad_speaker = [{"speaker": "user", "text": "a"}, {"speaker": "bot", "text": "b"}]
    _jsonl(path, [_mtrag_record(), _mtrag_record(input=bad_speaker)])
    with pytest.raises(UserError, match=r"reference.jsonl, line 2, field 'input\[1\].speaker': expected one of"):
        load_mtrag(path)
    _jsonl(path, [_mtrag_record(targets=[])])
    with pytest.raises(UserError, match=r"line 1, field 'targets': empty list"):
        load_mtrag(path)
    other_text = [{"document_id": "d1", "text": "Passports take two weeks."}]
    _jsonl(path, [_mtrag_record(), "", _mtrag_record(turn="2", contexts=other_text)])
    with pytest.raises(UserError, match=r"line 3, field 'contexts\[0\].text': document d1 has another text on line 1"):
        load_mtrag(path)
    _jsonl(path, [_mtrag_record(), "{not json"])
    with pytest.raises(UserError, match=r"reference.jsonl, line 2: invalid JSON: Expecting property name"):
        load_mtrag(path)
    _jsonl(path, [_mtrag_record(), [1, 2]])
    with pytest.raises(UserError, match=r"reference.jsonl, line 2: expected a JSON object, got a list$"):
        load_mtrag(path)
    _jsonl(path, [_mtrag_record()])
    with pytest.raises(UserError, match="no task in collection 'fiqa'; it has govt"):
        load_mtrag(path, collection="fiqa")
    examples, passages = load_dialog(path)
    assert examples[0].id == "c1#1" and passages[0].title == "Passports"


def test_orquac_errors_name_the_line_and_field(tmp_path):
    rows = [json.loads(line) for line in ORQUAC.read_text().splitlines()]
    path = tmp_path / "dev.txt"
    broken = dict(rows[1])
    del broken["evidences"]
    _jsonl(path, [rows[0], broken])
    with pytest.raises(UserError, match=r"dev.txt, line 2, field 'evidences': missing field"):
        load_orquac(path)
    _jsonl(path, [dict(rows[0], retrieval_labels=[1, 0])])
    with pytest.raises(UserError, match=r"line 1, field 'retrieval_labels': 2 labels for 3 evidences"):
        load_orquac(path)
    _jsonl(path, [dict(rows[0], retrieval_labels=[1, 0, 2])])
    with pytest.raises(UserError, match=r"line 1, field 'retrieval_labels\[2\]': expected 0 or 1, got 2"):
        load_orquac(path)
    _jsonl(path, [dict(rows[1], history=[{"question": "q", "answer": "a"}])])
    with pytest.raises(UserError, match=r"line 1, field 'history\[0\].answer': expected an object, got a string"):
        load_orquac(path)


def test_doqa_errors_name_the_record_and_field(tmp_path):
    doc = json.loads(DOQA.read_text())
    doc["data"][1]["paragraphs"][0]["qas"][1]["question"] = 3
    path = tmp_path / "doqa.json"
    path.write_text(json.dumps(doc))
    message = r"doqa.json, field 'data\[1\].paragraphs\[0\].qas\[1\].question': expected a string"
    with pytest.raises(UserError, match=message):
        load_doqa(path)
    doc = json.loads(DOQA.read_text())
    qa = doc["data"][0]["paragraphs"][0]["qas"][0]
    del qa["orig_answer"]
    qa["answers"] = []
    path.write_text(json.dumps(doc))
    message = r"field 'data\[0\].paragraphs\[0\].qas\[0\].answers': empty list and no 'orig_answer'"
    with pytest.raises(UserError, match=message):
        load_doqa(path)


# --- metrics: BLEU, ROUGE-L, knowledge selection -----------------------------------------------------


def test_bleu1_is_clipped_unigram_precision_times_brevity_penalty():
    # "the cat" vs 6 reference tokens: both unigrams match (p1 = 1); BP = exp(1 - 6/2) = e^-2.
    assert metrics.corpus_bleu(["the cat"], [["the cat sat on the mat"]], max_order=1) == pytest.approx(math.exp(-2))
    # "the the the" against "the cat": "the" is clipped to its one reference count, p1 = 1/3, BP = 1.
    assert metrics.corpus_bleu(["the the the"], [["the cat"]], max_order=1) == pytest.approx(1 / 3)


def test_bleu4_sums_ngram_counts_over_the_corpus():
    predictions = ["the cat sat on the mat", "a dog ran in the park"]
    references = [["the cat is on the mat"], ["a dog ran in the park"]]
    # Sentence 1 matches 5/6 unigrams, 3/5 bigrams, 1/4 trigrams, 0/3 4-grams; sentence 2 all of
    # 6, 5, 4, 3. Corpus precisions: 11/12, 8/10, 5/8, 3/6; equal lengths so BP = 1.
    expected = (11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** (1 / 4)
    assert metrics.corpus_bleu(predictions, references) == pytest.approx(expected)
    assert metrics.corpus_bleu(predictions, references, max_order=1) == pytest.approx(11 / 12)


def test_bleu4_exp_smoothing_of_an_order_without_matches():
    # 0/3 4-grams matched: "exp" smoothing counts it as 1 / (2 * 3).
    expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert metrics.corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(expected)


def test_bleu_with_several_references():
    # Counts clipped by the best reference ("the" from the second, "sat" from the first): p1 = 1; the
    # closest reference length is 3, so BP = 1. The second prediction has only one reference.
    score = metrics.corpus_bleu(["the cat sat", "a dog"], [["a cat sat", "the cat"], ["a dog"]], max_order=1)
    assert score == pytest.approx(1.0)
    assert metrics.corpus_bleu(["the cat sat"], [["a cat sat"]], max_order=1) == pytest.approx(2 / 3)
    assert metrics.corpus_bleu([], []) == 0.0
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        metrics.corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(TypeError, match="not a single string"):
        metrics.corpus_bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.corpus_bleu(["a"], [[]])


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat", 5 tokens: P = R = 5/6.
    assert metrics.rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # LCS = 6 of 7 predicted and 6 of 6 reference tokens: F = 2 * (6/7) * 1 / (6/7 + 1) = 12/13.
    assert metrics.rouge_l("the cat was found under the bed", ["the cat was under the bed"]) == pytest.approx(12 / 13)
    # A subsequence, not a substring: "w x y z" vs "w y x z" has LCS 3 ("w x z"): P = R = 3/4.
    assert metrics.rouge_l("w x y z", ["w y x z"]) == pytest.approx(3 / 4)
    # Case, punctuation and Porter stems ("killed" -> "kill") are ignored.
    assert metrics.rouge_l("Police KILLED the gunman.", ["police kill the gunman"]) == pytest.approx(1.0)
    assert metrics.rouge_l("w x y z", ["a b", "w y x z"]) == pytest.approx(3 / 4)  # best answer
    assert metrics.rouge_l("anything", []) == 0.0
    assert metrics.rouge_l("", ["a b"]) == 0.0


def test_knowledge_selection_micro_averages_like_dstc11():
    predicted = [["a", "b", "b"], ["c"], [], ["x"]]
    gold = [["a", "c"], ["c"], [], []]
    # tp = 1 + 1, fp = 1 (b) + 1 (x), fn = 1 (c in the first); the empty/empty instance is not scored.
    # P = 2/4, R = 2/3, F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7; exact match 1 of 3 scored.
    scores = metrics.knowledge_selection(predicted, gold)
    assert scores.precision == pytest.approx(1 / 2)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(4 / 7)
    assert scores.exact_match == pytest.approx(1 / 3)
    assert metrics.knowledge_selection([[]], [[]]) == (0.0, 0.0, 0.0, 0.0)
    assert metrics.knowledge_selection([["a"]], [["a"]]) == (1.0, 1.0, 1.0, 1.0)
    with pytest.raises(TypeError, match="not a single string"):
        metrics.knowledge_selection(["ab"], [["a"]])
