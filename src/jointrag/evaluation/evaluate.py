"""Retrieve, answer and score a set of QA or dialog examples.

Retrieval reads each example's `question` (a dialog's query); the generator's prompt is built from
the whole example (`PromptTemplate.prompt`: question and dialog history).

Retrieval metrics: answer recall@k (an answer string inside one of the top k passages) for every
answerable example, and gold-passage recall@k and MRR@k for answerable examples whose gold passage
ids are known. Answer metrics, for every answered example: SQuAD EM and token F1 (see
`metrics.normalize_answer`) and ROUGE-L, the measure for long-form answers (ClapNQ's). Dialog
examples (those with a history) add response BLEU-1 and BLEU-4 (corpus BLEU over their predictions)
and the knowledge-selection precision, recall and F1 of the top retrieved passage against their gold
ids (DSTC11 track 5's measures, `metrics.knowledge_selection`).

Unanswerable examples (no reference answers) have no answer string to look for, so the retrieval
metrics skip them, even where a related gold passage is given; their EM, F1 and ROUGE-L are 1 when the
prediction abstains (`metrics.abstains`) and 0 otherwise. A set that has any adds their count,
`unanswerable`, and `abstain_precision`, `abstain_recall` and `abstain_f1` (`metrics.abstention`).

Generation stops at `max_new_tokens`; when the references are longer than that (`long_references`),
scores fall for truncation alone, and `evaluate` says so on stderr, once per process.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from tqdm.auto import tqdm

from .. import metrics
from ..errors import UserError
from ..generation.generator import Generator, PromptTemplate
from ..retrieval.index import RetrievalIndex
from ..types import Example, Passage


@dataclass(frozen=True)
class Retrieved:
    passages: list[Passage]
    scores: list[float]


def retrieve(index: RetrievalIndex, questions: Sequence[str], k: int) -> list[Retrieved]:
    """Top-k passages with their scores for each question; missing results (-1) are dropped. An empty
    question is refused: any passages returned for it would be arbitrary."""
    for i, question in enumerate(questions):
        if not question.strip():
            raise UserError(f"question {i + 1} is empty; nothing to retrieve for it")
    scores, rows = index.search(questions, k)
    results = []
    for passages, row_scores in zip(index.passages(rows), scores.tolist()):
        kept = [(p, s) for p, s in zip(passages, row_scores) if p is not None]
        results.append(Retrieved([p for p, _ in kept], [s for _, s in kept]))
    return results


def answer(generator: Generator, template: PromptTemplate, examples: Sequence[Example], contexts: Sequence[Sequence[Passage]], **generation) -> list[str]:
    """One answer per example, generated from a prompt that holds its context passages."""
    return generator.generate([template.prompt(e, c, generator.chat) for e, c in zip(examples, contexts)], **generation)


DECODERS = ("top1", "rag-sequence-fast", "rag-sequence-thorough", "rag-token", "ensemble")


def decode(
    generator: Generator,
    template: PromptTemplate,
    examples: Sequence[Example],
    retrieved: Sequence[Retrieved],
    *,
    method: str = "top1",
    contexts: int = 1,
    tau: float = 0.1,
    **generation,
) -> list[str]:
    """Answers by `method`: "top1" puts the top `contexts` passages in one prompt; the RAG decoders
    (methods.md §1) mix one prompt per passage under p(z|x) = softmax(score / tau). "ensemble" is
    RA-DIT's parallel in-context decoding (methods.md §4), which is RAG-Sequence's thorough decoding:
    a candidate per passage (per beam), each scored under every passage, the best mixture wins."""
    if method == "top1":
        return answer(generator, template, examples, [r.passages[:contexts] for r in retrieved], **generation)
    import torch

    from ..generation.decoding import rag_sequence_generate, rag_token_generate

    width = max(len(r.passages) for r in retrieved)
    prompts, scores = [], torch.full((len(retrieved), width), float("-inf"))
    for i, (example, result) in enumerate(zip(examples, retrieved)):
        row = [template.prompt(example, [p], generator.chat) for p in result.passages]
        prompts.append(row + [row[-1]] * (width - len(row)))  # padded prompts carry -inf weight
        scores[i, : len(result.scores)] = torch.tensor(result.scores)
    doc_logp = torch.log_softmax(scores / tau, dim=-1).to(generator.device)  # (B, K)
    if method == "rag-token":
        return rag_token_generate(generator, prompts, doc_logp, **generation)
    mode = "thorough" if method == "ensemble" else method.removeprefix("rag-sequence-")
    return rag_sequence_generate(generator, prompts, doc_logp, mode=mode, **generation)


def recall_cutoffs(k: int) -> list[int]:
    return sorted({c for c in (1, 5, 10, 20, 100) if c <= k} | {k})


def evaluate(
    index: RetrievalIndex,
    generator: Generator | None,
    examples: Sequence[Example],
    *,
    k: int = 5,
    contexts: int = 1,
    template: PromptTemplate = PromptTemplate(),
    batch_size: int = 16,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    decoder: str = "top1",
    tau: float = 0.1,
) -> tuple[list[dict], dict]:
    """Predictions (one dict per example) and aggregate metrics; no generation when `generator` is None.

    `decoder` is one of DECODERS (see `decode`); `tau` is the retrieval temperature the RAG decoders use.
    """
    note = long_references(examples, max_new_tokens) if generator is not None else None
    if note:
        say_once(note)
    if not examples:
        raise UserError("no examples to evaluate")
    warn_missing_gold(index, examples)
    questions = [e.question for e in examples]
    retrieved = [r for start in range(0, len(examples), batch_size) for r in retrieve(index, questions[start : start + batch_size], k)]
    # questions with prompts of similar length share a generation batch (less padding), longest first
    # (a batch that does not fit in memory fails at once); predictions keep the examples' order
    order = sorted(range(len(examples)), key=lambda i: -sum(len(p.text) + len(p.title) for p in retrieved[i].passages[:contexts]))
    predictions: list[dict | None] = [None] * len(examples)
    with tqdm(total=len(examples), unit="question", desc="evaluating", dynamic_ncols=True) as bar:
        for start in range(0, len(examples), batch_size):
            chosen = order[start : start + batch_size]
            batch, results = [examples[i] for i in chosen], [retrieved[i] for i in chosen]
            answers = (
                decode(generator, template, batch, results, method=decoder, contexts=contexts, tau=tau, max_new_tokens=max_new_tokens, num_beams=num_beams)
                if generator is not None
                else [None] * len(batch)
            )
            for i, example, result, prediction in zip(chosen, batch, results, answers):
                predictions[i] = score_example(example, result, prediction, k)
            bar.update(len(batch))
    return predictions, aggregate(predictions, k)


def long_references(examples: Sequence[Example], max_new_tokens: int) -> str | None:
    """A note when answers are cut shorter than the references, else None.

    The rule: over the answerable examples, the median length in words of each one's shortest reference
    exceeds `max_new_tokens`. A word is at least one token for subword tokenizers, so then most answers
    stop before they could match a reference whole (ClapNQ's median is about 42 words against the
    default 16 tokens), and EM, F1 and ROUGE-L measure the cut as much as the model.
    """
    lengths = [min(len(answer.split()) for answer in e.answers) for e in examples if e.answers]
    if not lengths or statistics.median(lengths) <= max_new_tokens:
        return None
    median = statistics.median(lengths)
    return (f"jointrag: note: the median reference answer has {median:g} words but answers stop at {max_new_tokens} "
            f"new tokens (--max-new-tokens, eval.max_new_tokens in training): scores will fall for the cut alone; "
            f"for long-form answers raise it to about {2 * median:g}")


@lru_cache(maxsize=None)
def say_once(message: str) -> None:
    """Print `message` on stderr the first time it is given in this process (a training run evaluates
    its dev set many times; the cache remembers what was said)."""
    print(message, file=sys.stderr)


def warn_missing_gold(index: RetrievalIndex, examples: Sequence[Example]) -> None:
    """Say on stderr when gold passage ids are not in the index's corpus: their gold recall is 0 whatever
    is retrieved (the data and the index disagree, e.g. a different chunking or id scheme)."""
    missing = [(e.id, g) for e in examples for g in e.gold_ids if index.corpus.row_of(g) is None]
    if missing:
        gold = sum(len(e.gold_ids) for e in examples)
        print(f"jointrag: warning: {len(missing)} of {gold} gold passage ids are not in the corpus of {index.directory} "
              f"(first: '{missing[0][1]}' of example '{missing[0][0]}'); they count as not retrieved", file=sys.stderr)


def score_example(example: Example, result: Retrieved, prediction: str | None, k: int) -> dict:
    """One example's row: its retrieved passages and, where they apply, its retrieval and answer scores."""
    ids = [p.id for p in result.passages]
    texts = [f"{p.title} {p.text}" for p in result.passages]
    row = {
        "id": example.id,
        "question": example.question,
        "answers": list(example.answers),
        "prediction": prediction,
        "passages": [{"id": p.id, "title": p.title, "score": round(s, 4)} for p, s in zip(result.passages, result.scores)],
    }
    if example.answers:
        row["answer_recall"] = {c: metrics.answer_recall_at_k(texts, example.answers, c) for c in recall_cutoffs(k)}
    if prediction is not None:
        row["em"] = metrics.exact_match(prediction, example.answers)
        row["f1"] = metrics.token_f1(prediction, example.answers)
        row["rouge_l"] = metrics.rouge_l(prediction, example.answers)
    if example.gold_ids and example.answers:
        row["gold_recall"] = {c: metrics.gold_recall_at_k(ids, example.gold_ids, c) for c in recall_cutoffs(k)}
        row["mrr"] = metrics.reciprocal_rank(ids, example.gold_ids, k)
    if example.history:
        row["history"] = [list(turn) for turn in example.history]
        row["gold_ids"] = list(example.gold_ids)
    return row


