"""RAG-Sequence and RAG-Token (Lewis et al. 2020, arXiv 2005.11401): top-K marginalisation.

Both minimise the negative marginal log-likelihood of y over the prior's top-K candidates C(x),
with p(z|x) = softmax(s(x,z)/tau) over C(x) (methods.md §1). The gradient reaches the query tower
only through p(z|x); the generator is trained on every candidate, weighted by its posterior share.
RAG-Sequence equals RAG-Token when the target has one token and when K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..system import RAGSystem
from ..types import Example, ObjectiveOutput
from ._base import Stateless
from ..maths import log_softmax_masked, rag_sequence_nll, rag_token_nll, sequence_logp


@dataclass
class _TopK(Stateless):
    k: int = 5
    tau: float = 1.0
    reduce: str = "sum"
    needs_posterior: bool = field(default=False, init=False)
    trains: frozenset = field(default=frozenset({"query", "generator"}), init=False)

    def _candidates(self, system: RAGSystem, batch: Sequence[Example]):
        questions, answers = [e.question for e in batch], [e.answers[0] for e in batch]
        rows = system.search(questions, self.k)  # (B, K)
        mask = system.candidate_mask(rows)
        doc_logp = log_softmax_masked(system.prior_scores(questions, rows), mask, self.tau)  # (B, K)
        token_logp, token_mask = system.target_logprobs(batch, rows, answers)  # (B, K, T)
        return doc_logp, token_logp, token_mask

    @staticmethod
    def _metrics(loss, doc_logp) -> dict:
        return {"loss": loss.item(), "top1_prior": doc_logp.exp().max(-1).values.mean().item()}


class RagSequence(_TopK):
    """-log sum_z p(z|x) p(y|x,z): one passage for the whole answer."""

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        doc_logp, token_logp, token_mask = self._candidates(system, batch)
        seq_logp = sequence_logp(token_logp, token_mask, self.reduce)  # (B, K)
        loss = rag_sequence_nll(doc_logp, seq_logp).mean()
        return ObjectiveOutput(loss, self._metrics(loss, doc_logp))


class RagToken(_TopK):
    """-sum_t log sum_z p(z|x) p(y_t|x,z,y_<t): a passage per token. `reduce` is not used."""

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        doc_logp, token_logp, token_mask = self._candidates(system, batch)
        loss = rag_token_nll(doc_logp, token_logp, token_mask).mean()
        return ObjectiveOutput(loss, self._metrics(loss, doc_logp))
