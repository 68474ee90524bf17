"""Tests for jointrag.metrics, with expected values computed by hand."""

from __future__ import annotations

import pytest

from jointrag.metrics import (
    ABSTENTIONS,
    abstains,
    abstention,
    answer_recall_at_k,
    exact_match,
    gold_recall_at_k,
    has_answer,
    is_gold,
    mean,
    normalize_answer,
    reciprocal_rank,
    rouge_l,
    token_f1,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The  Cat!", "cat"),
        ("an apple, a day", "apple day"),
        ("Theater at the Anthem", "theater at anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),  # punctuation is deleted, not replaced by a space
        ("well-known", "wellknown"),
        ("  tabs\tand\nnewlines  ", "tabs and newlines"),
        ("The", ""),
        ("x\u2014the\u2014y", "x\u2014 \u2014y"),  # an article is replaced by a space, not deleted
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match_is_max_over_answers() -> None:
    assert exact_match("the Denver Broncos.", ["Carolina Panthers", "Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Carolina Panthers", "Denver Broncos"]) == 0.0
    assert exact_match("", ["", "x"]) == 1.0
    assert exact_match("anything", []) == 0.0


def test_token_f1_by_hand() -> None:
    # "the cat sat on the mat" -> [cat, sat, on, mat]; "a cat on a mat" -> [cat, on, mat].
    # Shared tokens: cat, on, mat = 3. Precision 3/4, recall 3/3.
    # F1 = 2 * (3/4) * 1 / (3/4 + 1) = 1.5 / 1.75 = 6/7. "dog" shares nothing (0), so max is 6/7.
    assert token_f1("the cat sat on the mat", ["dog", "a cat on a mat"]) == pytest.approx(6 / 7)


def test_token_f1_takes_the_best_answer() -> None:
    # vs "broncos": 1 shared of 3 predicted -> P 1/3, R 1 -> F1 0.5.
    # vs "denver broncos": 2 shared -> P 2/3, R 1 -> F1 0.8.
    assert token_f1("Denver Broncos win", ["Broncos", "Denver Broncos"]) == pytest.approx(0.8)


def test_token_f1_counts_repeated_tokens_as_a_multiset() -> None:
    # [new, new, york] vs [new, york]: shared min-counts = 1 + 1 = 2; P 2/3, R 1 -> F1 0.8.
    assert token_f1("new new york", ["New York"]) == pytest.approx(0.8)
    # [new, new, york] vs [new, new, new]: shared min(2, 3) = 2; P 2/3, R 2/3 -> F1 2/3.
    assert token_f1("new new york", ["new new new"]) == pytest.approx(2 / 3)


def test_token_f1_empty_sides() -> None:
    assert token_f1("", [""]) == 1.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to nothing
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", ["the"]) == 0.0
    assert token_f1("cat", []) == 0.0


def test_answers_must_not_be_a_bare_string() -> None:
    with pytest.raises(TypeError):
        exact_match("c", "abc")
    with pytest.raises(TypeError):
        has_answer("a b c", "abc")


def test_has_answer_respects_token_boundaries() -> None:
    assert not has_answer("We went to the party.", ["art"])
    assert has_answer("Modern art, today.", ["art"])
    assert has_answer("He lives in New York City.", ["new york"])
    assert not has_answer("He lives in New Yorkshire.", ["new york"])
    assert has_answer("The U.S. Army", ["US"])  # both sides normalised the same way
    assert has_answer("art", ["ART"])  # the whole passage is one token


def test_has_answer_never_matches_an_empty_answer() -> None:
    assert not has_answer("the cat", ["the", ""])
    assert not has_answer("the cat", [])
    assert not has_answer("The", ["a"])  # an empty passage does not contain an empty answer


def test_answer_recall_at_k() -> None:
    passages = ["Dogs bark.", "Cats purr.", "Birds sing."]
    assert answer_recall_at_k(passages, ["purr"], 1) == 0.0
    assert answer_recall_at_k(passages, ["purr"], 2) == 1.0
    assert answer_recall_at_k(passages, ["purr"], 10) == 1.0
    assert answer_recall_at_k(passages, ["meow"], 3) == 0.0
    with pytest.raises(ValueError):
        answer_recall_at_k(passages, ["purr"], 0)


def test_is_gold_understands_chunks() -> None:
    gold = ["Cats#0"]
    assert is_gold("Cats#0", gold)
    assert is_gold("Cats#0@3", gold)
    assert not is_gold("Cats#1@0", gold)
    assert not is_gold("Cats#01", gold)  # not a chunk, just a longer id
    assert not is_gold("Cats#0@x", gold)  # the chunk index must be an integer
    assert not is_gold("Cats#0@", gold)
    assert is_gold("mail@example#2@0", ["mail@example#2"])  # only the last '@' splits
    assert not is_gold("Cats#0@3", [])


def test_gold_recall_at_k() -> None:
    retrieved = ["Dogs#0@0", "Cats#0@2", "Cats#1"]
    assert gold_recall_at_k(retrieved, ["Cats#0"], 1) == 0.0
    assert gold_recall_at_k(retrieved, ["Cats#0"], 2) == 1.0
    assert gold_recall_at_k(retrieved, ("Birds#0",), 3) == 0.0
    with pytest.raises(ValueError):
        gold_recall_at_k(retrieved, ["Cats#0"], 0)


def test_reciprocal_rank() -> None:
    retrieved = ["x", "y", "Cats#0@1", "Cats#0"]
    assert reciprocal_rank(retrieved, ["Cats#0"]) == pytest.approx(1 / 3)  # first gold at rank 3
    assert reciprocal_rank(retrieved, ["Cats#0"], k=3) == pytest.approx(1 / 3)
    assert reciprocal_rank(retrieved, ["Cats#0"], k=2) == 0.0
    assert reciprocal_rank(retrieved, ["x", "Cats#0"]) == 1.0
    assert reciprocal_rank(retrieved, ["z"]) == 0.0
    assert reciprocal_rank([], ["z"]) == 0.0


def test_mrr_is_the_mean_of_reciprocal_ranks() -> None:
    runs = [(["g"], ["g"]), (["x", "g"], ["g"]), (["x", "y"], ["g"])]
    assert mean(reciprocal_rank(r, g) for r, g in runs) == pytest.approx((1 + 0.5 + 0) / 3)


def test_mean() -> None:
    assert mean([1.0, 0.5, 0.0]) == 0.5
    assert mean([]) == 0.0


# --- unanswerable questions -------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["Unanswerable.", "unanswerable", "No answer", "I don't know!", "I do not know.",
                                        "", "  ", "cannot answer", "Not answerable", "The."])  # "The." says nothing
