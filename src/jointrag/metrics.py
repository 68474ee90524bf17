"""QA and retrieval metrics: pure functions over strings and id lists.

Answer metrics follow the official SQuAD v1.1 evaluation script so that numbers are comparable with
published ones. Every function that takes `answers` scores against the best-matching reference
(max over answers), as SQuAD and NQ-open do; with no reference answers the score is 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

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


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised answer, else 0.0."""
    prediction = normalize_answer(prediction)
    return max((float(prediction == normalize_answer(a)) for a in _answer_list(answers)), default=0.0)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 between the normalised prediction and the best answer.

    F1 is the harmonic mean of precision and recall over the multiset of shared tokens. When either
    side normalises to no tokens the score is 1.0 if both do and 0.0 otherwise (the SQuAD v2.0
    script's rule; v1.1 would give 0.0 even for two empty strings).
    """
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
