"""Invar-RAG's retrieval stage (Liu et al. 2024, arXiv 2411.07021; methods.md §6): three losses that
train the LLM retriever's LoRA adapter (`methods/invar_adapters.py`). The generation stage is RA-DIT's LM-ft
(`radit.LMFinetune`) on the generation adapter.

Our reading of the paper (its official code is a non-working stub, so the formulas are ours; see
docs/results.md): for each query x of a batch,
- candidates C(x): its positive z+ (the gold passage, else the small encoder's best-ranked passage that
  contains an answer) and its `negatives` hard negatives (the small encoder's best-ranked passages that
  are neither gold nor contain an answer);
- representation learning (InfoNCE): -log softmax_z(cos(x, z) / tau)[z+] over every candidate of the
  batch (in-batch and hard negatives), a passage that is gold for x or contains its answer excepted;
- LLM-aligned retrieval: KL(p_small || p_LLM) over C(x), p_small = softmax(s_small / teacher_tau) from
  the frozen small encoder (MiniLM), p_LLM = softmax(cos / tau): the LLM retriever is pulled towards
  the small encoder's coarse relevance;
- invariance: KL(p_LLM(. | x, C) || p_LLM(. | x', C')) over C(x), x' a rewritten query and C' the
  candidates with resized windows; gradient flows through both views, so both move towards a
  relevance that the variation does not change. Identical views give exactly 0.
The loss is w_contrastive * InfoNCE + w_align * KL_align + w_invariance * KL_inv, each averaged over
the batch (InfoNCE over the queries with a positive).

Shapes: B queries, K candidates per query, N distinct candidate passages of the batch, D embedding size.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import metrics
from ..io import jsonl_records
from ..retrieval.resolve import resolve_index
from ..errors import UserError
from .invar_adapters import drop_words, window
from ..system import RAGSystem
from ..types import Example, ObjectiveOutput
from ._base import Stateless
from ..maths import NEG_INF, kl_divergence, log_softmax_masked


def info_nce(scores: torch.Tensor, positive: torch.Tensor, allowed: torch.Tensor, tau: float) -> torch.Tensor:
    """-log softmax(scores / tau)[positive] over the `allowed` passages, per query (B,).

    scores (B, N); positive (B,) column of each query's positive; allowed (B, N), True at the positive.
    """
    logp = torch.log_softmax((scores / tau).masked_fill(~allowed, NEG_INF), dim=-1)
    return -logp.gather(1, positive.unsqueeze(1)).squeeze(1)


def alignment_kl(small: torch.Tensor, llm: torch.Tensor, mask: torch.Tensor, small_tau: float, tau: float) -> torch.Tensor:
    """KL(softmax(small / small_tau) || softmax(llm / tau)) over each query's candidates (B,); (B, K) inputs."""
    return kl_divergence(log_softmax_masked(small, mask, small_tau), log_softmax_masked(llm, mask, tau))


def invariance_kl(original: torch.Tensor, varied: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(original / tau) || softmax(varied / tau)) over each query's candidates (B,); (B, K) inputs."""
    return kl_divergence(log_softmax_masked(original, mask, tau), log_softmax_masked(varied, mask, tau))


def read_rewrites(path: Path) -> dict[str, str]:
    """{example id: rewritten query} from a JSONL file of {"id", "rewrite"} objects."""
    if not path.is_file():
        raise UserError(f"invar.rewrites: file {path} does not exist")
    rewrites = {}
    for line_no, record in jsonl_records(path, path.read_text(encoding="utf-8")):
        for key in ("id", "rewrite"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str) or not record[key].strip():
                raise UserError(f"{path}:{line_no}: field '{key}' must be a non-empty string")
        rewrites[record["id"]] = record["rewrite"]
    return rewrites


