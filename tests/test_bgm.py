"""Tests for BGM (methods.md §5): greedy silver sequences against exhaustive search, the output
parser, the silver cache (resume, atomic writes, bad files), the PPO loss against a hand-computed
case, a bandit on which PPO's reward rises, a few SL and PPO steps on the tiny models that change
the bridge and nothing else; then through the CLI: both stages, PPO's resume with its stage-1
reference, the whole pipeline with its table, eval/ask with a BGM checkpoint, and settings errors.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import zlib

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cli_helpers import (
    assert_complete_run,
    assert_resumes_on_the_same_trajectory,
    assert_user_error,
    resume_finished_pipeline,
    run,
    train_argv,
    train_lines,
    weights_of,
)
from conftest import PASSAGES
from conftest import QA as QA_ROWS
from jointrag.cli import main
from jointrag.methods.bgm_bridge import (
    METRICS,
    BridgeSystem,
    BridgeTemplate,
    Judge,
    SilverStore,
    bridge_answers,
    greedy_silver,
    load_bridge,
    plain_generation,
    score_bridged,
)
from jointrag.errors import UserError
from jointrag.generation.generator import PromptTemplate, load_generator
from jointrag.methods.bgm import BGMPPO, BGMSupervised, group_advantages, ppo_loss
from jointrag.types import Example

pytestmark = pytest.mark.usefixtures("isolated_home")

QA = [
    Example("q1", "What is the capital of France?", ("Paris",)),
    Example("q2", "Who won Super Bowl 50?", ("Denver Broncos",)),
    Example("q3", "What do plants make from light?", ("sugar",)),
    Example("q4", "What is the capital of Italy?", ("Rome",)),
]
SHORT = PromptTemplate("{passages}\nQ: {question}\nA:", "Title: {title}\n{text}")


# --- greedy silver sequences against exhaustive search ----------------------------------------------


def exhaustive(size: int, value, max_len: int, repeat: bool):
    """The best score over every sequence of at most `max_len` candidates."""
    best = value(())
    for length in range(1, max_len + 1):
        pool = itertools.product(range(size), repeat=length) if repeat else itertools.permutations(range(size), length)
        best = max([best, *(value(s) for s in pool)])
    return best


def concave_judge(rng: np.random.Generator, size: int):
    """A deterministic judge whose score is (metric, log-likelihood), each a sum over the distinct
    candidates of marginal gains that shrink with every repeat: greedy is optimal for it."""
    metric, logp = rng.integers(-1, 2, size), rng.normal(size=size)

    def value(sequence):
        counts = np.bincount(np.array(sequence, dtype=int), minlength=size)
        gains = [(metric[j] * c - c * (c - 1) / 2, logp[j] * c - 0.5 * c * (c - 1) / 2) for j, c in enumerate(counts)]
        return (float(sum(g[0] for g in gains)), float(sum(g[1] for g in gains)))

    return value


@pytest.mark.parametrize("repeat, max_len", [(False, 2), (False, 5), (True, 3), (True, 4)])
def test_greedy_silver_equals_exhaustive_search(repeat, max_len):
    rng = np.random.default_rng(0)
    sizes = [5, 4, 1, 5, 3, 5]
    judges = [concave_judge(rng, n) for n in sizes]
    calls = []

    def score(pairs):
        calls.append(len(pairs))
        return [judges[i](s) for i, s in pairs]

    found = greedy_silver(sizes, score, max_len=max_len, repeat=repeat)
    for (sequence, value), judge, n in zip(found, judges, sizes):
        assert value == judge(sequence) == exhaustive(n, judge, max_len, repeat)
        assert len(sequence) <= max_len and (repeat or len(set(sequence)) == len(sequence))
    assert len(calls) <= max_len + 1  # one batched call per step for every example
    assert sum(calls) <= len(sizes) + sum(sizes) * max_len


def test_greedy_silver_stops_at_a_local_optimum_and_prefers_the_earlier_candidate():
    pairs_needed = {(0, 1): 1.0, (1, 0): 1.0}  # only a pair helps: greedy stops at the empty sequence

    def score(pairs):
        return [(pairs_needed.get(s, 0.0),) for _, s in pairs]

    assert greedy_silver([2], score, max_len=2) == [((), (0.0,))]
    assert exhaustive(2, lambda s: (pairs_needed.get(s, 0.0),), 2, False) == (1.0,)
    tied = greedy_silver([3], lambda pairs: [(float(len(s) == 1),) for _, s in pairs], max_len=3)
    assert tied == [((0,), (1.0,))]  # ties go to the better-retrieved candidate; no strict gain after it
    assert greedy_silver([0, 2], lambda pairs: [(float(len(s)),) for _, s in pairs], max_len=5) == [
        ((), (0.0,)), ((0, 1), (2.0,))]


# --- the output parser --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2 1 3", [1, 0, 2]),
    ("[2] [1]", [1, 0]),
    ("ids: 3;3,1", [2, 2, 0]),
    ("none", []),
    ("", []),
    ("0 -1 4 99 2", [1]),
    ("passage two", []),
    ("99999999999999999999999 1", [0]),
    ("1 " * 50, [0] * 4),
    (None, []),
    (b"1 2", []),
])
def test_parse_keeps_valid_ids_only(text, expected):
    assert BridgeTemplate.parse(text, 3, 4) == expected


def test_parse_never_fails_on_junk():
    rng = random.Random(0)
    alphabet = "0123456789 -[],;:.\n\tx\u0663\u00b2"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = BridgeTemplate.parse(text, 5, 6)
        assert len(ids) <= 6 and all(0 <= i < 5 for i in ids)


def test_template_round_trip_and_input():
    template = BridgeTemplate(passage_words=3)
    assert template.output([1, 0, 1]) == "2 1 2" and template.output([]) == "none"
    assert template.parse(template.output([2, 0, 2]), 3, 10) == [2, 0, 2]
    text = template.input("Who?", PASSAGES[:2])
    assert text == "Who? [1] Paris: Paris is the [2] Berlin: Berlin is the"


# --- the silver cache -----------------------------------------------------------------------------------


def toy_candidates(batch):
    return [PASSAGES[:3] if e.id != "q2" else PASSAGES[4:7] for e in batch]


def toy_scores(examples, contexts):
    """Deterministic judge: 1 when a passage's title is the answer, and shorter is better."""
    return [(float(any(p.title in e.answers for p in c)), -0.1 * len(c)) for e, c in zip(examples, contexts)]