def test_abstains_on_the_fixed_phrases_after_normalisation(prediction: str) -> None:
    assert abstains(prediction)


@pytest.mark.parametrize("prediction", ["The passage does not say.", "no", "unknown", "Paris", "unanswerable question"])
def test_other_predictions_do_not_abstain(prediction: str) -> None:
    assert not abstains(prediction)


def test_an_unanswerable_question_scores_abstaining() -> None:
    assert "unanswerable" in ABSTENTIONS
    for metric in (exact_match, token_f1, rouge_l):
        assert metric("Unanswerable.", []) == 1.0, metric
        assert metric("Paris", []) == 0.0, metric
        assert metric("Unanswerable.", ["Paris"]) == 0.0, metric  # abstaining on an answerable question is wrong


def test_abstention_precision_recall_f1_by_hand() -> None:
    predictions = ["unanswerable", "Paris", "I don't know", "Rome", "no answer"]
    answers = [[], [], ["Paris"], ["Rome"], []]
    # Unanswerable: 0, 1, 4; abstained: 0, 2, 4. tp = 2 (0 and 4): P = 2/3, R = 2/3, F1 = 2/3.
    scores = abstention(predictions, answers)
    assert scores == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # Never abstaining: P and R are 0; always abstaining: R = 1, P = the unanswerable share (3/5), F1 = 3/4.
    assert abstention(["x", "b"], [[], ["b"]]) == (0.0, 0.0, 0.0)
    assert abstention([""] * 5, answers) == pytest.approx((3 / 5, 1.0, 0.75))
    assert abstention([], []) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        abstention(["a"], [[], []])
