"""The log-space maths behind every objective (methods.md §1-3) against brute force.

Brute-force references are explicit Python loops over examples, candidates z and tokens t that sum
probabilities (not log-probabilities) and take the log at the end, in float64. Padded candidates
carry doc log-prob -inf; padded target tokens carry arbitrary finite garbage, which the functions must
ignore through the token mask.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from jointrag.maths import (
    kl_divergence,
    log_softmax_masked,
    mis_chain,
    rag_sequence_nll,
    rag_token_nll,
    sequence_logp,
    state_frequencies,
)

F64 = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def candidate_mask(counts: list[int], width: int) -> torch.Tensor:
    """(B, K) True for the first counts[b] candidates of each example."""
    return torch.arange(width).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)


def token_inputs(batch: int, k: int, lengths: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, K, T) with garbage (finite, positive) at padding, and the (B, K, T) mask.

    The mask is the same for every candidate of an example (one target per example), as
    `Generator.target_logprobs` returns it.
    """
    width = max(lengths)
    logp = -torch.rand(batch, k, width, generator=g, dtype=F64) * 4 - 0.05  # real log-probs < 0
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).unsqueeze(1).expand(batch, k, width)
    garbage = torch.rand(batch, k, width, generator=g, dtype=F64) * 50 + 3
    return torch.where(mask, logp, garbage), mask.clone()


def brute_doc_logp(scores: torch.Tensor, mask: torch.Tensor, tau: float) -> list[list[float]]:
    out = []
    for b in range(scores.shape[0]):
        real = [k for k in range(scores.shape[1]) if mask[b, k]]
        z = sum(math.exp(scores[b, k].item() / tau) for k in real)
        out.append([math.log(math.exp(scores[b, k].item() / tau) / z) if mask[b, k] else -math.inf for k in range(scores.shape[1])])
    return out


# --------------------------------------------------------------------------- log_softmax_masked