def test_silver_cache_resumes_after_an_interruption(tmp_path):
    path = tmp_path / "silver.jsonl"
    header = {"k": 3, "metrics": ["toy"]}
    seen = []

    def failing(examples, contexts):
        seen.extend(e.id for e in examples)
        if {"q3", "q4"} & {e.id for e in examples}:
            raise KeyboardInterrupt
        return toy_scores(examples, contexts)

    with pytest.raises(KeyboardInterrupt):
        SilverStore(path, header).fill(QA, toy_candidates, failing, max_len=3, repeat=False, batch_size=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"jointrag": "bgm-silver", **header}
    assert [r["id"] for r in lines[1:]] == ["q1", "q2"]  # the finished batch; no half-written file
    assert not path.with_name(path.name + ".tmp").exists()
    assert lines[1]["silver"] == ["p0"] and lines[1]["candidates"] == ["p0", "p1", "p2"]
    assert lines[2]["silver"] == []  # no candidate of q2 holds its answer: the empty sequence is best

    def counting(examples, contexts):
        seen.extend(e.id for e in examples)
        return toy_scores(examples, contexts)

    seen.clear()
    assert SilverStore(path, header).fill(QA, toy_candidates, counting, max_len=3, repeat=False, batch_size=2) == 2
    assert set(seen) == {"q3", "q4"}  # only the missing examples are judged
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()[1:]] == ["q1", "q2", "q3", "q4"]
    written, seen[:] = path.stat().st_mtime_ns, []
    assert SilverStore(path, header).fill(QA, toy_candidates, counting, max_len=3, repeat=False) == 0
    assert path.stat().st_mtime_ns == written and not seen
    assert SilverStore(path, header).get(QA[3]).silver == ["p2"]
    with pytest.raises(UserError, match="another question"):
        SilverStore(path, header).get(Example("q4", "Something else?", ("Rome",)))


