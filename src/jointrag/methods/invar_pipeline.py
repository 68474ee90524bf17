"""Invar-RAG end to end (methods.md §6): the system of one LLM under two adapters, both stages, and
their evaluation.

`jointrag train --method invar-rag` runs
- the retrieval stage (the registry's first stage) in RUN/retrieval: the retrieval adapter learns the three
  losses of `methods/invar.py`; the LLM index of the base retriever is RUN/index-base (built on
  first use, or `model.index`), and the stage ends by re-encoding the corpus into RUN/retrieval/index;
- the generation stage (the second) in RUN/generation: the retrieval adapter frozen, the
  generation adapter learns RA-DIT's LM-ft loss over the passages the trained LLM retriever finds;
then saves both adapters as RUN/checkpoint (usable by `jointrag eval/ask --checkpoint`) and
evaluates on the test split, with `eval.decode`: the small encoder (MiniLM) with the base generator,
the base LLM retriever, the LLM retriever after the retrieval stage (both with the base generator),
and after the generation stage. The table goes to RUN/table/DECODER/table.{json,md,png}, beside each
row's predictions. A finished stage is not trained again (`--resume`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ._base import CHECKPOINT, Stages, frozen, stage_config
from .invar_adapters import invar_system
from .systems import rag_system

ROWS = ("MiniLM (small encoder)", "LLM retriever, base", "after retrieval stage", "after generation stage")
OUTPUTS = "index-base/, retrieval/, generation/, checkpoint (both adapters) and table/{decode}/"


def stage_configs(config: Any, methods: tuple[str, str]) -> tuple[Any, Any]:
    out = Path(config.out)
    retrieval = stage_config(config, methods[0], "retrieval")
    retrieval.model.index = config.model.index or str(out / "index-base")
    retrieval.model.train_passage_tower = True
    generation = stage_config(config, methods[1], "generation")
    generation.model.index = str(out / "retrieval" / "index")
    generation.model.train_passage_tower = False
    generation.invar.adapter = str(out / "retrieval" / CHECKPOINT)
    return retrieval, generation


def run(config: Any, stages: Stages, methods: tuple[str, str]) -> dict:
    """Train both stages (`methods`: the retrieval and the generation stage), save both adapters, and
    return the test rows {row: metrics}."""
    retrieval, generation = stage_configs(config, methods)
    small = copy.deepcopy(config)
    small.model.index = config.invar.teacher
    rows = {ROWS[0]: stages.evaluate(frozen(rag_system(small))),
            ROWS[1]: stages.evaluate(frozen(invar_system(retrieval)))}  # builds the base LLM index on first use
    retrieval_checkpoint = stages.train(retrieval)
    rows[ROWS[2]] = stages.evaluate(frozen(invar_system(generation)))  # the trained retrieval adapter, the base generator
    generation_checkpoint = stages.train(generation)
    combined = copy.deepcopy(generation)
    combined.invar.adapter = str(stages.out / CHECKPOINT)  # its retrieval adapter: the one in the combined checkpoint
    rows[ROWS[3]] = stages.evaluate(stages.load(stages.combine([retrieval_checkpoint, generation_checkpoint],
                                                                generation_checkpoint, combined)))
    return stages.write_table(stages.out / "table" / config.eval.decode, f"Invar-RAG (test split, {config.eval.decode})", rows,
                              ("em", "f1", "gold_recall@1", f"gold_recall@{config.eval.k}"))