@pytest.mark.parametrize("tau", [1.0, 0.1, 2.5])
def test_log_softmax_masked_matches_explicit_softmax(tau):
    g = seeded(0)
    scores = torch.randn(4, 6, generator=g, dtype=F64)
    mask = candidate_mask([6, 3, 1, 5], 6)
    mask[3, 1] = False  # a hole in the middle, not only trailing padding
    out = log_softmax_masked(scores, mask, tau)
    expected = torch.tensor(brute_doc_logp(scores, mask, tau), dtype=F64)
    assert torch.isneginf(out[~mask]).all()
    assert torch.isfinite(out[mask]).all()
    torch.testing.assert_close(out[mask], expected[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    assert out[2, 0].item() == 0.0  # a single candidate has probability 1


def test_log_softmax_masked_temperature_sharpens():
    scores = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cold, warm = log_softmax_masked(scores, mask, 0.1).exp(), log_softmax_masked(scores, mask, 10.0).exp()
    assert cold[0, 2] > 0.99 and (warm - 1 / 3).abs().max() < 0.05
    torch.testing.assert_close(log_softmax_masked(scores, mask, 0.5), log_softmax_masked(2 * scores, mask, 1.0))


# --------------------------------------------------------------------------- sequence_logp


def test_sequence_logp_sum_and_mean_ignore_padding():
    g = seeded(1)
    lengths = [5, 2, 3]
    logp, mask = token_inputs(3, 4, lengths, g)
    total, mean = sequence_logp(logp, mask, "sum"), sequence_logp(logp, mask, "mean")
    assert total.shape == mean.shape == (3, 4)
    for b in range(3):
        for k in range(4):
            s = sum(logp[b, k, t].item() for t in range(lengths[b]))
            assert total[b, k].item() == pytest.approx(s, abs=1e-12)
            assert mean[b, k].item() == pytest.approx(s / lengths[b], abs=1e-12)
    assert sequence_logp(logp, mask).equal(total)  # "sum" is the default


def test_sequence_logp_mean_of_an_empty_row_is_zero_and_bad_reduce_raises():
    logp = torch.full((1, 2, 3), 7.0, dtype=F64)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    assert sequence_logp(logp, mask, "mean").eq(0).all()
    with pytest.raises(ValueError, match="reduce"):
        sequence_logp(logp, mask, "max")


# --------------------------------------------------------------------------- RAG-Sequence, RAG-Token


def rag_inputs(seed: int, lengths: list[int], counts: list[int], k: int):
    g = seeded(seed)
    batch = len(lengths)
    scores = torch.randn(batch, k, generator=g, dtype=F64) * 2
    cmask = candidate_mask(counts, k)
    doc_logp = log_softmax_masked(scores, cmask)
    token_logp, token_mask = token_inputs(batch, k, lengths, g)
    return doc_logp, cmask, token_logp, token_mask


def brute_rag_sequence(doc_logp, token_logp, lengths) -> list[float]:
    out = []
    for b in range(doc_logp.shape[0]):
        total = 0.0
        for k in range(doc_logp.shape[1]):
            p_z = math.exp(doc_logp[b, k].item())  # 0 for a padded candidate
            p_y = math.exp(sum(token_logp[b, k, t].item() for t in range(lengths[b])))
            total += p_z * p_y
        out.append(-math.log(total))
    return out


def brute_rag_token(doc_logp, token_logp, lengths) -> list[float]:
    out = []
    for b in range(doc_logp.shape[0]):
        nll = 0.0
        for t in range(lengths[b]):
            mixture = sum(math.exp(doc_logp[b, k].item()) * math.exp(token_logp[b, k, t].item()) for k in range(doc_logp.shape[1]))
            nll -= math.log(mixture)
        out.append(nll)
    return out


CASES = [
    ([4, 1, 6], [5, 5, 5]),  # token padding only
    ([3, 5, 2], [5, 2, 1]),  # padded candidates too, one example with a single candidate
]


@pytest.mark.parametrize("lengths,counts", CASES)
def test_rag_sequence_nll_matches_brute_force(lengths, counts):
    doc_logp, cmask, token_logp, token_mask = rag_inputs(2, lengths, counts, k=5)
    nll = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))
    assert nll.shape == (3,) and torch.isfinite(nll).all()
    torch.testing.assert_close(nll, torch.tensor(brute_rag_sequence(doc_logp, token_logp, lengths), dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("lengths,counts", CASES)
def test_rag_token_nll_matches_brute_force(lengths, counts):
    doc_logp, cmask, token_logp, token_mask = rag_inputs(3, lengths, counts, k=5)
    nll = rag_token_nll(doc_logp, token_logp, token_mask)
    assert nll.shape == (3,) and torch.isfinite(nll).all()
    torch.testing.assert_close(nll, torch.tensor(brute_rag_token(doc_logp, token_logp, lengths), dtype=F64), rtol=0, atol=1e-10)


def test_rag_sequence_and_rag_token_differ_in_general():
    """A guard that the brute-force tests above do not compare one quantity twice."""
    doc_logp, _, token_logp, token_mask = rag_inputs(4, [4, 6], [5, 5], k=5)
    seq = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))
    tok = rag_token_nll(doc_logp, token_logp, token_mask)
    assert (seq - tok).abs().min() > 1e-3


@pytest.mark.parametrize("counts", [[4, 4, 4], [4, 2, 1]])
def test_rag_sequence_equals_rag_token_for_one_token_targets(counts):
    doc_logp, _, token_logp, token_mask = rag_inputs(5, [1, 1, 1], counts, k=4)
    seq = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))
    torch.testing.assert_close(seq, rag_token_nll(doc_logp, token_logp, token_mask), rtol=0, atol=1e-12)


def test_rag_sequence_equals_rag_token_with_one_candidate():
    _, _, token_logp, token_mask = rag_inputs(6, [3, 7, 1], [1, 1, 1], k=1)
    doc_logp = log_softmax_masked(torch.randn(3, 1, dtype=F64), torch.ones(3, 1, dtype=torch.bool))
    seq = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))
    tok = rag_token_nll(doc_logp, token_logp, token_mask)
    torch.testing.assert_close(seq, tok, rtol=0, atol=1e-12)
    torch.testing.assert_close(seq, -sequence_logp(token_logp, token_mask)[:, 0], rtol=0, atol=1e-12)


