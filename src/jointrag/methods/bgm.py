"""BGM's two training stages (Ke et al., ACL 2024, arXiv 2401.06954; methods.md §5), as objectives
on a `bgm.BridgeSystem` (the bridge, the frozen LLM, PPO's frozen reference, the index). Both train
only the bridge (`trains = {"bridge"}`); the bridge model, the silver search and inference are in
`jointrag/bgm.py`.

- `BGMSupervised` (stage 1): -log p_bridge(silver ids | query, passages), teacher-forced, on the
  greedy silver passage sequences of the frozen LLM (`bgm.greedy_silver`, cached by `bgm.SilverStore`).
- `BGMPPO` (stage 2): PPO on the bridge. An action is a whole id sequence, sampled G times per
  example; the reward is the judge's score of the LLM's answer from the chosen passages; the
  baseline is the leave-one-out mean of the other G-1 rewards of the same example (RLOO); the loss
  is PPO's clipped ratio objective plus beta * KL(pi || pi_stage1) (k3 estimator), both policies at
  the sampling temperature (`BGMPPO`). Each rollout is reused for `epochs` consecutive calls, which
  is where the ratio moves away from 1 and clipping acts (`ppo_loss`).

Shapes: B examples, G sampled actions per example, N = B * G actions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from .bgm_bridge import BridgeSystem, Judge, Metric, SilverStore, metric_functions, metric_names, policy_mode
from ..types import Example, ObjectiveOutput
from ._base import Stateless


@dataclass
class BGMSupervised(Stateless):
    """Stage 1: -log p_bridge(silver ids | query, candidates), summed over tokens, mean over examples.

    The silver sequences come from `prepare` (once, for the examples the run will visit) or are
    computed on first sight; with `silver` a path, they are cached there and reused by later runs.
    The candidates are the ones stored with each silver sequence, so its ids always refer to them.
    """

    k: int = 5
    silver: str | None = None
    metrics: tuple[str | Metric, ...] = ("em", "f1")
    tie_break: bool = True
    max_len: int = 5
    repeat: bool = False
    max_new_tokens: int = 32
    batch_size: int = 8
    needs_posterior: bool = field(default=False, init=False)
    needs_reference: bool = field(default=False, init=False)
    trains: frozenset = field(default=frozenset({"bridge"}), init=False)
    store: SilverStore | None = field(default=None, init=False)

    def judge(self, system: BridgeSystem) -> Judge:
        metrics = metric_functions(self.metrics)
        return Judge(system.generator, system.template, metrics, self.tie_break, self.max_new_tokens)

    def _store(self, system: BridgeSystem) -> SilverStore:
        if self.store is None:
            header = {"k": self.k, "metrics": metric_names(self.metrics), "tie_break": self.tie_break,
                      "max_len": self.max_len, "repeat": self.repeat, "generator": system.generator.name}
            self.store = SilverStore(self.silver, header)
        return self.store

    def prepare(self, system: BridgeSystem, examples: Sequence[Example]) -> None:
        store = self._store(system)
        store.fill(examples, lambda batch: system.candidates(batch, self.k), self.judge(system).scores,
                   max_len=self.max_len, repeat=self.repeat, batch_size=self.batch_size)

    def __call__(self, system: BridgeSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        store = self._store(system)
        if any(e.id not in store for e in batch):
            self.prepare(system, batch)
        records = [store.get(e) for e in batch]
        where = self.silver or "silver sequences"
        candidates = [system.passages_by_id(r.candidates, f"{where}: example {e.id}") for e, r in zip(batch, records)]
        bridge = system.bridge
        targets = [bridge.template.output([r.candidates.index(i) for i in r.silver]) for r in records]
        logp = bridge.logprobs(bridge.inputs(batch, candidates), bridge.target_ids(targets))  # (B,)
        loss = -logp.mean()
        silver = float(np.mean([len(r.silver) for r in records]))
        return ObjectiveOutput(loss, {"loss": loss.item(), "silver_passages": silver})


# --- stage 2: PPO ------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j over the G actions of each example (B, G): the leave-one-out
    baseline of RLOO (Ahmadian et al. 2024), unbiased because it does not depend on action i."""
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError("a group baseline needs at least 2 actions per example")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (g - 1)


def ppo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, *, clip: float, beta: float
) -> tuple[torch.Tensor, dict]:
    """PPO's loss over N whole-sequence actions (N,): the clipped surrogate (Schulman et al. 2017,
    eq. 7) with ratio = pi(a) / pi_old(a), plus beta * KL(pi || pi_ref) by the k3 estimator
    exp(d) - d - 1, d = log pi_ref(a) - log pi(a) (non-negative, unbiased for a ~ pi; GRPO's form).

    loss = -mean(min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A)) + beta * mean(k3).
    Returns the loss and float statistics: the KL estimate, the clipped fraction, the mean ratio.
    """
    ratio = (logp - old_logp).exp()
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    log_ref_ratio = ref_logp - logp
    kl = log_ref_ratio.exp() - log_ref_ratio - 1
    loss = -surrogate.mean() + beta * kl.mean()
    stats = {"kl": kl.mean().item(), "clip_fraction": ((ratio - 1).abs() > clip).float().mean().item(),
             "ratio": ratio.mean().item()}
    return loss, stats


