"""`train(config)`: one run of the shared loop, or a multi-stage method's pipeline of such runs."""

from __future__ import annotations

from .. import distributed
from ..config import RunConfig
from .build import check_held_out, entry
from .loop import Trainer
from .pipeline import Stages


def train(config: RunConfig, resume: bool = False) -> dict:
    """Train `config.method` and return its final metrics (a pipeline: its table {row: metrics}).
    Under torchrun, every rank runs this and returns rank 0's metrics."""
    pipeline = entry(config).pipeline
    check_held_out(config, "dev")  # before any model loads
    if pipeline is not None:
        check_held_out(config, "test")
    with distributed.process_group(config.train.dist_timeout):
        if pipeline is not None:
            return pipeline(config, Stages(config, resume))
        return Trainer(config).run(resume=resume)