def test_padded_candidate_scores_do_not_matter():
    doc_logp, cmask, token_logp, token_mask = rag_inputs(7, [3, 4], [3, 2], k=4)
    other = token_logp.clone()
    other[~cmask] = -0.01  # a padded candidate that would dominate if it counted
    for fn in (lambda t: rag_sequence_nll(doc_logp, sequence_logp(t, token_mask)), lambda t: rag_token_nll(doc_logp, t, token_mask)):
        torch.testing.assert_close(fn(token_logp), fn(other), rtol=0, atol=0)


# --------------------------------------------------------------------------- KL


def brute_kl(log_q, log_p) -> list[float]:
    out = []
    for b in range(log_q.shape[0]):
        total = 0.0
        for z in range(log_q.shape[1]):
            q, p = math.exp(log_q[b, z].item()), math.exp(log_p[b, z].item())
            if q > 0:
                total += q * math.log(q / p)
        out.append(total)
    return out


def kl_inputs(seed: int, counts: list[int], width: int):
    g = seeded(seed)
    mask = candidate_mask(counts, width)
    log_q = log_softmax_masked(torch.randn(len(counts), width, generator=g, dtype=F64), mask, 0.7)
    log_p = log_softmax_masked(torch.randn(len(counts), width, generator=g, dtype=F64), mask, 1.3)
    return log_q, log_p, mask


@pytest.mark.parametrize("counts", [[6, 6, 6], [6, 3, 1]])
def test_kl_matches_brute_force_with_padded_candidates(counts):
    log_q, log_p, _ = kl_inputs(8, counts, 6)
    kl = kl_divergence(log_q, log_p)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, torch.tensor(brute_kl(log_q, log_p), dtype=F64), rtol=0, atol=1e-12)
    if counts[-1] == 1:
        assert kl[-1].item() == 0.0  # one candidate: q == p == 1


def test_kl_is_zero_for_equal_distributions_and_nonnegative():
    log_q, _, _ = kl_inputs(9, [5, 2, 4], 5)
    assert kl_divergence(log_q, log_q).abs().max().item() < 1e-15
    g = seeded(10)
    for _ in range(20):
        counts = torch.randint(1, 8, (6,), generator=g).tolist()
        mask = candidate_mask(counts, 7)
        scale = torch.rand(6, 1, generator=g, dtype=F64) * 5
        log_q = log_softmax_masked(torch.randn(6, 7, generator=g, dtype=F64) * scale, mask)
        log_p = log_softmax_masked(torch.randn(6, 7, generator=g, dtype=F64) * scale, mask)
        assert (kl_divergence(log_q, log_p) >= -1e-15).all()


def test_kl_is_infinite_when_p_misses_q_support():
    log_q = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=F64))
    log_p = torch.log(torch.tensor([[1.0, 0.0, 0.0]], dtype=F64))
    assert torch.isposinf(kl_divergence(log_q, log_p)).all()
    assert kl_divergence(log_p, log_q).item() == pytest.approx(math.log(2))


