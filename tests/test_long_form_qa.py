"""Long-form and unanswerable QA (ClapNQ-like data): ROUGE-L on every answered example, the note on
stderr when the references are longer than generation may run, abstention scoring of unanswerable
examples in `evaluate`, and training, which skips unanswerable examples (they have no target).
"""

from __future__ import annotations

import json

import pytest

from cli_helpers import run, write_jsonl
from jointrag import metrics
from jointrag.config import load_config
from jointrag.errors import UserError
from jointrag.evaluation.evaluate import Retrieved, aggregate, long_references, say_once, score_example
from jointrag.train.build import answerable, examples_from
from jointrag.types import Example, Passage

pytestmark = pytest.mark.usefixtures("isolated_home")

PARIS = Passage("p0", "Paris", "Paris is the capital and largest city of France.")
ROME = Passage("p2", "Rome", "Rome is the capital city of Italy, founded on seven hills.")
LONG = ("Paris is the capital and the largest city of France, on the river Seine, and about two million people live "
        "in the city itself.")  # 24 words
QA = [
    {"id": "u1", "question": "Who is the king of France?", "answers": [], "gold_ids": ["p0"]},
    {"id": "u2", "question": "Who founded Lisbon?", "answers": [""]},  # ClapNQ's unanswerable answer
    {"id": "l1", "question": "What is Paris?", "answers": [LONG, LONG + " It is old."], "gold_ids": ["p0"]},
    {"id": "l2", "question": "What is Rome?", "answers": ["Rome is the capital city of Italy, founded on seven hills "
                                                          "long ago, and it lies on the river Tiber near the sea."]},
]


# --- scoring ----------------------------------------------------------------------------------------


def test_unanswerable_examples_score_abstaining_and_skip_answer_and_gold_recall():
    rows = [
        score_example(Example("u1", "q", (), ("p0",)), Retrieved([PARIS], [1.0]), "Unanswerable.", 1),
        score_example(Example("u2", "q", ()), Retrieved([ROME], [1.0]), "Paris", 1),
        score_example(Example("a1", "q", ("Paris",), ("p0",)), Retrieved([PARIS], [1.0]), "I don't know", 1),
        score_example(Example("a2", "q", ("Rome",), ("p2",)), Retrieved([PARIS], [1.0]), "Rome", 1),
    ]
    assert [(r["em"], r["f1"], r["rouge_l"]) for r in rows] == [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]
    assert not {"answer_recall", "gold_recall", "mrr"} & (rows[0].keys() | rows[1].keys())  # no answer string to find
    result = aggregate(rows, 1)
    # em = f1 = rouge_l: (1 + 0 + 0 + 1) / 4. Abstained: u1, a1; unanswerable: u1, u2: tp 1, P = R = F1 = 1/2.
    assert (result["em"], result["f1"], result["rouge_l"]) == (50.0, 50.0, 50.0)
    assert result["unanswerable"] == 2
    assert (result["abstain_precision"], result["abstain_recall"], result["abstain_f1"]) == (50.0, 50.0, 50.0)
    assert result["answer_recall@1"] == 50.0  # a1 (Paris in its passage) and a2 (Rome not), not u1 and u2
    assert result["gold_recall@1"] == 50.0 and result["mrr@1"] == 50.0  # a1 and a2 only, though u1 has a gold id


def test_answerable_sets_report_rouge_l_and_no_abstention():
    rows = [score_example(Example("a", "q", ("the cat sat on the mat",)), Retrieved([PARIS], [1.0]), "the cat sat", 1)]
    result = aggregate(rows, 1)
    assert result["rouge_l"] == round(100 * metrics.rouge_l("the cat sat", ["the cat sat on the mat"]), 2)
    assert not {"unanswerable", "abstain_precision", "abstain_recall", "abstain_f1"} & result.keys()
    retrieval_only = aggregate([score_example(Example("u", "q", ()), Retrieved([PARIS], [1.0]), None, 1)], 1)
    assert retrieval_only["unanswerable"] == 1 and "em" not in retrieval_only and "abstain_f1" not in retrieval_only


def test_long_references_rule():
    def examples(*lengths: int) -> list[Example]:
        return [Example(str(i), "q", (" ".join(["w"] * n), " ".join(["w"] * (n + 5)))) for i, n in enumerate(lengths)]

    note = long_references(examples(10, 17, 30), 16)  # the median of the shortest references, 17, is over 16
    assert note is not None and "median reference answer has 17 words" in note and "16 new tokens" in note
    assert long_references(examples(10, 16, 30), 16) is None  # 16 words fit 16 tokens at best: no note
    assert long_references(examples(17, 17), 32) is None
    assert long_references([Example("u", "q", ())] * 3 + examples(40), 16) is not None  # unanswerable ones do not count
    assert long_references([Example("u", "q", ())], 16) is None


# --- through `jointrag eval` ------------------------------------------------------------------------


def test_eval_notes_long_references_and_scores_unanswerable_questions(capsys, tiny_dir, tmp_path):
    from conftest import PASSAGES

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES])
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    index = tmp_path / "index"
    code, _, err = run(capsys, "index", "--corpus", corpus, "--out", index, "--retriever", tiny_dir / "encoder", "--precision", "fp32")
    assert code == 0, err
    say_once.cache_clear()
    code, stdout, err = run(capsys, "eval", "--index", index, "--data", data, "-k", "2", "--generator", tiny_dir / "causal",
                            "--precision", "fp32", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    assert "jointrag: note: the median reference answer has 23.5 words but answers stop at 16 new tokens" in err
    result = json.loads(stdout)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert result["unanswerable"] == 2 and [row["answers"] == [] for row in rows] == [True, True, False, False]
    assert all(0 <= row["rouge_l"] <= 1 for row in rows)
    assert all(row["em"] == float(metrics.abstains(row["prediction"])) for row in rows[:2])
    scores = metrics.abstention([row["prediction"] for row in rows], [row["answers"] for row in rows])
    assert result["abstain_f1"] == round(100 * scores.f1, 2) and result["abstain_recall"] == round(100 * scores.recall, 2)
    assert result["rouge_l"] == round(100 * metrics.mean(row["rouge_l"] for row in rows), 2)
    assert result["gold_recall@1"] in (0.0, 100.0)  # l1 alone: u1's gold passage does not count


# --- training ---------------------------------------------------------------------------------------


def test_training_skips_unanswerable_examples_and_says_how_many(capsys, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    train, dev = examples_from(load_config(None, [f"data.train={data}", f"data.dev={data}"]))
    assert [e.id for e in train] == ["l1", "l2"] and len(dev) == 4  # evaluation keeps them: it scores abstaining
    assert f"jointrag: {data}: skipped 2 of 4 examples, which are unanswerable: training needs an answer" in capsys.readouterr().err
    assert answerable(train, "x") == train and capsys.readouterr().err == ""

    only = write_jsonl(tmp_path / "only.jsonl", QA[:2])
    with pytest.raises(UserError, match="only.jsonl: no training examples with an answer: every one is unanswerable"):
        examples_from(load_config(None, [f"data.train={only}", f"data.dev={data}"]))
