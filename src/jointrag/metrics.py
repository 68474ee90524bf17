"""QA, dialog and retrieval metrics: pure functions over strings and id lists.

Answer metrics follow the official SQuAD v1.1 evaluation script so that numbers are comparable with
published ones. Every function that takes `answers` scores against the best-matching reference
(max over answers), as SQuAD and NQ-open do. Response metrics for dialog (BLEU, ROUGE-L) and
knowledge selection follow the DSTC11 track 5 scorer. Every score is in [0, 1].

A question with no reference answers is unanswerable (SQuAD 2.0's `is_impossible`, ClapNQ's and
MTRAG's unanswerable questions). The right prediction is to abstain: `exact_match`, `token_f1` and
`rouge_l` score 1.0 when it `abstains` (says one of the fixed `ABSTENTIONS`) and 0.0 otherwise, and
`abstention` measures how well abstaining tracks unanswerability over a set. For an answerable
question an abstention is just a wrong answer. The retrieval metrics that look for an answer string
(`has_answer`, `answer_recall_at_k`) find none in any passage.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Normalise an answer exactly as the official SQuAD v1.1 evaluation script does.

    In this order: lower-case; delete every character in `string.punctuation`; replace the
    articles "a", "an", "the" (as whole words, regex `\\b(a|an|the)\\b`) with a space; collapse
    runs of whitespace to one space and strip both ends.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


ABSTENTIONS = ("", "unanswerable", "no answer", "not answerable", "cannot answer", "i don't know", "i do not know")
"""What a prediction that abstains says, compared after `normalize_answer`: "Unanswerable." and "I don't
know!" abstain, "The passage does not say." does not. A fixed list rather than a judge, so that the
scores are reproducible; prompt the generator to use one of these phrases. The empty string is one: a
prediction that normalises to nothing (no words, or only punctuation and articles) has said nothing."""
_ABSTAINING = frozenset(normalize_answer(phrase) for phrase in ABSTENTIONS)


def abstains(prediction: str) -> bool:
    """Whether the normalised prediction is one of the normalised `ABSTENTIONS`."""
    return normalize_answer(prediction) in _ABSTAINING


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised answer, else 0.0; with no answers (an
    unanswerable question) 1.0 if the prediction `abstains`, else 0.0."""
    if not _answer_list(answers):
        return float(abstains(prediction))
    prediction = normalize_answer(prediction)
    return max((float(prediction == normalize_answer(a)) for a in _answer_list(answers)), default=0.0)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 between the normalised prediction and the best answer.

    F1 is the harmonic mean of precision and recall over the multiset of shared tokens. When either
    side normalises to no tokens the score is 1.0 if both do and 0.0 otherwise (the SQuAD v2.0
    script's rule; v1.1 would give 0.0 even for two empty strings). With no answers (an unanswerable
    question) 1.0 if the prediction `abstains`, else 0.0, as `exact_match`.
    """
    if not _answer_list(answers):
        return float(abstains(prediction))
    pred_tokens = normalize_answer(prediction).split()
    return max((_f1(pred_tokens, normalize_answer(a).split()) for a in _answer_list(answers)), default=0.0)


def has_answer(passage_text: str, answers: Sequence[str]) -> bool:
    """Whether some normalised answer occurs in the normalised passage on token boundaries.

    Both sides are padded with spaces, so "art" does not match inside "party". An answer that
    normalises to nothing (e.g. "the") never matches, since it would match every passage.
    """
    passage = f" {normalize_answer(passage_text)} "
    normalised = (normalize_answer(a) for a in _answer_list(answers))
    return any(a and f" {a} " in passage for a in normalised)


def answer_recall_at_k(passage_texts: list[str], answers: Sequence[str], k: int) -> float:
    """1.0 if any of the first `k` passages `has_answer`, else 0.0 (the weak, DPR-style recall)."""
    _check_k(k)
    return float(any(has_answer(text, answers) for text in passage_texts[:k]))


def is_gold(passage_id: str, gold_ids: Iterable[str]) -> bool:
    """Whether `passage_id` is a gold passage or a chunk of one.

    Chunk ids are `f"{parent_id}@{j}"` with an integer `j`; a chunk of a gold passage counts as gold
    because retrieval over chunks should be scored against the same paragraph-level gold labels.
    """
    gold = set(gold_ids)
    if passage_id in gold:
        return True
    parent, sep, j = passage_id.rpartition("@")
    return bool(sep) and j.isdigit() and parent in gold


def gold_recall_at_k(retrieved_ids: list[str], gold_ids: Iterable[str], k: int) -> float:
    """1.0 if any of the first `k` retrieved ids `is_gold`, else 0.0."""
    _check_k(k)
    gold = set(gold_ids)
    return float(any(is_gold(pid, gold) for pid in retrieved_ids[:k]))


def reciprocal_rank(retrieved_ids: list[str], gold_ids: Iterable[str], k: int | None = None) -> float:
    """1 / (1-based rank of the first gold id among the first `k`, or all when None); 0.0 if none.

    Averaged over queries with `mean` this is MRR (MRR@k when `k` is given).
    """
    if k is not None:
        _check_k(k)
    gold = set(gold_ids)
    ranked = retrieved_ids if k is None else retrieved_ids[:k]
    return next((1.0 / rank for rank, pid in enumerate(ranked, start=1) if is_gold(pid, gold)), 0.0)


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean, 0.0 for no values (so an empty evaluation reports 0, not an error)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _answer_list(answers: Sequence[str]) -> Sequence[str]:
    """Refuse a bare string, which would otherwise be scored character by character."""
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    return answers


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


# --- dialog responses and knowledge selection ----------------------------------------------------


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
    """Corpus-level BLEU with n-grams up to `max_order` (4 for BLEU-4, 1 for BLEU-1), by sacrebleu.

    `references[i]` holds the reference texts of `predictions[i]`, one or more: n-gram matches are
    clipped by the largest count in any of them, and the brevity penalty uses the reference length
    closest to each prediction's. Matches and lengths are summed over the corpus before the
    geometric mean (Papineni et al. 2002), so this is not a mean of sentence scores. sacrebleu's
    defaults apply, as in the DSTC11 scorer: the "13a" tokeniser (mteval-v13a: punctuation split off,
    case kept) and "exp" smoothing (the k-th n-gram order with no match at all counts as precision
    1 / (2^k * number of n-grams of that order)). 0.0 for no predictions.
    """
    _check_aligned(predictions, references)
    _check_sequences(references)
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference text")
    if not predictions:
        return 0.0
    from sacrebleu.metrics import BLEU

    width = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return BLEU(max_ngram_order=max_order).corpus_score(list(predictions), streams).score / 100


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F-measure (Lin 2004) against the best answer, by rouge-score, as the DSTC11 scorer.

    Both sides are lower-cased, every run of characters other than a-z and 0-9 becomes a token break,
    and tokens longer than 3 characters are Porter-stemmed. With L the length of the longest common
    subsequence of the token lists, P = L / len(prediction), R = L / len(answer), F = 2PR / (P + R);
    0.0 when either side has no tokens. Average over examples with `mean`. With no answers (an
    unanswerable question) 1.0 if the prediction `abstains`, else 0.0, as `exact_match`.
    """
    if not _answer_list(answers):
        return float(abstains(prediction))
    scorer = _rouge_l_scorer()
    return max((scorer.score(a, prediction)["rougeL"].fmeasure for a in _answer_list(answers)), default=0.0)