def test_kl_gradient_is_finite_with_padded_candidates():
    """VRAG's union pool pads rows with -inf in both q and p; the padding must not poison the gradient.

    With `q * (log_q - log_p)` the padded entries compute -inf - (-inf) = nan. torch.where hides it in
    the forward pass but not in the backward pass: d/dq of the term is 0 * nan = nan, `exp` passes it
    on, and log_softmax's backward spreads it over every score of the row.
    """
    g = seeded(11)
    mask = candidate_mask([5, 3], 5)
    a = torch.randn(2, 5, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(2, 5, generator=g, dtype=F64, requires_grad=True)
    kl = kl_divergence(log_softmax_masked(a, mask), log_softmax_masked(b, mask))
    grad_a, grad_b = torch.autograd.grad(kl.sum(), (a, b))
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    assert grad_a[~mask].eq(0).all() and grad_b[~mask].eq(0).all()
    # the real candidates get the gradient of the unpadded KL over them alone
    a3, b3 = a[1:, :3].detach().requires_grad_(), b[1:, :3].detach().requires_grad_()
    ref = torch.autograd.grad(kl_divergence(a3.log_softmax(-1), b3.log_softmax(-1)).sum(), (a3, b3))
    torch.testing.assert_close(grad_a[1:, :3], ref[0])
    torch.testing.assert_close(grad_b[1:, :3], ref[1])


# --------------------------------------------------------------------------- gradcheck


def test_gradcheck_rag_sequence_nll():
    g = seeded(12)
    doc = torch.randn(2, 4, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    seq = (-torch.rand(2, 4, generator=g, dtype=F64) * 5).requires_grad_()
    assert torch.autograd.gradcheck(rag_sequence_nll, (doc, seq))


def test_gradcheck_rag_token_nll():
    g = seeded(13)
    doc = torch.randn(2, 3, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    logp, mask = token_inputs(2, 3, [4, 2], g)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda d, t: rag_token_nll(d, t, mask), (doc, logp))


def test_gradcheck_kl_and_the_scores_through_log_softmax():
    g = seeded(14)
    log_q = torch.randn(2, 4, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    log_p = torch.randn(2, 4, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(kl_divergence, (log_q, log_p))
    full = torch.ones(2, 4, dtype=torch.bool)
    a = torch.randn(2, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(2, 4, generator=g, dtype=F64, requires_grad=True)
    fn = lambda x, y: kl_divergence(log_softmax_masked(x, full, 0.5), log_softmax_masked(y, full, 0.5))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))


def test_gradcheck_sequence_logp_mean():
    g = seeded(15)
    logp, mask = token_inputs(2, 2, [3, 1], g)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sequence_logp(t, mask, "mean"), (logp,))


# --------------------------------------------------------------------------- MIS chain

TARGET = torch.tensor([0.05, 0.10, 0.20, 0.25, 0.40], dtype=F64)  # the posterior p(z|x,y)
PROPOSAL = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.10], dtype=F64)  # q(z|x,y), far from it


def run_chains(batch: int, steps: int, seed: int, initial: int = -1):
    g = seeded(seed)
    log_w = (TARGET.log() - PROPOSAL.log()).expand(batch, -1)
    proposals = torch.multinomial(PROPOSAL.expand(batch, -1), steps, replacement=True, generator=g)
    uniforms = torch.rand(batch, steps, generator=g, dtype=F64)
    return mis_chain(log_w, proposals, torch.full((batch,), initial), uniforms)


@pytest.mark.parametrize("initial", [-1, 0])
def test_mis_chain_samples_the_target(initial):
    """B=400 chains x M=200 steps. Burn-in 50 steps: the MIS kernel contracts in total variation by at
    least 1 - min_z q(z)/pi(z) = 0.75 per step (0.75^50 < 1e-6), so thinning every 25 steps gives
    near-independent draws (6 per chain) for a chi-square test; all post-burn-in states for TV."""
    states, accepted = run_chains(400, 200, seed=16, initial=initial)
    kept = states[:, 50:]
    thinned = kept[:, ::25].reshape(-1)
    observed = torch.bincount(thinned, minlength=5).double()
    assert stats.chisquare(observed.numpy(), (TARGET * thinned.numel()).numpy()).pvalue > 1e-3
    pooled = torch.bincount(kept.reshape(-1), minlength=5).double() / kept.numel()
    assert 0.5 * (pooled - TARGET).abs().sum().item() < 0.01
    # the test has power: the proposal alone is far from the target
    assert 0.5 * (PROPOSAL - TARGET).abs().sum().item() > 0.4
    # and the stationary acceptance rate is sum_{z,z'} pi(z) q(z') min(1, w(z')/w(z))
    w = TARGET / PROPOSAL
    rate = sum(TARGET[i] * PROPOSAL[j] * min(1.0, (w[j] / w[i]).item()) for i in range(5) for j in range(5))
    assert accepted[:, 50:].double().mean().item() == pytest.approx(rate.item(), abs=0.01)


def brute_mis(log_w, proposals, initial, uniforms):
    states, accepted = [], []
    for b in range(proposals.shape[0]):
        state, row_s, row_a = int(initial[b]), [], []
        for m in range(proposals.shape[1]):
            z = int(proposals[b, m])
            ok = state < 0 or uniforms[b, m].item() < min(1.0, math.exp(log_w[b, z].item() - log_w[b, state].item()))
            state = z if ok else state
            row_s.append(state)
            row_a.append(ok)
        states.append(row_s)
        accepted.append(row_a)
    return torch.tensor(states), torch.tensor(accepted)


