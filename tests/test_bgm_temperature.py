"""BGM's PPO at a sampling temperature T != 1: the policy whose probabilities enter the ratio (and the
KL term) is the one that sampled, pi_T = softmax(logits / T) per token; and the `Generator` token
helpers the bridge uses are public.
"""

from __future__ import annotations

import ast
import zlib
from pathlib import Path

import pytest
import torch

from conftest import PASSAGES
from jointrag.generation.generator import Generator, PromptTemplate, load_generator
from jointrag.methods import bgm
from jointrag.methods.bgm import BGMPPO
from jointrag.methods.bgm_bridge import BridgeSystem, load_bridge
from jointrag.train.build import set_trainable
from jointrag.types import Example

QA = [
    Example("q1", "What is the capital of France?", ("Paris",)),
    Example("q2", "Who won Super Bowl 50?", ("Denver Broncos",)),
]
SHORT = PromptTemplate("{passages}\nQ: {question}\nA:", "Title: {title}\n{text}")


@pytest.fixture(scope="module")
def tiny_index(tiny_dir, tmp_path_factory):
    from jointrag.retrieval.encoders import load_retriever
    from jointrag.retrieval.index import build_index

    retriever = load_retriever(str(tiny_dir / "encoder"))
    return build_index(PASSAGES, tmp_path_factory.mktemp("temperature") / "index", retriever=retriever, precision="fp32")


def checksum(prediction, answers):  # a reward that tells any two answers apart
    return zlib.crc32(prediction.encode()) % 1000 / 1000


@torch.no_grad()
def tempered_logp(lm: Generator, text: str, action: list[int], temperature: float) -> float:
    """log prod_t softmax(logits_t / T)[a_t] of one action, from one unbatched, unpadded forward pass."""
    model = lm.model
    mode = model.training
    model.eval()
    prompt = lm.tokenizer(text)["input_ids"][-lm.max_prompt_tokens :]
    if lm.seq2seq:
        start = model.config.decoder_start_token_id
        logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + action[:-1]])).logits[0]
    else:
        logits = model(input_ids=torch.tensor([prompt + action])).logits[0, len(prompt) - 1 : -1]
    model.train(mode)
    assert logits.shape[0] == len(action)
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return float(logp[torch.arange(len(action)), torch.tensor(action)].sum())


@pytest.mark.parametrize("temperature, bridge_kind", [(0.5, "causal"), (2.0, "causal"), (2.0, "seq2seq")])
def test_ppo_ratio_and_kl_use_the_policy_that_sampled(tiny_dir, tiny_index, monkeypatch, temperature, bridge_kind):
    torch.manual_seed(0)
    bridge = load_bridge(str(tiny_dir / bridge_kind), precision="fp32", max_new_tokens=4)
    system = BridgeSystem(bridge, load_generator(str(tiny_dir / "causal"), precision="fp32"), tiny_index, SHORT)
    objective = BGMPPO(k=3, samples=3, epochs=2, temperature=temperature, max_new_tokens=3, metrics=(checksum,))
    objective.prepare(system, QA)
    set_trainable(system, objective.trains, passage_tower=False)
    system.train()
    seen = {}

    def spy(logp, old_logp, ref_logp, advantages, **options):
        seen.update(logp=logp.detach().clone(), old_logp=old_logp.clone(), ref_logp=ref_logp.clone())
        return ppo_loss(logp, old_logp, ref_logp, advantages, **options)

    ppo_loss = bgm.ppo_loss
    monkeypatch.setattr(bgm, "ppo_loss", spy)
    torch.manual_seed(1)
    output = objective(system, QA)  # the first epoch of this rollout: the policy is the sampling one
    rollout = objective.buffer[0]
    by_hand = [tempered_logp(system.bridge.lm, x, a, temperature) for x, a in zip(rollout.inputs, rollout.actions)]
    reference = [tempered_logp(system.reference.lm, x, a, temperature) for x, a in zip(rollout.inputs, rollout.actions)]
    assert len(by_hand) == len(QA) * 3
    assert seen["old_logp"].tolist() == pytest.approx(by_hand, abs=1e-4)  # the sampling-time log-probs
    assert seen["logp"].tolist() == pytest.approx(by_hand, abs=1e-4)  # the new ones, in the ratio's numerator
    assert seen["ref_logp"].tolist() == pytest.approx(reference, abs=1e-4)  # the KL's reference, at the same T
    assert torch.equal((seen["logp"] - seen["old_logp"]).exp(), torch.ones(len(by_hand)))  # ratio exactly 1
    assert output.metrics["ratio"] == 1.0 and output.metrics["clip_fraction"] == 0.0
    assert output.metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the bridge still


def test_generator_token_helpers_are_public():
    """`prompt_ids`, `target_ids` and `flat_logprobs` are `Generator`'s public interface; no module
    reaches for a private name of them."""
    for name in ("prompt_ids", "target_ids", "flat_logprobs"):
        assert callable(getattr(Generator, name)) and getattr(Generator, name).__doc__
        assert not hasattr(Generator, f"_{name}")
    root = Path(__file__).resolve().parents[1]
    private = {"_prompt_ids", "_target_ids", "_flat_logprobs"}
    for path in [*(root / "src").rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & private
        assert not used, f"{path} uses {used}"