@dataclass
class Rollout:
    """One batch of sampled actions, kept for `epochs` updates: N inputs and actions (token ids)."""

    inputs: list[str]
    actions: list[list[int]]
    old_logp: list[float]
    ref_logp: list[float]
    advantages: list[float]
    uses: int = 0


@dataclass
class BGMPPO:
    """Stage 2: PPO on the bridge with the frozen LLM's score as the reward (methods.md §5).

    Each call samples `samples` actions (id sequences) per example from the current bridge at
    `temperature`, answers with the frozen LLM from the chosen passages, and rewards each answer
    with the mean of `metrics`; advantages use the leave-one-out group baseline (`informative`
    logs the share of examples whose G rewards differ: the others carry no signal). The loss is
    `ppo_loss` over this rollout and the ones of the previous `epochs - 1` calls (each rollout is
    used `epochs` times, its ratio measured against the policy that sampled it). The KL term is
    against `system.reference`, the stage-1 bridge (`needs_reference`: a training run builds it from
    the stage-1 checkpoint, so a resumed run holds the same one); `prepare` freezes a copy of the
    bridge there when the system has none.

    The policy is the tempered one, pi_T(a) = prod_t softmax(logits_t / T)[a_t] with T = `temperature`:
    the distribution the actions are sampled from. Every log-probability of the loss is of a tempered
    policy: the ratio pi_T(a) / pi_T,old(a) (the old one as it sampled the action, so the ratio is 1 at
    an action's first use), and the KL term KL(pi_T || pi_ref,T) compares the tempered bridge with the
    reference at the same temperature T (k3 estimate on the actions, which are drawn from pi_T). At
    T = 1 these are the plain policies.
    """

    k: int = 5
    samples: int = 4
    clip: float = 0.2
    beta: float = 0.05
    epochs: int = 2
    temperature: float = 1.0
    metrics: tuple[str | Metric, ...] = ("em", "f1")
    max_new_tokens: int = 32
    needs_posterior: bool = field(default=False, init=False)
    needs_reference: bool = field(default=True, init=False)
    trains: frozenset = field(default=frozenset({"bridge"}), init=False)
    buffer: list[Rollout] = field(default_factory=list, init=False)

    def prepare(self, system: BridgeSystem, examples: Sequence[Example]) -> None:
        if system.reference is None:
            system.freeze_reference()

    def rollout(self, system: BridgeSystem, batch: Sequence[Example]) -> tuple[Rollout, dict]:
        """Sample, answer and reward G actions per example (no gradient)."""
        bridge, g = system.bridge, self.samples
        candidates = system.candidates(batch, self.k)
        inputs = [x for x in bridge.inputs(batch, candidates) for _ in range(g)]  # (N,) input-major
        actions = bridge.sample(inputs[::g], g, self.temperature)  # (N,)
        repeated = [e for e in batch for _ in range(g)]
        chosen = bridge.select(bridge.text(actions), [c for c in candidates for _ in range(g)])
        metrics = metric_functions(self.metrics)
        judge = Judge(system.generator, system.template, metrics, max_new_tokens=self.max_new_tokens)
        rewards = torch.tensor(judge.rewards(repeated, chosen)).view(len(batch), g)  # (B, G)
        with torch.no_grad():
            ref_logp = system.reference.logprobs(inputs, actions, self.temperature).float().tolist()
        advantages = group_advantages(rewards).view(-1).tolist()
        stats = {"reward": rewards.mean().item(), "passages": float(np.mean([len(c) for c in chosen])),
                 "informative": (rewards.max(-1).values > rewards.min(-1).values).float().mean().item()}
        return Rollout(inputs, actions, [], ref_logp, advantages), stats

    def __call__(self, system: BridgeSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        if system.reference is None:
            raise ValueError("BGM PPO needs the stage-1 reference policy: call prepare first")
        with policy_mode(system.bridge, system.reference):
            fresh, stats = self.rollout(system, batch)
            self.buffer.append(fresh)
            inputs = [x for r in self.buffer for x in r.inputs]
            actions = [a for r in self.buffer for a in r.actions]
            logp = system.bridge.logprobs(inputs, actions, self.temperature).float()  # (N_buffer,) with gradient
        fresh.old_logp = logp[-len(fresh.actions) :].detach().tolist()  # the sampling policy is the current one

        def column(name: str) -> torch.Tensor:
            return torch.tensor([v for r in self.buffer for v in getattr(r, name)], device=logp.device)

        loss, ppo_stats = ppo_loss(logp, column("old_logp"), column("ref_logp"), column("advantages"),
                                   clip=self.clip, beta=self.beta)
        for r in self.buffer:
            r.uses += 1
        self.buffer = [r for r in self.buffer if r.uses < self.epochs]
        return ObjectiveOutput(loss, {"loss": loss.item(), **stats, **ppo_stats})

    def state_dict(self) -> dict:
        return {"buffer": [asdict(r) for r in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [Rollout(**r) for r in state.get("buffer", [])]