def test_mis_chain_matches_a_python_loop():
    g = seeded(17)
    log_w = torch.randn(6, 7, generator=g, dtype=F64) * 2
    proposals = torch.randint(0, 7, (6, 30), generator=g)
    uniforms = torch.rand(6, 30, generator=g, dtype=F64)
    initial = torch.tensor([-1, 0, 3, -1, 6, 2])
    states, accepted = mis_chain(log_w, proposals, initial, uniforms)
    ref_states, ref_accepted = brute_mis(log_w, proposals, initial, uniforms)
    assert states.equal(ref_states) and accepted.equal(ref_accepted)
    assert 0 < accepted.float().mean() < 1  # both branches exercised


def test_mis_first_proposal_is_accepted_without_a_state():
    log_w = torch.tensor([[0.0, -30.0, 5.0]] * 4, dtype=F64)
    proposals = torch.tensor([[1, 2, 1]] * 4)  # the worst candidate first
    uniforms = torch.full((4, 3), 1 - 1e-9, dtype=F64)
    states, accepted = mis_chain(log_w, proposals, torch.full((4,), -1), uniforms)
    assert accepted[:, 0].all() and states[:, 0].eq(1).all()
    assert accepted[:, 1].all() and (~accepted[:, 2]).all() and states[:, 2].eq(2).all()


def test_mis_better_proposals_are_always_accepted():
    g = seeded(18)
    log_w = torch.arange(8, dtype=F64).expand(3, -1) * 0.3  # candidate j has weight exp(0.3 j)
    proposals = torch.arange(1, 8).expand(3, -1)  # each proposal beats the current state
    uniforms = torch.rand(3, 7, generator=g, dtype=F64) * 1e-3 + (1 - 1e-3)  # all close to 1
    states, accepted = mis_chain(log_w, proposals, torch.zeros(3, dtype=torch.long), uniforms)
    assert accepted.all() and states.equal(proposals)


def test_mis_accepts_everything_when_the_proposal_is_the_posterior():
    g = seeded(19)
    prior = torch.randn(5, 6, generator=g, dtype=F64).log_softmax(-1)
    likelihood = -torch.rand(5, 6, generator=g, dtype=F64) * 10
    log_q = (prior + likelihood).log_softmax(-1)  # q = p(z|x,y): all importance weights equal
    log_w = prior + likelihood - log_q
    proposals = torch.multinomial(log_q.exp(), 50, replacement=True, generator=g)
    uniforms = torch.rand(5, 50, generator=g)
    for initial in (torch.full((5,), -1), torch.tensor([0, 1, 2, 3, 4])):
        states, accepted = mis_chain(log_w, proposals, initial, uniforms)
        assert accepted.all() and states.equal(proposals)


def test_mis_starts_from_the_given_state():
    log_w = torch.log(torch.tensor([[1.0, 2.0, 4.0]] * 4, dtype=F64))
    initial = torch.tensor([2, 2, 1, 1])
    proposals = torch.tensor([[0, 1], [1, 0], [0, 0], [0, 0]])
    # from state 2 (w=4): proposals of w=1, 2 have ratios 1/4 and 1/2; from state 1 (w=2): ratio 1/2
    uniforms = torch.tensor([[0.99, 0.99], [0.49, 0.51], [0.51, 0.49], [0.49, 0.99]], dtype=F64)
    states, accepted = mis_chain(log_w, proposals, initial, uniforms)
    assert states.tolist() == [[2, 2], [1, 1], [1, 0], [0, 0]]
    assert accepted.tolist() == [[False, False], [True, False], [False, True], [True, True]]


# --------------------------------------------------------------------------- state_frequencies


def test_state_frequencies_match_a_counter():
    g = seeded(20)
    states = torch.randint(0, 4, (5, 37), generator=g)  # pool of 6: candidates 4 and 5 never visited
    freq = state_frequencies(states, 6)
    assert freq.shape == (5, 6)
    torch.testing.assert_close(freq.sum(-1), torch.ones(5))
    for b in range(5):
        counts = Counter(states[b].tolist())
        assert freq[b].tolist() == pytest.approx([counts.get(z, 0) / 37 for z in range(6)])
    assert freq[:, 4:].eq(0).all()
