"""Pure log-space functions behind every objective (methods.md §1-3), each tested against brute force.

Shapes: B examples, K candidates, T target tokens, P pool candidates, M proposals. A candidate mask
is False where an example has fewer candidates than the padded width (an index returned -1).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def log_softmax_masked(scores: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """log softmax(scores / tau) over the candidates where `mask` is True; -inf elsewhere. (B, K)"""
    return torch.log_softmax((scores / tau).masked_fill(~mask, NEG_INF), dim=-1)


def sequence_logp(token_logp: torch.Tensor, token_mask: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """log p(y | x, z) from per-token log-probs (B, K, T): the sum, or the mean over real tokens."""
    total = (token_logp * token_mask).sum(-1)  # (B, K)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / token_mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")


def rag_sequence_nll(doc_logp: torch.Tensor, seq_logp: torch.Tensor) -> torch.Tensor:
    """-log sum_z p(z|x) p(y|x,z) per example (B,), from doc log-probs and sequence log-probs (B, K).

    Equals `rag_token_nll` when the target has one token or K = 1.
    """
    return -torch.logsumexp(doc_logp + seq_logp, dim=-1)


def rag_token_nll(doc_logp: torch.Tensor, token_logp: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """-sum_t log sum_z p(z|x) p(y_t|x,z,y_<t) per example (B,); doc (B, K), tokens (B, K, T)."""
    mixture = torch.logsumexp(doc_logp.unsqueeze(-1) + token_logp, dim=1)  # (B, T)
    return -(mixture * token_mask[:, 0]).sum(-1)


def kl_divergence(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_z q(z) (log q(z) - log p(z)) per example (B,); -inf entries of q add 0.

    Padded entries are filled before subtracting: -inf - (-inf) is nan, and a nan hidden by
    `torch.where` still poisons the gradient.
    """
    support = log_q > NEG_INF
    log_q = log_q.masked_fill(~support, 0.0)
    log_p = log_p.masked_fill(~support, 0.0)
    return torch.where(support, log_q.exp() * (log_q - log_p), torch.zeros_like(log_q)).sum(-1)


def mis_chain(
    log_weights: torch.Tensor, proposals: torch.Tensor, initial: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Metropolis independence sampling over a candidate pool, vectorised over the batch.

    log_weights (B, P): log w(z) = log p(z|x) + log p(y|x,z) - log q(z|x,y), needed only at the
    proposals and initial states. proposals (B, M): pool indices drawn from q. initial (B,): the
    chain's current state, or -1 to accept the first proposal unconditionally (no cached state).
    uniforms (B, M): U(0, 1) draws. Each proposal z' is accepted with probability
    min(1, w(z') / w(z)). Returns the chain's states after each proposal (B, M) and which proposals
    were accepted (B, M).
    """
    batch, steps = proposals.shape
    rows = torch.arange(batch, device=proposals.device)
    state = initial.clone()
    states, accepted = [], []
    for m in range(steps):
        candidate = proposals[:, m]
        fresh = state < 0
        current = state.clamp(min=0)
        log_ratio = log_weights[rows, candidate] - log_weights[rows, current]
        accept = fresh | (torch.log(uniforms[:, m]) < log_ratio)
        state = torch.where(accept, candidate, state)
        states.append(state)
        accepted.append(accept)
    return torch.stack(states, 1), torch.stack(accepted, 1)


def state_frequencies(states: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Fraction of the chain's steps spent in each pool candidate (B, P); each row sums to 1."""
    counts = torch.zeros(states.shape[0], pool_size, device=states.device)
    counts.scatter_add_(1, states, torch.ones_like(states, dtype=counts.dtype))
    return counts / states.shape[1]
