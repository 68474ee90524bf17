"""The whole JSA-RAG and VRAG objectives (methods.md §2-3) against brute force on a tiny RAG system.

`test_objectives_math.py` checks the maths one function at a time and feeds `mis_chain` a ready-made
log w. What it cannot see is how the objectives wire those functions to the model: the pool, the
sign of each term of the importance weight log w = log p(z|x) + log p(y|x,z) - log q(z|x,y), which
distribution the proposals come from, the pseudo-label loss, and the chain cache that must seed the
next visit. A slip there passes every unit test; these tests pin it.

Set-up: the tiny random BERT towers and Llama generator of `conftest.py` (fp32, eval mode: no
dropout), an exact index over the 8 fixture passages, a batch of 3 questions, K = 3, tau = 0.1 (the
towers' scores differ by ~1, so p and q are spread but not one-hot). The generator's weights are
redrawn from N(0, 0.3^2): at the default init log p(y|x,z) barely depends on z (~0.01 nats), which
would leave the generator's part of the weights untested.

The brute force never calls the objectives' batched handles. It scores the whole corpus one passage
and one query at a time, takes the top-K and the ordered union by hand, softmaxes with tau, runs
the raw Hugging Face model on one (prompt + answer) sequence per (example, passage) pair, and runs
the MIS chain and the REINFORCE estimator as plain Python loops. The objectives' random draws
(`torch.multinomial` proposals, `torch.rand` uniforms) are captured by wrapping those two functions
and replayed; the probabilities handed to `torch.multinomial` are checked to be the brute-force q.
Losses must agree to 1e-4 relative, and so must the gradients w.r.t. the prior query tower, the
posterior tower and the generator (autograd through the hand-built loss).
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import jointrag.methods.jsa as jsa_module
from conftest import PASSAGES
from jointrag.generation.generator import PromptTemplate, load_generator
from jointrag.methods.jsa import JSA
from jointrag.methods.vrag import VRAG
from jointrag.retrieval.encoders import load_retriever
from jointrag.retrieval.index import build_index
from jointrag.system import RAGSystem
from jointrag.types import Example

K, TAU, M = 3, 0.1, 8  # candidates per retriever, temperature, proposals (JSA) or samples (VRAG)
BATCH = [
    Example("q1", "What is the capital of France?", ("Paris",)),
    Example("q2", "Who won Super Bowl 50?", ("Denver Broncos",)),
    Example("q3", "What do plants make from light?", ("sugar",)),
]
TOWERS = ("retriever.query_encoder.", "posterior.", "generator.")  # what both methods train
RTOL = 1e-4


# --- the tiny system ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def system(tiny_dir, tmp_path_factory) -> RAGSystem:
    retriever = load_retriever(str(tiny_dir / "encoder"))
    index = build_index(PASSAGES, tmp_path_factory.mktemp("bruteforce") / "index", retriever=retriever, kind="exact",
                        precision="fp32", memory_check=False)
    assert index.passages(np.arange(len(PASSAGES))[None])[0] == PASSAGES  # corpus row i is PASSAGES[i]
    generator = load_generator(str(tiny_dir / "causal"), precision="fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in generator.model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    system = RAGSystem(retriever, generator, index, PromptTemplate(template="{passages}\nQ: {question}\nA:"))
    system.add_posterior()
    return system.eval()


@pytest.fixture
def fresh(system) -> RAGSystem:
    system.zero_grad(set_to_none=True)
    return system


# --- brute-force pieces, one example and one passage at a time ---------------------------------

def corpus_embeddings(system: RAGSystem) -> torch.Tensor:
    """(N, D) passage embeddings, each passage encoded alone by the (frozen) passage tower."""
    tower = system.retriever.passage_encoder
    with torch.no_grad():
        return torch.cat([tower(system.retriever.passage_texts([p])) for p in PASSAGES])


def prior_query(system: RAGSystem, example: Example) -> torch.Tensor:
    """(D,) differentiable E_q(x)."""
    return system.retriever.query_encoder([example.question])[0]


def posterior_query(system: RAGSystem, example: Example) -> torch.Tensor:
    """(D,) differentiable embedding of `x [SEP] y` by the posterior tower."""
    return system.posterior([f"{example.question} [SEP] {example.answers[0]}"])[0]


def top_k(query: torch.Tensor, corpus: torch.Tensor, k: int) -> list[int]:
    scores = (corpus @ query.detach()).tolist()  # (N,)
    return sorted(range(len(scores)), key=lambda row: -scores[row])[:k]


def ordered_union(*lists: list[int]) -> list[int]:
    return list(dict.fromkeys(row for rows in lists for row in rows))


def log_softmax_over(query: torch.Tensor, corpus: torch.Tensor, pool: list[int]) -> torch.Tensor:
    """(P,) log softmax(s(., z) / tau) over the pool, differentiable in the query."""
    return torch.log_softmax(corpus[pool] @ query / TAU, dim=0)


def generator_logp(system: RAGSystem, example: Example, row: int) -> torch.Tensor:
    """log p(y|x,z): the raw causal LM on one unpadded (prompt + ' answer' + eos), summed over y."""
    tokenizer, model = system.generator.tokenizer, system.generator.model
    prompt = tokenizer(system.template.render(example.question, [PASSAGES[row]]))["input_ids"]
    target = tokenizer(" " + example.answers[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    logits = model(input_ids=torch.tensor([prompt + target], device=system.generator.device)).logits[0]  # (L, V)
    predicted = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)  # position t-1 predicts token t
    return predicted.gather(1, torch.tensor(target, device=logits.device)[:, None]).sum()


class Terms:
    """The brute-force distributions of one example over its pool."""

    def __init__(self, system: RAGSystem, corpus: torch.Tensor, example: Example, cached: list[int] = ()):
        prior, posterior = prior_query(system, example), posterior_query(system, example)
        self.pool = ordered_union(list(cached), top_k(prior, corpus, K), top_k(posterior, corpus, K))
        self.log_p = log_softmax_over(prior, corpus, self.pool)  # (P,)
        self.log_q = log_softmax_over(posterior, corpus, self.pool)  # (P,)
        self.kl = (self.log_q.exp() * (self.log_q - self.log_p)).sum()
        self.gen = {i: generator_logp(system, example, row) for i, row in enumerate(self.pool)}  # with gradient


# --- capturing the objectives' random draws and the parameters' gradients ---------------------

@contextmanager
def record_draws():
    """Wrap torch.multinomial and torch.rand while inside; each call's inputs and outputs are appended."""
    calls: dict[str, list] = {"multinomial": [], "rand": []}
    multinomial, rand = torch.multinomial, torch.rand

    def recording_multinomial(probs, num_samples, replacement=False, **kwargs):
        out = multinomial(probs, num_samples, replacement, **kwargs)
        calls["multinomial"].append({"probs": probs.detach().clone(), "replacement": replacement, "out": out.clone()})
        return out

    def recording_rand(*args, **kwargs):
        out = rand(*args, **kwargs)
        calls["rand"].append(out.clone())
        return out

    torch.multinomial, torch.rand = recording_multinomial, recording_rand
    try:
        yield calls
    finally:
        torch.multinomial, torch.rand = multinomial, rand