@pytest.mark.parametrize("edit, names", [
    (lambda lines: lines[:2] + ["{not json"] + lines[3:], (":3:", "JSON")),
    (lambda lines: lines[:1] + ['{"id": "q1", "question": "x", "candidates": ["p0"]}'] + lines[2:], (":2:", "'silver'")),
    (lambda lines: lines[:1] + ['{"id": "q1", "question": "x", "candidates": ["p0"], "silver": ["p9"], "score": []}'],
     (":2:", "field 'silver'", "p9")),
    (lambda lines: [json.dumps({**json.loads(lines[0]), "k": 7})] + lines[1:], (":1:", "'k'")),
])
def test_a_bad_silver_file_names_file_line_and_field(tmp_path, edit, names):
    path = tmp_path / "silver.jsonl"
    header = {"k": 3, "metrics": ["toy"]}
    SilverStore(path, header).fill(QA, toy_candidates, toy_scores, max_len=2, repeat=False)
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(UserError) as error:
        SilverStore(path, header)
    for name in (str(path), *names):
        assert name in str(error.value)


# --- PPO ----------------------------------------------------------------------------------------------


def test_ppo_loss_matches_a_hand_computed_case():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.2, -1.5, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.0, -2.5, -1.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    loss, stats = ppo_loss(logp, old, ref, advantages, clip=0.2, beta=0.1)
    # ratios e^0.2 = 1.2214 and e^-0.5 = 0.6065 are clipped to 1.2 and 0.8, the third is 1:
    # surrogate = mean(min(1.2214, 1.2) * 1, min(0.6065 * -2, 0.8 * -2), 0.5) = (1.2 - 1.6 + 0.5) / 3
    # k3 with d = ref - logp = (0, -0.5, -0.5): e^d - d - 1 = (0, 0.106531, 0.106531)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx(-(1.2 - 1.6 + 0.5) / 3 + 0.1 * 2 * k3 / 3, abs=1e-12)
    assert stats["kl"] == pytest.approx(2 * k3 / 3) and stats["clip_fraction"] == pytest.approx(2 / 3)
    loss.backward()
    # clipped terms pass no surrogate gradient; d k3 / d logp = 1 - e^d
    expected = [0.0, 0.1 * (1 - math.exp(-0.5)) / 3, -0.5 / 3 + 0.1 * (1 - math.exp(-0.5)) / 3]
    assert logp.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_group_advantages_are_leave_one_out():
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    assert torch.allclose(group_advantages(rewards), torch.tensor([[0.75, -0.75, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 1))


class CategoricalBridge(nn.Module):
    """A bandit policy with the bridge's interface: one token, 0 = `none`, j = passage j."""

    def __init__(self, actions: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(actions))
        self.template = BridgeTemplate()
        self.max_passages = 4
        self.rows = []

    def inputs(self, examples, candidates):
        return [e.question for e in examples]

    def sample(self, inputs, n, temperature=1.0):
        with torch.no_grad():
            draws = torch.multinomial(torch.softmax(self.logits / temperature, -1), len(inputs) * n, replacement=True)
        return [[a] for a in draws.tolist()]

    def text(self, actions):
        return [self.template.output([a[0] - 1]) if a[0] else self.template.empty for a in actions]

    def select(self, texts, candidates):
        return [[c[p] for p in self.template.parse(t, len(c), self.max_passages)] for t, c in zip(texts, candidates)]

    def logprobs(self, inputs, actions, temperature=1.0):
        self.rows.append(len(actions))
        return torch.log_softmax(self.logits / temperature, -1)[torch.tensor([a[0] for a in actions])]


class TitleLLM(nn.Module):
    """A frozen 'LLM' that answers with the title of the first passage in its prompt."""

    name, chat = "title-llm", False

    def generate(self, prompts, max_new_tokens=32):
        return [next((line[7:] for line in p.splitlines() if line.startswith("Title: ")), "unknown") for p in prompts]

    def pair_logprobs(self, prompts, targets):
        return torch.zeros(len(prompts), 1), torch.ones(len(prompts), 1, dtype=torch.bool)


class FixedIndex:
    """Every question retrieves Berlin, Paris, Rome in that order."""

    corpus = None

    def search(self, questions, k):
        rows = np.tile(np.array([1, 0, 2, 3, 4])[:k], (len(questions), 1))
        return np.zeros(rows.shape, dtype=np.float32), rows

    def passages(self, rows):
        return [[PASSAGES[r] for r in row] for row in rows.tolist()]


def bandit(beta: float, steps: int = 60) -> tuple[list[float], float, CategoricalBridge]:
    torch.manual_seed(0)
    system = BridgeSystem(CategoricalBridge(4), TitleLLM(), FixedIndex(), SHORT)
    objective = BGMPPO(k=3, samples=4, epochs=2, beta=beta, clip=0.2, metrics=("em",))
    objective.prepare(system, QA[:1])
    optimizer = torch.optim.Adam(system.bridge.parameters(), lr=0.1)
    rewards = []
    for _ in range(steps):
        output = objective(system, [QA[0]] * 4)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rewards.append(output.metrics["reward"])
    policy = torch.log_softmax(system.bridge.logits.detach(), -1)
    reference = torch.log_softmax(system.reference.logits, -1)
    return rewards, float((policy.exp() * (policy - reference)).sum()), system.bridge


def test_ppo_reward_rises_on_a_bandit_and_the_kl_term_holds_the_policy_back():
    rewards, kl_free, bridge = bandit(beta=0.0)
    assert np.mean(rewards[:5]) < 0.5 and np.mean(rewards[-10:]) > 0.9  # only `2` (Paris) answers right
    assert torch.softmax(bridge.logits, -1).argmax().item() == 2
    assert bridge.rows[:3] == [16, 32, 32]  # each rollout is used in two consecutive updates
    _, kl_held, _ = bandit(beta=2.0)
    assert kl_held < kl_free / 4


def test_ppo_state_round_trips_the_rollout_buffer():
    torch.manual_seed(0)
    system = BridgeSystem(CategoricalBridge(4), TitleLLM(), FixedIndex(), SHORT)
    objective = BGMPPO(k=3, samples=2, epochs=3, metrics=("em",))
    objective.prepare(system, QA[:1])
    objective(system, QA[:2])
    objective(system, QA[:2])
    state = json.loads(json.dumps(objective.state_dict()))  # plain data
    again = BGMPPO(k=3, samples=2, epochs=3, metrics=("em",))
    again.load_state_dict(state)
    assert [r.uses for r in again.buffer] == [2, 1] and again.buffer[0].inputs == objective.buffer[0].inputs
    with pytest.raises(ValueError, match="reference"):
        BGMPPO()(BridgeSystem(CategoricalBridge(4), TitleLLM(), FixedIndex(), SHORT), QA[:1])


# --- the tiny models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_index(tiny_dir, tmp_path_factory):
    from jointrag.retrieval.index import build_index
    from jointrag.retrieval.encoders import load_retriever

    retriever = load_retriever(str(tiny_dir / "encoder"))
    return build_index(PASSAGES, tmp_path_factory.mktemp("bgm") / "index", retriever=retriever, precision="fp32")


def tiny_system(tiny_dir, tiny_index, bridge_kind="causal", **bridge_options) -> BridgeSystem:
    torch.manual_seed(0)
    bridge = load_bridge(str(tiny_dir / bridge_kind), precision="fp32", max_new_tokens=8, **bridge_options)
    generator = load_generator(str(tiny_dir / "causal"), precision="fp32")
    return BridgeSystem(bridge, generator, tiny_index, SHORT)


def snapshot(system: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in system.named_parameters()}


def changed(system: nn.Module, before: dict) -> set[str]:
    return {name for name, p in system.named_parameters() if not torch.equal(p, before[name])}


def steps(system: BridgeSystem, objective, count: int, lr: float = 0.01) -> list[dict]:
    """The training loop's step in miniature: loss, backward, clip, AdamW on the trainable parameters."""
    trainable = [p for p in system.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    logged = []
    for step in range(count):
        output = objective(system, QA[2 * (step % 2) : 2 * (step % 2) + 2])
        assert torch.isfinite(output.loss) and all(isinstance(v, float) for v in output.metrics.values())
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        logged.append(output.metrics)
    return logged


@pytest.mark.parametrize("bridge_kind", ["causal", "seq2seq"])
def test_sampled_actions_are_scored_on_the_tokens_that_were_sampled(tiny_dir, tiny_index, bridge_kind):
    bridge = tiny_system(tiny_dir, tiny_index, bridge_kind).bridge.eval()
    inputs = bridge.inputs(QA[:2], [PASSAGES[:3], PASSAGES[3:6]])
    torch.manual_seed(3)
    actions = bridge.sample(inputs, 3)
    torch.manual_seed(3)
    lm = bridge.lm
    batch = lm.tokenizer.pad({"input_ids": lm.prompt_ids(inputs)}, return_tensors="pt")
    with plain_generation(lm.model):  # the same draws again, with the distributions they came from
        output = lm.model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=3,
                                   max_new_tokens=8, pad_token_id=lm.tokenizer.pad_token_id, output_scores=True,
                                   return_dict_in_generate=True)
    token_logp = lm.model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)  # (N, L)
    assert all((row[: len(a)] < 0).all() for row, a in zip(token_logp, actions))  # no forced (probability 1) token
    expected = [float(row[: len(a)].sum()) for row, a in zip(token_logp, actions)]
    with torch.no_grad():
        scored = bridge.logprobs([x for x in inputs for _ in range(3)], actions).tolist()
    assert scored == pytest.approx(expected, abs=1e-4)
    with torch.no_grad():
        logp, mask = lm.pair_logprobs(inputs[:1], ["2 1"])  # a target text scores as its token ids
        scored = bridge.logprobs(inputs[:1], bridge.target_ids(["2 1"])).item()
    assert scored == pytest.approx(float((logp * mask).sum()), abs=1e-5)


def test_llm_judge_scores_metrics_then_reference_likelihood(tiny_dir, tiny_index):
    system = tiny_system(tiny_dir, tiny_index)
    judge = Judge(system.generator, SHORT, max_new_tokens=3, batch_size=2)
    contexts = [[], PASSAGES[:1], PASSAGES[:2], []]
    scores = judge.scores(QA, contexts)
    answers = judge.answers(QA, contexts)
    for example, context, answer, score in zip(QA, contexts, answers, scores):
        logp, mask = system.generator.pair_logprobs([SHORT.prompt(example, context)], [example.answers[0]])
        single = system.generator.generate([SHORT.prompt(example, context)], max_new_tokens=3)[0]
        assert answer == single and len(score) == 3
        assert score[2] == pytest.approx(float((logp * mask).sum()), abs=1e-4)
    assert judge.rewards(QA, contexts) == pytest.approx([sum(s[:2]) / 2 for s in scores])


@pytest.mark.parametrize("bridge_kind, lora", [("causal", False), ("seq2seq", True)])
def test_supervised_steps_change_only_the_bridge(tiny_dir, tiny_index, tmp_path, bridge_kind, lora):
    system = tiny_system(tiny_dir, tiny_index, bridge_kind, lora=lora, lora_r=2)
    objective = BGMSupervised(k=3, silver=str(tmp_path / "silver.jsonl"), max_len=2, max_new_tokens=3)
    objective.prepare(system, QA)
    records = [json.loads(line) for line in (tmp_path / "silver.jsonl").read_text().splitlines()]
    assert records[0]["generator"] == system.generator.name and len(records) == 1 + len(QA)
    assert all(len(r["candidates"]) == 3 and len(r["silver"]) <= 2 and len(r["score"]) == 3 for r in records[1:])
    before = snapshot(system)
    logged = steps(system, objective, 3, lr=0.05)
    moved = changed(system, before)
    assert moved and all(name.startswith("bridge.") for name in moved)
    assert not lora or all("lora_" in name for name in moved)
    assert logged[-1]["loss"] > 0


class PairJudge:
    """A deterministic judge that wants exactly two passages: greedy silver is always `1 2`."""

    def scores(self, examples, contexts):
        return [(-abs(len(c) - 2),) for c in contexts]


def test_supervised_then_ppo_steps_change_only_the_bridge(tiny_dir, tiny_index, tmp_path):
    """Stage 1 teaches the random bridge to write `1 2` (the silver sequence of a judge that wants
    two passages); stage 2 then samples selections that differ, so rewards differ within groups and
    PPO's gradient carries signal (no weight decay here: every change comes from a gradient)."""
    system = tiny_system(tiny_dir, tiny_index)
    supervised = BGMSupervised(k=3, silver=str(tmp_path / "silver.jsonl"), max_len=2, max_new_tokens=3)
    supervised.judge = lambda system: PairJudge()
    supervised.prepare(system, QA)
    assert all(len(supervised.store.get(e).silver) == 2 for e in QA)
    logged = steps(system, supervised, 30, lr=0.05)
    assert np.mean([m["loss"] for m in logged[-5:]]) < np.mean([m["loss"] for m in logged[:3]]) / 2
    def checksum(prediction, answers):  # any metric callable; this one tells any two answers apart
        return zlib.crc32(prediction.encode()) % 1000 / 1000

    objective = BGMPPO(k=3, samples=4, epochs=2, temperature=2.0, max_new_tokens=3, metrics=(checksum,))
    objective.prepare(system, QA)  # the stage-1 bridge becomes the frozen reference
    assert system.reference is not None and not any(p.requires_grad for p in system.reference.parameters())
    reference = {name: p.clone() for name, p in system.reference.named_parameters()}
    before = snapshot(system)
    logged = steps(system, objective, 4, lr=1e-3)
    assert any(m["informative"] > 0 and m["passages"] > 0 for m in logged[:-1])
    assert {"reward", "passages", "kl", "clip_fraction", "ratio", "informative"} <= logged[0].keys()
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-4) and logged[0]["ratio"] == pytest.approx(1.0)
    assert any(m["kl"] > 0 for m in logged[1:])  # the policy has left the reference
    moved = changed(system, before)
    assert moved and all(name.startswith("bridge.") for name in moved)  # neither the LLM nor the reference
    assert all(torch.equal(p, reference[name]) for name, p in system.reference.named_parameters())
    assert system.bridge.training  # the policy ran without dropout, then got its mode back