@dataclass
class InvarRetrieval(Stateless):
    teacher: str | None = None
    negatives: int = 4
    tau: float = 0.05
    teacher_tau: float = 0.05
    w_contrastive: float = 1.0
    w_align: float = 1.0
    w_invariance: float = 1.0
    word_drop: float = 0.15
    rewrites: str | None = None
    window: float = 0.5
    needs_posterior: bool = field(default=False, init=False)
    trains: frozenset = field(default=frozenset({"query"}), init=False)  # the towers are tied: passages too
    small: object = field(default=None, init=False)  # the small encoder's index (RetrievalIndex)
    rewritten: dict = field(default_factory=dict, init=False)

    def prepare(self, system: RAGSystem, examples: Sequence[Example]) -> None:
        self.small = resolve_index(self.teacher)
        if self.small.retriever is None:
            raise UserError(f"invar.teacher: {self.small.directory} is a '{self.small.kind}' index; the alignment needs a dense one")
        if self.small.corpus.fingerprint != system.index.corpus.fingerprint:
            raise UserError(f"invar.teacher: {self.small.directory} indexes another corpus than {system.index.directory}")
        self.rewritten = read_rewrites(Path(self.rewrites)) if self.rewrites else {}

    def footprint(self, system: RAGSystem) -> tuple[int, int]:
        """Sequences per example for the memory check: the query and its candidates, in both views; at
        most the retriever's `max_length` tokens each."""
        return 2 * (2 + self.negatives), system.retriever.query_encoder.max_length

    def candidates(self, system: RAGSystem, batch: Sequence[Example]) -> tuple[np.ndarray, torch.Tensor]:
        """Each query's positive (column 0, -1 if none) and hard negatives (B, 1 + negatives), -1 padded,
        and the small encoder's scores of them (B, 1 + negatives)."""
        questions = [e.question for e in batch]
        _, ranked = self.small.search(questions, self.negatives + 20)  # (B, depth)
        corpus = system.index.corpus
        rows = np.full((len(batch), 1 + self.negatives), -1, dtype=np.int64)
        for b, (example, ranking) in enumerate(zip(batch, ranked.tolist())):
            gold = {r for r in (corpus.row_of(i) for i in example.gold_ids) if r is not None}
            found = [r for r in ranking if r >= 0]
            answered = {r for r, p in zip(found, corpus.get(found)) if metrics.has_answer(p.text, example.answers)}
            positive = min(gold) if gold else next((r for r in found if r in answered), None)
            rows[b, 0] = -1 if positive is None else positive
            negatives = [r for r in found if r not in gold and r not in answered][: self.negatives]
            rows[b, 1 : 1 + len(negatives)] = negatives
        queries = torch.from_numpy(self.small.retriever.encode_queries(questions))  # (B, Ds)
        small = torch.einsum("bd,bkd->bk", queries, self.small.embeddings(rows).float())  # (B, K)
        return rows, small.to(system.generator.device)

    def vary(self, system: RAGSystem, batch: Sequence[Example], rows: list[int]) -> tuple[list[str], list]:
        """The varied view: rewritten questions and resized passages (a window of one, or grown by the next
        passage of the same title)."""
        corpus = system.index.corpus
        questions = [self.rewritten.get(e.id) or drop_words(e.question, self.word_drop, random) for e in batch]
        passages = []
        for row, passage in zip(rows, corpus.get(rows)):
            after = corpus[row + 1] if row + 1 < len(corpus) else None
            if self.window < 1 and (random.random() < 0.5 or after is None or after.title != passage.title):
                passage = dataclasses.replace(passage, text=window(passage.text, self.window, random))
            elif self.window < 1:
                passage = dataclasses.replace(passage, text=f"{passage.text} {after.text}")
            passages.append(passage)
        return questions, passages

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        retriever = system.retriever
        rows, small = self.candidates(system, batch)
        mask = torch.from_numpy(rows >= 0).to(small.device)  # (B, K)
        distinct = sorted({r for r in rows.ravel().tolist() if r >= 0})  # the batch's N passages
        column = {r: n for n, r in enumerate(distinct)}
        at = torch.tensor([[column.get(r, 0) for r in row] for row in rows.tolist()], device=small.device)  # (B, K)
        passages = system.index.corpus.get(distinct)

        def scores(questions: Sequence[str], texts: list[str]) -> torch.Tensor:  # (B, N) cosines
            queries = retriever.query_encoder(retriever.query_texts(questions))
            return (queries @ retriever.passage_encoder(texts).T).float()

        full = scores([e.question for e in batch], retriever.passage_texts(passages))  # (B, N)
        llm = full.gather(1, at)  # (B, K)
        has_positive = mask[:, 0]
        positive = at[:, 0]
        allowed = torch.tensor([[r == rows[b, 0] or not (metrics.has_answer(p.text, e.answers) or p.id in e.gold_ids)
                                 for r, p in zip(distinct, passages)] for b, e in enumerate(batch)], device=full.device)
        contrastive = info_nce(full, positive, allowed, self.tau)[has_positive]
        contrastive = contrastive.mean() if len(contrastive) else full.sum() * 0.0
        align = alignment_kl(small, llm, mask, self.teacher_tau, self.tau).mean()
        loss = self.w_contrastive * contrastive + self.w_align * align
        values = {}
        if self.w_invariance:
            questions, varied_passages = self.vary(system, batch, distinct)
            varied = scores(questions, retriever.passage_texts(varied_passages)).gather(1, at)  # (B, K)
            invariance = invariance_kl(llm, varied, mask, self.tau).mean()
            loss = loss + self.w_invariance * invariance
            values["invariance"] = invariance.item()
        top = full.masked_fill(~allowed, NEG_INF).argmax(1)
        accuracy = (top == positive)[has_positive].float().mean().item() if has_positive.any() else float("nan")
        values.update({"loss": loss.item(), "contrastive": contrastive.item(), "align": align.item(),
                       "positives": has_positive.float().mean().item(), "in_batch_accuracy": accuracy})
        return ObjectiveOutput(loss, values)