def aggregate(predictions: Sequence[dict], k: int) -> dict:
    """Means over examples, as percentages: answer metrics over the answered examples, answer recall over
    the answerable ones, gold metrics over the answerable ones that have gold ids, dialog metrics over
    the dialog examples, abstention over the answered examples of a set with unanswerable ones."""
    with_gold = [p for p in predictions if "gold_recall" in p]
    answerable = [p for p in predictions if "answer_recall" in p]
    answered = [p for p in predictions if "em" in p]
    dialogs = [p for p in predictions if "history" in p]
    unanswerable = sum(not p["answers"] for p in predictions)
    out: dict = {"examples": len(predictions), "k": k}
    if answered:
        for name in ("em", "f1", "rouge_l"):
            out[name] = 100 * metrics.mean([p[name] for p in answered])
    if unanswerable:
        out["unanswerable"] = unanswerable
    if unanswerable and answered:
        scores = metrics.abstention([p["prediction"] for p in answered], [p["answers"] for p in answered])
        out.update({f"abstain_{name}": 100 * getattr(scores, name) for name in ("precision", "recall", "f1")})
    responses = [p for p in dialogs if "em" in p and p["answers"]]  # BLEU needs a reference
    if responses:
        texts, references = [p["prediction"] for p in responses], [p["answers"] for p in responses]
        out["bleu1"] = 100 * metrics.corpus_bleu(texts, references, max_order=1)
        out["bleu4"] = 100 * metrics.corpus_bleu(texts, references, max_order=4)
    if dialogs:
        selected = [[p["passages"][0]["id"]] if p["passages"] else [] for p in dialogs]  # the top passage
        scores = metrics.knowledge_selection(selected, [p["gold_ids"] for p in dialogs])
        out.update({f"knowledge_{name}": 100 * getattr(scores, name) for name in ("precision", "recall", "f1")})
    if answerable:
        for c in recall_cutoffs(k):
            out[f"answer_recall@{c}"] = 100 * metrics.mean([p["answer_recall"][c] for p in answerable])
    if with_gold:
        for c in recall_cutoffs(k):
            out[f"gold_recall@{c}"] = 100 * metrics.mean([p["gold_recall"][c] for p in with_gold])
        out[f"mrr@{k}"] = 100 * metrics.mean([p["mrr"] for p in with_gold])
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in out.items()}