def test_inference_passes_the_chosen_passages_to_the_llm(tiny_dir, tiny_index):
    system = tiny_system(tiny_dir, tiny_index)
    result = bridge_answers(system, QA, k=3, max_new_tokens=3, batch_size=3)
    assert len(result.answers) == len(QA) and all(0 <= len(c) <= system.bridge.max_passages for c in result.chosen)
    judge = Judge(system.generator, SHORT, max_new_tokens=3)
    assert result.answers == judge.answers(QA, result.chosen)
    predictions, metrics = score_bridged(QA, result)
    assert metrics["examples"] == 4 and metrics["passages"] == pytest.approx(np.mean([len(c) for c in result.chosen]), abs=0.01)
    assert [p["passages"] for p in predictions] == [[p.id for p in c] for c in result.chosen]
    plain = bridge_answers(system, QA, k=3, max_new_tokens=3, batch_size=3, top=2)  # no bridge: the top 2
    assert [[p.id for p in c] for c in plain.chosen] == [[p.id for p in c[:2]] for c in system.candidates(QA, 3)]
    assert plain.answers == judge.answers(QA, plain.chosen)


# --- through the command line -----------------------------------------------------------------------


def bgm_argv(files, index_dir, tiny_dir, out, method, steps, *sets) -> list[str]:
    """`jointrag train` of a BGM method on the tiny models: the causal LM as bridge and as LLM."""
    return train_argv(files, index_dir, tiny_dir, out, method, steps, f"bgm.bridge={tiny_dir / 'causal'}",
                      "bgm.max_new_tokens=6", "bgm.answer_tokens=3", "bgm.max_len=2", "train.lr_bridge=0.01", *sets)


