"""`train(config)`: one run of the shared loop, or a multi-stage method's pipeline of such runs."""

from __future__ import annotations

from .. import distributed
from ..config import RunConfig
from .build import entry
from .loop import Trainer
from .pipeline import Stages


def train(config: RunConfig, resume: bool = False) -> dict:
    """Train `config.method` and return its final metrics (a pipeline: its table {row: metrics}).
    Under torchrun, every rank runs this and returns rank 0's metrics."""
    with distributed.process_group(config.train.dist_timeout):
        pipeline = entry(config).pipeline
        if pipeline is not None:
            return pipeline(config, Stages(config, resume))
        return Trainer(config).run(resume=resume)
