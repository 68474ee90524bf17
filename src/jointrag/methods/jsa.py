"""JSA-RAG (Cao et al. 2025, arXiv 2508.18168): joint stochastic approximation (methods.md §3).

A stochastic EM: the true posterior p(z|x,y) ∝ p(z|x) p(y|x,z) is sampled by Metropolis independence
sampling (MIS) with the posterior retriever q(z|x,y) as proposal, and the chain's states serve as
pseudo-labels for one step on  sum_z f(z) [-log p(y|x,z) - log p(z|x) - log q(z|x,y)],  which fits
the generator and prior by maximum marginal likelihood and q by the inclusive KL(p(z|x,y) || q).

Per step: pool = union of prior top-K, posterior top-K and the cached state; M proposals from q;
log p(y|x,z) of the distinct proposals only, without gradient, in one batched pass; the MIS chain;
then the gradient pass over the distinct chain states only. Unlike RAG, the generator is trained on
a few sampled passages, not on all K.

Shapes: B examples, P pool candidates, M proposals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..system import RAGSystem, union_rows
from ..types import Example, ObjectiveOutput
from ._base import Stateless
from ..maths import log_softmax_masked, mis_chain, state_frequencies


@dataclass
class JSA(Stateless):
    k: int = 5
    tau: float = 1.0
    reduce: str = "sum"
    proposals: int = 50
    cache: bool = True
    states: str = "all"
    needs_posterior: bool = field(default=True, init=False)
    trains: frozenset = field(default=frozenset({"query", "posterior", "generator"}), init=False)
    chain_cache: dict = field(default_factory=dict, init=False)  # example id -> corpus row of its last state

    def state_dict(self) -> dict:
        return {"chain_cache": dict(self.chain_cache)}

    def load_state_dict(self, state: dict) -> None:
        self.chain_cache = dict(state.get("chain_cache", {}))

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        questions, answers = [e.question for e in batch], [e.answers[0] for e in batch]
        cached = np.array([[self.chain_cache.get(e.id, -1) if self.cache else -1] for e in batch], dtype=np.int64)  # (B, 1)
        rows = union_rows(cached, system.search(questions, self.k), system.search_posterior(questions, answers, self.k))  # (B, P)
        mask = system.candidate_mask(rows)
        log_p = log_softmax_masked(system.prior_scores(questions, rows), mask, self.tau)  # (B, P)
        log_q = log_softmax_masked(system.posterior_scores(questions, answers, rows), mask, self.tau)

        device = log_q.device
        draws = torch.multinomial(log_q.detach().exp(), self.proposals, replacement=True)  # (B, M)
        initial = torch.tensor([0 if c[0] >= 0 else -1 for c in cached], device=device)  # the cached row leads the pool
        proposed = torch.zeros_like(mask).scatter_(1, draws, True)
        proposed[initial >= 0, 0] = True
        with torch.no_grad():
            gen_logp = system.selected_logprobs(batch, rows, proposed, answers, self.reduce)  # (B, P)
        log_w = log_p.detach() + gen_logp - log_q.detach()
        uniforms = torch.rand(draws.shape, device=device)
        states, accepted = mis_chain(log_w, draws, initial, uniforms)  # (B, M)

        if self.states == "all":
            weights = state_frequencies(states, rows.shape[1])  # (B, P)
        else:
            weights = torch.zeros_like(log_p).scatter_(1, states[:, -1:], 1.0)
        chosen = weights > 0
        labelled_logp = system.selected_logprobs(batch, rows, chosen, answers, self.reduce)  # (B, P), with gradient
        terms = -(labelled_logp + log_p + log_q)
        loss = torch.where(chosen, weights * terms, torch.zeros_like(terms)).sum(-1).mean()

        if self.cache:
            last = states[:, -1].tolist()
            for b, example in enumerate(batch):
                self.chain_cache[example.id] = int(rows[b, last[b]])
        free = initial < 0  # the first proposal of a chain without a cached state is accepted unconditionally
        counted = torch.ones_like(accepted)
        counted[free, 0] = False
        metrics = {
            "loss": loss.item(),
            "acceptance": (accepted & counted).sum().item() / max(counted.sum().item(), 1),
            "distinct_proposals": proposed.sum(-1).float().mean().item(),
            "distinct_states": chosen.sum(-1).float().mean().item(),
            "pool": mask.sum(-1).float().mean().item(),
        }
        return ObjectiveOutput(loss, metrics)