def only_the_bridge(out: Path, lora: bool = False) -> dict:
    weights = weights_of(out)
    assert weights and all(name.startswith("bridge.") for name in weights)
    assert all("lora_" in name for name in weights) == lora
    return weights


@pytest.fixture(scope="module")
def sl_run(files, index_dir, tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bgm-sl") / "run"
    assert main(bgm_argv(files, index_dir, tiny_dir, out, "bgm-sl", 2, f"bgm.silver={out.parent / 'silver.jsonl'}")) == 0
    return out


def test_supervised_stage_through_the_cli(sl_run):
    lines = assert_complete_run(sl_run, 2)
    assert all(0 <= r["silver_passages"] <= 2 and "lr_bridge" in r and "lr_generator" not in r for r in lines)
    assert all("passages" in r for r in map(json.loads, (sl_run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval")
    only_the_bridge(sl_run)
    silver = [json.loads(line) for line in (sl_run.parent / "silver.jsonl").read_text().splitlines()]
    assert silver[0]["jointrag"] == "bgm-silver" and silver[0]["metrics"] == ["em", "f1"]
    assert {r["id"] for r in silver[1:]} == {q["id"] for q in QA_ROWS}  # 2 steps x batch 2 visit all four


def test_ppo_stage_starts_from_the_stage_1_bridge(files, index_dir, tiny_dir, tmp_path, sl_run):
    out = tmp_path / "ppo"
    assert main(bgm_argv(files, index_dir, tiny_dir, out, "bgm-ppo", 2, f"bgm.reference={sl_run / 'checkpoint'}")) == 0
    lines = assert_complete_run(out, 2)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4) and lines[0]["ratio"] == pytest.approx(1.0)  # policy = reference
    assert all({"reward", "passages", "informative", "clip_fraction"} <= r.keys() for r in lines)
    assert only_the_bridge(out).keys() == weights_of(sl_run).keys()


def test_ppo_resumes_on_the_same_trajectory_with_the_stage_1_reference(files, index_dir, tiny_dir, tmp_path, monkeypatch):
    """2 steps, then `--resume --steps 4`, equals 4 steps straight: the rollout buffer, the sampling RNG
    and the reference (the stage-1 bridge, not the resumed policy: beta is large) come back. Stage 1
    teaches the bridge to write `1 2` (PairJudge), and a checksum stands in for EM, so that sampled
    selections differ and so do their rewards: the clipped surrogate carries signal."""
    monkeypatch.setattr(BGMSupervised, "judge", lambda self, system: PairJudge())
    template = tmp_path / "short.yaml"
    template.write_text(yaml.safe_dump({"template": SHORT.template, "passage_template": SHORT.passage_template}))
    sl = tmp_path / "sl"
    assert main(bgm_argv(files, index_dir, tiny_dir, sl, "bgm-sl", 20, "train.lr_bridge=0.05")) == 0
    monkeypatch.setitem(METRICS, "em", lambda prediction, answers: zlib.crc32(prediction.encode()) % 1000 / 1000)
    sets = (f"bgm.reference={sl / 'checkpoint'}", "train.schedule=constant", "bgm.beta=1.0", "bgm.epochs=3",
            "bgm.metrics=em", "bgm.temperature=2.0", "train.lr_bridge=0.001", f"model.template={template}")
    resumed = assert_resumes_on_the_same_trajectory(
        tmp_path, lambda out, steps: bgm_argv(files, index_dir, tiny_dir, out, "bgm-ppo", steps, *sets),
        saved=lambda state: state["objective"]["buffer"],
    )
    lines = train_lines(resumed)
    assert any(r["informative"] > 0 and r["passages"] > 0 for r in lines) and all(r["kl"] > 0 for r in lines[1:])


@pytest.mark.parametrize("setting, names", [
    ("bgm.samples=1", ("bgm.samples", "at least 2")),
    ("bgm.beta=-0.1", ("bgm.beta", "at least 0")),
    ("bgm.clip=0", ("bgm.clip", "positive")),
    ("bgm.metrics=em,bleu9", ("bgm.metrics", "rouge_l")),
    ("bgm.metrics=", ("bgm.metrics",)),
    ("bgm.repeat=maybe", ("bgm.repeat",)),
    ("bgm.steps=3", ("bgm.steps", "samples")),
    ("model.train_passage_tower=true", ("model.train_passage_tower", "frozen")),
    ("model.lora=true", ("model.lora", "bgm.lora")),
    ("bgm.reference=nowhere", ("bgm.reference", "nowhere")),
])
def test_bad_bgm_settings_name_the_key(capsys, files, index_dir, tiny_dir, tmp_path, setting, names):
    assert_user_error(capsys, *bgm_argv(files, index_dir, tiny_dir, tmp_path / "run", "bgm-ppo", 1, setting), names=names)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_config_metrics_are_the_judges_metrics():
    from jointrag.methods.bgm_bridge import METRICS
    from jointrag.config import LISTS

    assert LISTS["bgm.metrics"] == tuple(METRICS)


def test_a_bridge_template_file(capsys, files, index_dir, tiny_dir, tmp_path):
    from jointrag.config import load_config
    from jointrag.methods.bgm_bridge import bridge_system

    good = tmp_path / "bridge.yaml"
    good.write_text("template: 'Q: {question} C: {passages} Ids:'\npassage_words: 3\nempty: '0'\n")
    config = load_config(None, [f"bgm.bridge_template={good}", f"bgm.bridge={tiny_dir / 'causal'}", f"model.index={index_dir}",
                                f"model.generator={tiny_dir / 'causal'}", "train.precision=fp32"])
    template = bridge_system(config).bridge.template
    assert template == BridgeTemplate("Q: {question} C: {passages} Ids:", passage_words=3, empty="0")
    for text, names in (("template: '{query}'\n", ("field 'template'", "{question}")), ("passage_words: many\n", ("passage_words", "int")),
                        ("ids: 3\n", ("passage_template",))):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        argv = bgm_argv(files, index_dir, tiny_dir, tmp_path / "run", "bgm-sl", 1, f"bgm.bridge_template={bad}")
        assert_user_error(capsys, *argv, names=(str(bad), *names))


@pytest.fixture(scope="module")
def pipeline_run(files, index_dir, tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bgm") / "run"
    argv = bgm_argv(files, index_dir, tiny_dir, out, "bgm", 2, f"data.test={files['qa']}", "bgm.lora=true", "bgm.lora_r=2")
    assert main(argv) == 0
    return out


def test_pipeline_trains_both_stages_and_writes_the_table(pipeline_run):
    out = pipeline_run
    for stage in ("sl", "ppo"):
        assert torch.load(out / stage / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2
        only_the_bridge(out / stage, lora=True)
    ppo = yaml.safe_load((out / "ppo" / "checkpoint" / "config.yaml").read_text())
    assert ppo["method"]["name"] == "bgm-ppo" and ppo["bgm"]["reference"] == str(out / "sl" / "checkpoint")
    assert ppo["bgm"]["silver"] == str(out / "silver.jsonl") and (out / "silver.jsonl").is_file()
    table = out / "comparison"
    rows = json.loads((table / "table.json").read_text())
    assert list(rows) == ["top-1 passage", "top-3 passages", "SL bridge", "SL + PPO bridge"]
    assert all(set(m) == {"examples", "em", "f1", "rouge_l", "passages"} and m["examples"] == len(QA_ROWS) for m in rows.values())
    assert rows["top-1 passage"]["passages"] == 1 and rows["top-3 passages"]["passages"] == 3
    assert (table / "table.md").read_text().count("\n") == 6 and (table / "table.png").stat().st_size > 0
    predictions = [json.loads(line) for line in (table / "SL_PPObridge.jsonl").read_text().splitlines()]
    assert len(predictions) == len(QA_ROWS) and all(isinstance(p["passages"], list) for p in predictions)


def test_pipeline_resume_skips_finished_stages_and_refuses_a_rerun(capsys, pipeline_run, files, index_dir, tiny_dir):
    assert_user_error(capsys, *bgm_argv(files, index_dir, tiny_dir, pipeline_run, "bgm", 2, f"data.test={files['qa']}"),
                      names=("--resume",))
    rows = resume_finished_pipeline(pipeline_run)
    assert rows == json.loads((pipeline_run / "comparison" / "table.json").read_text())  # the same models evaluated again


def test_eval_and_ask_with_a_bgm_checkpoint(capsys, pipeline_run, files, tmp_path):
    checkpoint = pipeline_run / "ppo" / "checkpoint"
    code, out, err = run(capsys, "eval", "--checkpoint", checkpoint, "--data", files["qa"], "-k", "3", "--max-new-tokens", "3",
                         "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["decode"] == "bridge" and metrics["examples"] == len(QA_ROWS) and 0 <= metrics["passages"] <= 3
    table = json.loads((pipeline_run / "comparison" / "table.json").read_text())["SL + PPO bridge"]
    assert {key: metrics[key] for key in table} == table  # the same bridge, candidates and LLM as the table
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(QA_ROWS) and all(len(p["passages"]) <= 3 for p in predictions)
    assert_user_error(capsys, "eval", "--checkpoint", checkpoint, "--data", files["qa"], "--decode", "ensemble",
                      "--out", tmp_path / "eval", names=("--decode", "BGM"))

    code, out, err = run(capsys, "ask", "--checkpoint", checkpoint, "-k", "3", "--max-new-tokens", "3",
                         "What is the capital of France?", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert isinstance(result["answer"], str) and set(result["chosen"]) <= {p["id"] for p in result["passages"]}
    assert [p["used"] for p in result["passages"]] == [p["id"] in result["chosen"] for p in result["passages"]]
    code, out, err = run(capsys, "ask", "--checkpoint", checkpoint, "-k", "3", "--max-new-tokens", "3", "Who won Super Bowl 50?")
    assert code == 0, err
    assert "The bridge chose" in out
