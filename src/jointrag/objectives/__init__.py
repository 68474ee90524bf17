"""Training objectives: one method per file, looked up once by name in `OBJECTIVES`.

An objective is a small callable `objective(system, batch) -> ObjectiveOutput` that owns no model.
It declares what it needs (`needs_posterior`; BGM's `needs_reference`) and which parts it trains
(`trains`, a subset of {"query", "posterior", "generator"}, or {"bridge"} for BGM, whose system is a
`bgm.BridgeSystem`; the passage tower is a run option, not a method's choice).
`prepare` runs once before training on the examples the run will visit (RA-DIT's R-ft computes the
frozen LM's scores there). An objective whose examples do not each put K prompts through the model
says what they do put through in `footprint(system) -> (sequences, tokens or None)`, for the memory
check. Invar-RAG's retrieval stage (`invar.InvarRetrieval`, whose options live in
the config's `invar` section) is built by `train.build.objective_for`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..system import RAGSystem
from ..types import Example, ObjectiveOutput
from .bgm import BGMPPO, BGMSupervised
from .invar import InvarRetrieval
from .jsa import JSA
from .rag import RagSequence, RagToken
from .radit import LSR, LMFinetune
from .vrag import VRAG


class Objective(Protocol):
    needs_posterior: bool
    trains: frozenset[str]

    def prepare(self, system: RAGSystem, examples: Sequence[Example]) -> None: ...

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


OBJECTIVES = {"rag-sequence": RagSequence, "rag-token": RagToken, "vrag": VRAG, "jsa": JSA,
              "ra-dit-lm": LMFinetune, "ra-dit-lsr": LSR,
              "invar-retrieval": InvarRetrieval, "invar-generation": LMFinetune, "bgm-sl": BGMSupervised, "bgm-ppo": BGMPPO}


def build_objective(name: str, *, k: int, tau: float, reduce: str, beta: float, estimator: str, candidates: str,
                    proposals: int, cache: bool, states: str, lm_k: int, lm_tau: float, lsr_form: str,
                    lm_scores: str | None, silver: str | None, metrics: tuple[str, ...], tie_break: bool, max_len: int,
                    repeat: bool, answer_tokens: int, samples: int, clip: float, kl_beta: float, epochs: int,
                    temperature: float) -> Objective:
    """The objective called `name`, given only the options it reads."""
    if name in ("rag-sequence", "rag-token"):
        return OBJECTIVES[name](k=k, tau=tau, reduce=reduce)
    if name == "vrag":
        return VRAG(k=k, tau=tau, reduce=reduce, beta=beta, estimator=estimator, candidates=candidates, samples=proposals)
    if name in ("ra-dit-lm", "invar-generation"):
        return LMFinetune(k=lm_k, reduce=reduce)
    if name == "ra-dit-lsr":
        return LSR(k=k, tau=tau, lm_tau=lm_tau, form=lsr_form, reduce=reduce, scores=lm_scores)
    if name == "jsa":
        return JSA(k=k, tau=tau, reduce=reduce, proposals=proposals, cache=cache, states=states)
    if name == "bgm-sl":
        return BGMSupervised(k=k, silver=silver, metrics=metrics, tie_break=tie_break, max_len=max_len, repeat=repeat,
                             max_new_tokens=answer_tokens)
    if name == "bgm-ppo":
        return BGMPPO(k=k, samples=samples, clip=clip, beta=kl_beta, epochs=epochs, temperature=temperature,
                      metrics=metrics, max_new_tokens=answer_tokens)
    raise ValueError(f"no objective called {name!r}")
