"""Data types that cross module boundaries.

Shape legend used across the package: B batch, K candidates per example, T target tokens,
D embedding size, N corpus size, M proposals.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of the corpus."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Example:
    """A QA example: a question, its reference answers, and the ids of its gold passages if known.

    A dialog example (see `jointrag.data.dialog`) also carries `history`: the (speaker, text) turns before
    the response, speaker "user" or "agent"; its `question` is the retrieval query built from them.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    gold_ids: tuple[str, ...] = field(default=())
    history: tuple[tuple[str, str], ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())  # passage ids never to retrieve (a corpus-derived example's source)


@dataclass
class ObjectiveOutput:
    """What an objective returns: the loss to minimise and scalar metrics to log (floats)."""

    loss: "torch.Tensor"  # noqa: F821 (a 0-dim tensor; torch is not imported by this module)
    metrics: dict = field(default_factory=dict)
