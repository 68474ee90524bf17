"""What every method shares: the `Objective` protocol and its default hooks (`Stateless`), the
`Method` entry of the registry, and the `Stages` a multi-stage method is lent by the training layer.

A method reads the run's configuration only in its registry entry (`Method.options`, `Method.system`)
and in its pipeline; components receive plain arguments. The configuration is duck-typed here: this
layer sits below `config.py`, which reads the registry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from torch import nn

from ..types import Example, ObjectiveOutput

CHECKPOINT = "checkpoint"  # a run's checkpoint directory, RUN/checkpoint


class Objective(Protocol):
    """`objective(system, batch) -> ObjectiveOutput`; owns no model.

    `needs_posterior` (and BGM's `needs_reference`) say what the system must hold, `trains` which
    parts learn: a subset of {"query", "posterior", "generator"}, or {"bridge"}; the passage tower is
    a run option, not a method's choice. `prepare` runs once before training on the examples the run
    will visit. An objective whose examples do not each put K prompts through the model says what they
    do in `footprint(system) -> (sequences, tokens or None)`, for the memory check.
    """

    needs_posterior: bool
    trains: frozenset[str]

    def prepare(self, system: nn.Module, examples: Sequence[Example]) -> None: ...

    def __call__(self, system: nn.Module, batch: Sequence[Example]) -> ObjectiveOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stateless:
    """The hooks of `Objective` for a method that needs no preparation and keeps no state."""

    def prepare(self, system, examples) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Stages(Protocol):
    """What the training layer lends a multi-stage method's pipeline (`train.pipeline.Stages`).

    `out` is the run directory; `train` trains a stage's config (in its own `out`) unless it already
    reached its steps, and returns its checkpoint; `combine` writes RUN/checkpoint from the trained
    weights of several checkpoints; `load` gives a checkpoint's system, frozen and in eval mode;
    `evaluate` answers the run's test split with the run's evaluation settings; `write_table` saves each
    row's predictions and the table of their metrics, and returns {row: metrics}.
    """

    out: Path

    def train(self, stage: Any) -> Path: ...

    def combine(self, checkpoints: Sequence[Path], index_from: Path, config: Any) -> Path: ...

    def load(self, checkpoint: Path) -> nn.Module: ...

    def test(self) -> list[Example]: ...

    def evaluate(self, system: nn.Module) -> tuple[list[dict], dict]: ...

    def write_table(self, directory: Path, title: str, rows: dict[str, tuple[list[dict], dict]], plotted: Sequence[str]) -> dict: ...


def stage_config(config: Any, method: str, directory: str) -> Any:
    """A copy of the pipeline's config that trains `method` in RUN/`directory`."""
    stage = copy.deepcopy(config)
    stage.method.name, stage.out = method, str(Path(config.out) / directory)
    return stage


def frozen(system: nn.Module) -> nn.Module:
    """`system` without gradients, in eval mode."""
    system.requires_grad_(False)
    return system.eval()


@dataclass(frozen=True)
class Method:
    """A method: everything the framework needs of it, looked up once by name in `METHODS`.

    - `objective` and `options`: the Objective class and its constructor arguments from the run's
      config (`options(config) -> dict`); a pipeline has neither;
    - `system(config, objective or None)`: the system it trains, or that its checkpoints hold;
    - `distributed`: trains under torchrun; `fsdp(config)`: every rank runs the sharded generator
      equally often, so FSDP can shard it;
    - `pipeline(config, stages) -> {row: metrics}`: a multi-stage method; `outputs` names what it writes;
    - `variance`: its rows in `jointrag variance`, (label, {dotted config key: value});
    - `corpus_examples`: `method.corpus_ratio` may mix corpus-derived examples into its training data
      (their source passage is excluded from retrieval, which only such a method honours);
    - `separate_retriever`: its retriever does not run on its generator, so a checkpoint's retrieval
      loads without the generator (`eval --retrieval-only`); Invar-RAG's runs on the LLM's body.
    """

    name: str
    help: str
    objective: type | None = None
    options: Callable[[Any], dict] | None = None
    system: Callable[[Any, Any], nn.Module] | None = None
    distributed: bool = False
    fsdp: Callable[[Any], bool] = lambda config: False
    pipeline: Callable[[Any, Stages], dict] | None = None
    outputs: str = ""
    variance: tuple[tuple[str, dict], ...] = ()
    corpus_examples: bool = False
    separate_retriever: bool = True

    def build(self, config: Any) -> Objective:
        """The objective, given only the options it reads."""
        if self.objective is None:
            raise ValueError(f"{self.name} is a pipeline of stages, not one objective")
        return self.objective(**self.options(config))