def gradients(system: RAGSystem) -> dict[str, torch.Tensor]:
    """The gradient of every parameter of the trained towers (zeros where none reached it)."""
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in system.named_parameters() if name.startswith(TOWERS)}


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for tower in TOWERS:
        names = [n for n in want if n.startswith(tower)]
        scale = max(want[n].abs().max().item() for n in names)
        assert scale > 0, f"no gradient reached {tower}"
        for name in names:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def objective_loss_and_gradients(system, objective, seed=0):
    """Run the objective under a fixed seed; (output, gradients, captured draws)."""
    with record_draws() as calls:
        torch.manual_seed(seed)
        output = objective(system, BATCH)
    output.loss.backward()
    got = gradients(system)
    system.zero_grad(set_to_none=True)
    return output, got, calls


def assert_proposals_from(captured: dict, distributions: list[torch.Tensor]) -> None:
    """The probabilities handed to torch.multinomial are the brute-force ones, over the same pool order."""
    assert captured["replacement"] is True
    for b, probs in enumerate(distributions):
        pool = len(probs)
        torch.testing.assert_close(captured["probs"][b, :pool], probs.detach(), rtol=1e-4, atol=1e-6)
        assert captured["probs"][b, pool:].sum() == 0  # padded candidates


# --- 1. JSA-RAG ----------------------------------------------------------------------------------

def mis_by_hand(log_w: dict[int, float], proposals: list[int], uniforms: list[float], initial: int | None):
    """The MIS chain as in methods.md §3: from the cached state (pool index `initial`), or, with none,
    accepting the first proposal unconditionally; then accept z' iff u < min(1, w(z') / w(z)).
    (states after each proposal, accepted flags, number of conditional decisions)."""
    state, states, accepted, decisions = initial, [], [], 0
    for z, u in zip(proposals, uniforms):
        if state is None:
            accept = True
        else:
            accept = u < min(1.0, math.exp(min(log_w[z] - log_w[state], 0.0)))
            decisions += 1
        state = z if accept else state
        states.append(state)
        accepted.append(accept)
    return states, accepted, decisions


