"""VRAG: variational RAG with a posterior retriever q(z|x,y), the baseline of JSA-RAG (methods.md §2).

Maximises ELBO = E_q[log p(y|x,z)] - beta * KL(q(.|x,y) || p(.|x)), both distributions renormalised
over the candidates (the union of prior and posterior top-K, or the posterior's top-K). Trains the
prior query tower (through the KL only), the posterior query tower and the generator; test time uses
the prior. Two estimators of the expectation:

- enumerate: the exact q-weighted sum over the candidates; q's gradient flows through the weights.
- sample: M draws z ~ q; the generator gets the mean of log p(y|x,z_m) and q the score-function
  (REINFORCE) gradient with a leave-one-out baseline, the high-variance estimator JSA-RAG argues
  against. The KL term is exact in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..system import RAGSystem, union_rows
from ..types import Example, ObjectiveOutput
from ._base import Stateless
from ..maths import kl_divergence, log_softmax_masked, sequence_logp


@dataclass
class VRAG(Stateless):
    k: int = 5
    tau: float = 1.0
    reduce: str = "sum"
    beta: float = 1.0
    estimator: str = "enumerate"
    candidates: str = "union"
    samples: int = 8
    needs_posterior: bool = field(default=True, init=False)
    trains: frozenset = field(default=frozenset({"query", "posterior", "generator"}), init=False)

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        questions, answers = [e.question for e in batch], [e.answers[0] for e in batch]
        rows = system.search_posterior(questions, answers, self.k)  # (B, K)
        if self.candidates == "union":
            rows = union_rows(system.search(questions, self.k), rows)  # (B, P)
        mask = system.candidate_mask(rows)
        log_p = log_softmax_masked(system.prior_scores(questions, rows), mask, self.tau)  # (B, P)
        log_q = log_softmax_masked(system.posterior_scores(questions, answers, rows), mask, self.tau)
        kl = kl_divergence(log_q, log_p)  # (B,)
        if self.estimator == "enumerate":
            token_logp, token_mask = system.target_logprobs(batch, rows, answers)  # (B, P, T)
            seq_logp = sequence_logp(token_logp, token_mask, self.reduce).masked_fill(~mask, 0.0)
            expected = (log_q.exp() * seq_logp).sum(-1)  # (B,)
            surrogate = expected
        else:
            draws = torch.multinomial(log_q.detach().exp(), self.samples, replacement=True)  # (B, M)
            selected = torch.zeros_like(mask).scatter_(1, draws, True)
            seq_logp = system.selected_logprobs(batch, rows, selected, answers, self.reduce)  # (B, P)
            drawn = seq_logp.gather(1, draws)  # (B, M)
            expected = drawn.mean(-1)
            m = self.samples
            baseline = (drawn.sum(-1, keepdim=True) - drawn) / max(m - 1, 1)  # leave-one-out, (B, M)
            advantage = (drawn - baseline).detach() if m > 1 else drawn.detach()
            surrogate = expected + (advantage * log_q.gather(1, draws)).mean(-1)
        loss = -(surrogate - self.beta * kl).mean()
        elbo = (expected - self.beta * kl).mean()
        return ObjectiveOutput(loss, {"loss": loss.item(), "elbo": elbo.item(), "kl": kl.mean().item()})