class SelectionScores(NamedTuple):
    """Knowledge-selection scores over a set of instances (see `knowledge_selection`)."""

    precision: float
    recall: float
    f1: float
    exact_match: float


def knowledge_selection(predicted: Sequence[Iterable[str]], gold: Sequence[Iterable[str]]) -> SelectionScores:
    """Precision, recall and F1 of predicted knowledge-snippet ids, micro-averaged like DSTC11 track 5.

    Per instance, duplicates are dropped and tp = |predicted & gold|, fp = |predicted| - tp,
    fn = |gold| - tp; these are summed over instances, then P = tp / (tp + fp), R = tp / (tp + fn) and
    F1 = 2PR / (P + R), each 0.0 when undefined. `exact_match` is the fraction of instances whose
    predicted set equals the gold set, among those where either set is non-empty (DSTC11's em_acc).
    Ids are compared exactly: a snippet is atomic, unlike the chunked passages of `is_gold`.
    """
    _check_aligned(predicted, gold)
    _check_sequences(predicted)
    _check_sequences(gold)
    tp = fp = fn = matched = scored = 0
    for predicted_ids, gold_ids in zip(predicted, gold):
        pred_set, gold_set = set(predicted_ids), set(gold_ids)
        hits = len(pred_set & gold_set)
        tp, fp, fn = tp + hits, fp + len(pred_set) - hits, fn + len(gold_set) - hits
        if pred_set or gold_set:
            scored += 1
            matched += pred_set == gold_set
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SelectionScores(precision, recall, f1, matched / scored if scored else 0.0)


class AbstentionScores(NamedTuple):
    """How well abstaining tracks unanswerability over a set (see `abstention`)."""

    precision: float
    recall: float
    f1: float


def abstention(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> AbstentionScores:
    """Precision, recall and F1 of abstaining as a detector of unanswerable questions.

    An example is unanswerable when `answers[i]` is empty and abstained when `predictions[i]` `abstains`;
    tp = unanswerable and abstained, P = tp / abstained, R = tp / unanswerable, F1 = 2PR / (P + R),
    each 0.0 when undefined. A model that never abstains has P = R = 0 on a set with unanswerable
    questions; one that always abstains has R = 1 and P = the unanswerable share.
    """
    _check_aligned(predictions, answers)
    _check_sequences(answers)
    abstained = [abstains(prediction) for prediction in predictions]
    unanswerable = [not refs for refs in answers]
    tp = sum(a and u for a, u in zip(abstained, unanswerable))
    precision = tp / sum(abstained) if any(abstained) else 0.0
    recall = tp / sum(unanswerable) if any(unanswerable) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return AbstentionScores(precision, recall, f1)


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_aligned(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must align")


def _check_sequences(entries: Sequence[Iterable[str]]) -> None:
    """Refuse a bare string where a sequence of strings (texts or ids) is expected."""
    if any(isinstance(entry, str) for entry in entries):
        raise TypeError("each entry must be a sequence of strings (texts or ids), not a single string")
