"""Training objectives: one method per file, looked up once by name in `OBJECTIVES`.

An objective is a small callable `objective(system, batch) -> ObjectiveOutput` that owns no model.
It declares what it needs (`needs_posterior`) and which parts it trains (`trains`, a subset of
{"query", "posterior", "generator"}; the passage tower is a run option, not a method's choice).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..system import RAGSystem
from ..types import Example, ObjectiveOutput
from .jsa import JSA
from .rag import RagSequence, RagToken
from .vrag import VRAG


class Objective(Protocol):
    needs_posterior: bool
    trains: frozenset[str]

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


OBJECTIVES = {"rag-sequence": RagSequence, "rag-token": RagToken, "vrag": VRAG, "jsa": JSA}


def build_objective(name: str, *, k: int, tau: float, reduce: str, beta: float, estimator: str,
                    candidates: str, proposals: int, cache: bool, states: str) -> Objective:
    """The objective called `name`, given only the options it reads."""
    if name in ("rag-sequence", "rag-token"):
        return OBJECTIVES[name](k=k, tau=tau, reduce=reduce)
    if name == "vrag":
        return VRAG(k=k, tau=tau, reduce=reduce, beta=beta, estimator=estimator, candidates=candidates, samples=proposals)
    return JSA(k=k, tau=tau, reduce=reduce, proposals=proposals, cache=cache, states=states)