def jsa_bruteforce(system: RAGSystem, cache: dict[str, int], draws: torch.Tensor, uniforms: torch.Tensor, states_mode: str):
    """The JSA loss of BATCH rebuilt by hand, with the objective's draws (B, M) and uniforms (B, M)."""
    corpus = corpus_embeddings(system)
    losses, q_list, metrics = [], [], Counter()
    last_rows, decisions_total, accepts_total = {}, 0, 0
    for b, example in enumerate(BATCH):
        cached = [cache[example.id]] if example.id in cache else []
        e = Terms(system, corpus, example, cached)
        q_list.append(e.log_q.exp())
        proposals = draws[b].tolist()
        log_w = {z: e.log_p[z].item() + e.gen[z].item() - e.log_q[z].item() for z in set(proposals) | ({0} if cached else set())}
        states, accepted, decisions = mis_by_hand(log_w, proposals, uniforms[b].tolist(), 0 if cached else None)
        decisions_total += decisions
        accepts_total += sum(accepted) - (0 if cached else 1)
        frequency = Counter(states) if states_mode == "all" else Counter({states[-1]: M})
        losses.append(sum(n / M * -(e.gen[z] + e.log_p[z] + e.log_q[z]) for z, n in frequency.items()))
        last_rows[example.id] = e.pool[states[-1]]
        metrics["pool"] += len(e.pool) / len(BATCH)
        metrics["distinct_proposals"] += len(log_w) / len(BATCH)
        metrics["distinct_states"] += len(frequency) / len(BATCH)
        metrics["rejected"] += M - sum(accepted)
    metrics["acceptance"] = accepts_total / decisions_total
    return torch.stack(losses).mean(), q_list, last_rows, metrics


@pytest.mark.parametrize("states", ["all", "last"])
def test_jsa_equals_bruteforce(fresh, states):
    """q2 comes with a cached state outside both top-K (then its chain starts there); q1 and q3 without."""
    system = fresh
    corpus = corpus_embeddings(system)
    outside = [row for row in range(len(PASSAGES)) if row not in ordered_union(
        top_k(prior_query(system, BATCH[1]), corpus, K), top_k(posterior_query(system, BATCH[1]), corpus, K))]
    objective = JSA(k=K, tau=TAU, proposals=M, cache=True, states=states)
    objective.chain_cache = {"q2": outside[0]}
    cache_before = dict(objective.chain_cache)

    output, got, calls = objective_loss_and_gradients(system, objective)
    assert len(calls["multinomial"]) == 1 and len(calls["rand"]) == 1
    draws, uniforms = calls["multinomial"][0]["out"], calls["rand"][0]  # (B, M), (B, M)
    assert draws.shape == uniforms.shape == (len(BATCH), M)

    want_loss, q_list, last_rows, metrics = jsa_bruteforce(system, cache_before, draws, uniforms, states)
    assert_proposals_from(calls["multinomial"][0], q_list)
    assert metrics["rejected"] > 0 and metrics["acceptance"] > 0  # the draws exercise both outcomes
    assert output.loss.item() == pytest.approx(want_loss.item(), rel=RTOL)
    assert objective.chain_cache == last_rows  # corpus rows of each chain's last state
    for key in ("acceptance", "pool", "distinct_proposals", "distinct_states"):
        assert output.metrics[key] == pytest.approx(metrics[key], rel=1e-6), key

    want_loss.backward()
    assert_same_gradients(got, gradients(system))


# --- 2. VRAG -------------------------------------------------------------------------------------

BETA = 0.5  # not 1, so that a dropped beta shows


def vrag_bruteforce(system: RAGSystem, estimator: str, draws: torch.Tensor | None):
    """-(surrogate - beta KL(q || p)) averaged over BATCH; the surrogate is E_q[log p(y|x,z)] summed over
    the pool (enumerate) or the REINFORCE estimate with a leave-one-out baseline over the draws (sample)."""
    corpus = corpus_embeddings(system)
    losses, q_list, elbo, kl = [], [], 0.0, 0.0
    for b, example in enumerate(BATCH):
        e = Terms(system, corpus, example)  # pool: prior top-K, then posterior top-K
        q_list.append(e.log_q.exp())
        if estimator == "enumerate":
            expected = sum(e.log_q[z].exp() * e.gen[z] for z in range(len(e.pool)))
            surrogate = expected
        else:
            drawn = [e.gen[z] for z in draws[b].tolist()]  # (M,)
            expected = sum(drawn) / M
            surrogate = expected
            for m, z in enumerate(draws[b].tolist()):
                baseline = sum(drawn[j] for j in range(M) if j != m) / (M - 1)
                surrogate = surrogate + (drawn[m] - baseline).detach() * e.log_q[z] / M
        losses.append(-(surrogate - BETA * e.kl))
        elbo += (expected - BETA * e.kl).item() / len(BATCH)
        kl += e.kl.item() / len(BATCH)
    return torch.stack(losses).mean(), q_list, {"elbo": elbo, "kl": kl}


