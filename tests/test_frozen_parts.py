"""Frozen parts run in eval mode under `system.train()`: the training loop calls it before training and
after each evaluation, and a frozen model left in train mode adds dropout noise to what it scores
(RA-DIT's LSR targets, BGM's rewards and silver sequences). Parts that train stay in train mode, and
so does every module a training part shares (tied towers, a retriever tower over the generator's body).

The tiny BART generator has dropout 0.1, the tiny BERT towers 0.1: in train mode two scorings differ.
"""

from __future__ import annotations

import pytest
import torch

from conftest import PASSAGES
from jointrag.generation.generator import PromptTemplate, load_generator
from jointrag.methods.bgm import BGMPPO
from jointrag.methods.bgm_bridge import BridgeSystem, load_bridge
from jointrag.methods.radit import LSR
from jointrag.retrieval.encoders import BiEncoder, Encoder, load_retriever
from jointrag.system import RAGSystem
from jointrag.train.build import set_trainable
from jointrag.types import Example

SHORT = PromptTemplate("{passages}\nQ: {question}\nA:", "Title: {title}\n{text}")
EXAMPLE = Example("q1", "What is the capital of France?", ("Paris",))


@pytest.fixture(scope="module")
def tiny_index(tiny_dir, tmp_path_factory):
    from jointrag.retrieval.index import build_index

    retriever = load_retriever(str(tiny_dir / "encoder"))
    return build_index(PASSAGES, tmp_path_factory.mktemp("frozen") / "index", retriever=retriever, precision="fp32")


def in_train_mode(module) -> bool:
    return all(m.training for m in module.modules())


def in_eval_mode(module) -> bool:
    return not any(m.training for m in module.modules())


def rag_system(tiny_dir, tiny_index, retriever=None) -> RAGSystem:
    torch.manual_seed(0)
    generator = load_generator(str(tiny_dir / "seq2seq"), precision="fp32")
    assert generator.model.config.dropout > 0
    return RAGSystem(retriever or load_retriever(str(tiny_dir / "encoder")), generator, tiny_index, SHORT)


def pair_scores(system: RAGSystem) -> torch.Tensor:
    """log p(answer | passage, question) of one pair, per token (T,)."""
    rows = system.search([EXAMPLE.question], 1)
    with torch.no_grad():
        logp, mask = system.target_logprobs([EXAMPLE], rows, ["Paris"])
    return logp[mask]


def test_lsr_scores_with_the_frozen_generator_in_eval_mode(tiny_dir, tiny_index):
    system = rag_system(tiny_dir, tiny_index)
    set_trainable(system, LSR().trains, passage_tower=False)  # only the query tower trains
    assert system.train() is system
    assert in_eval_mode(system.generator)
    assert torch.equal(pair_scores(system), pair_scores(system))  # no dropout noise in the LSR targets
    assert in_train_mode(system.retriever.query_encoder)
    assert in_eval_mode(system.retriever.passage_encoder)  # frozen: only stored embeddings are used
    system.eval()
    assert not any(m.training for m in system.modules())
    system.train()
    assert in_train_mode(system.retriever.query_encoder) and in_eval_mode(system.generator)


def test_a_trained_generator_stays_wholly_in_train_mode(tiny_dir, tiny_index):
    system = rag_system(tiny_dir, tiny_index)
    set_trainable(system, frozenset({"generator"}), passage_tower=False)
    system.generator.model.model.encoder.requires_grad_(False)  # partially trainable: still a training part
    system.train()
    assert in_train_mode(system.generator)
    assert in_eval_mode(system.retriever.query_encoder) and in_eval_mode(system.retriever.passage_encoder)


def test_tied_towers_and_shared_modules_stay_in_train_mode(tiny_dir, tiny_index):
    # tied towers (Invar-RAG): the passage tower is the query tower, which trains
    tower = load_retriever(str(tiny_dir / "encoder")).query_encoder
    system = rag_system(tiny_dir, tiny_index, BiEncoder(tower, tower))
    set_trainable(system, frozenset({"query"}), passage_tower=False)
    system.train()
    assert in_train_mode(system.retriever.passage_encoder) and in_eval_mode(system.generator)

    # a frozen tower over the body of a generator that trains: the shared body trains, so stays in train mode
    system = rag_system(tiny_dir, tiny_index)
    body = system.generator.model.model.encoder
    shared = Encoder(body, system.generator.tokenizer, name="shared")
    system.retriever = BiEncoder(shared, load_retriever(str(tiny_dir / "encoder")).query_encoder)
    set_trainable(system, frozenset({"generator"}), passage_tower=False)
    body.requires_grad_(False)  # the tower itself has no trainable weight; the generator (decoder) has
    system.train()
    assert in_train_mode(system.generator) and in_train_mode(body)
    assert in_eval_mode(system.retriever.passage_encoder)


def test_bgm_judge_and_reference_run_in_eval_mode(tiny_dir, tiny_index):
    torch.manual_seed(0)
    bridge = load_bridge(str(tiny_dir / "causal"), precision="fp32", max_new_tokens=4)
    system = BridgeSystem(bridge, load_generator(str(tiny_dir / "seq2seq"), precision="fp32"), tiny_index, SHORT)
    objective = BGMPPO()
    objective.prepare(system, [EXAMPLE])  # freezes the reference
    set_trainable(system, objective.trains, passage_tower=False)
    system.train()
    assert in_eval_mode(system.generator) and in_eval_mode(system.reference)
    assert in_train_mode(system.bridge)
    prompt = SHORT.prompt(EXAMPLE, PASSAGES[:1])
    with torch.no_grad():
        first, second = (system.generator.pair_logprobs([prompt], ["Paris"])[0] for _ in range(2))
    assert torch.equal(first, second)  # the judge's tie-breaker (and its answers) are noise-free
    system.eval()
    assert not any(m.training for m in system.modules())