@pytest.mark.parametrize("estimator", ["enumerate", "sample"])
def test_vrag_equals_bruteforce(fresh, estimator):
    system = fresh
    objective = VRAG(k=K, tau=TAU, beta=BETA, estimator=estimator, candidates="union", samples=M)
    output, got, calls = objective_loss_and_gradients(system, objective)
    draws = None
    if estimator == "sample":
        assert len(calls["multinomial"]) == 1
        draws = calls["multinomial"][0]["out"]  # (B, M)
        assert draws.shape == (len(BATCH), M)
    else:
        assert not calls["multinomial"]

    want_loss, q_list, metrics = vrag_bruteforce(system, estimator, draws)
    if draws is not None:
        assert_proposals_from(calls["multinomial"][0], q_list)
    assert output.loss.item() == pytest.approx(want_loss.item(), rel=RTOL)
    for key in ("elbo", "kl"):
        assert output.metrics[key] == pytest.approx(metrics[key], rel=RTOL), key

    want_loss.backward()
    assert_same_gradients(got, gradients(system))


# --- 3. the chain cache seeds the next visit ---------------------------------------------------

def record_chains(monkeypatch) -> list[dict]:
    """Wrap the `union_rows` and `mis_chain` JSA calls; one dict per objective call: its pool rows (B, P),
    the chain's initial states (B,), proposals (B, M) and states (B, M)."""
    calls: list[dict] = []
    union_rows, mis_chain = jsa_module.union_rows, jsa_module.mis_chain

    def recording_union_rows(*columns):
        rows = union_rows(*columns)
        calls.append({"rows": rows.copy()})
        return rows

    def recording_mis_chain(log_weights, proposals, initial, uniforms):
        states, accepted = mis_chain(log_weights, proposals, initial, uniforms)
        calls[-1].update(initial=initial.tolist(), proposals=proposals.tolist(), states=states.tolist())
        return states, accepted

    monkeypatch.setattr(jsa_module, "union_rows", recording_union_rows)
    monkeypatch.setattr(jsa_module, "mis_chain", recording_mis_chain)
    return calls


def test_the_cached_state_starts_the_next_chain(fresh, monkeypatch):
    system = fresh
    calls = record_chains(monkeypatch)
    objective = JSA(k=K, tau=TAU, proposals=M, cache=True)
    torch.manual_seed(0)
    with torch.no_grad():
        objective(system, BATCH)
    first = calls[0]
    assert first["initial"] == [-1] * len(BATCH)  # empty cache: no initial state
    last = [int(first["rows"][b, states[-1]]) for b, states in enumerate(first["states"])]
    assert [objective.chain_cache[e.id] for e in BATCH] == last  # corpus rows, not pool indices

    with torch.no_grad():  # next visit: the cached row leads the pool and starts the chain
        objective(system, BATCH)
    second = calls[1]
    assert second["rows"][:, 0].tolist() == last
    assert second["initial"] == [0] * len(BATCH)


def test_a_cached_state_of_overwhelming_weight_is_never_left(fresh, monkeypatch):
    """A cached state whose log p(y|x,z) is raised by 1000 nats in the MIS pass (the gradient pass is left
    alone): every other proposal has acceptance probability ~e^-1000, so the chain must stay on it; had the
    first proposal been accepted unconditionally, the chain would leave it at once."""
    system = fresh
    corpus = corpus_embeddings(system)
    cached = {}
    for e in BATCH:
        pool = ordered_union(top_k(prior_query(system, e), corpus, K), top_k(posterior_query(system, e), corpus, K))
        cached[e.id] = next(row for row in range(len(PASSAGES)) if row not in pool)  # rarely proposed by q
    selected_logprobs = system.selected_logprobs

    def favouring_the_cached_state(examples, rows, selected, answers, reduce):
        out = selected_logprobs(examples, rows, selected, answers, reduce)  # (B, P)
        if torch.is_grad_enabled():
            return out
        favoured = torch.tensor([[row == cached[e.id] for row in r] for e, r in zip(examples, rows.tolist())])
        return out + 1000.0 * favoured.to(out.device)

    monkeypatch.setattr(system, "selected_logprobs", favouring_the_cached_state)
    calls = record_chains(monkeypatch)
    objective = JSA(k=K, tau=TAU, proposals=M, cache=True)
    objective.chain_cache = dict(cached)
    torch.manual_seed(0)
    output = objective(system, BATCH)
    chain = calls[0]
    assert chain["rows"][:, 0].tolist() == [cached[e.id] for e in BATCH]
    assert chain["initial"] == [0] * len(BATCH)
    assert any(p[0] != 0 for p in chain["proposals"])  # the first proposal is another passage somewhere
    assert chain["states"] == [[0] * M] * len(BATCH)
    assert objective.chain_cache == cached
    assert output.metrics["distinct_states"] == 1.0
