"""Invar-RAG end to end (methods.md §6): the system of one LLM under two adapters, both stages, and
their evaluation.

`jointrag train --method invar-rag` runs
- the retrieval stage (`invar-retrieval`) in RUN/retrieval: the retrieval adapter learns the three
  losses of `objectives/invar.py`; the LLM index of the base retriever is RUN/index-base (built on
  first use, or `model.index`), and the stage ends by re-encoding the corpus into RUN/retrieval/index;
- the generation stage (`invar-generation`) in RUN/generation: the retrieval adapter frozen, the
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

import torch

from ..config import RunConfig, load_config
from ..errors import UserError
from ..index import RetrievalIndex, build_index
from ..invar import GENERATION, RETRIEVAL, AdapterView, body, with_adapters
from ..retriever import BiEncoder, Encoder
from ..system import RAGSystem
from .build import generator_from, load_weights, system_from
from .loop import CHECKPOINT, evaluate_system, load_trained
from .pipeline import run_stage, save_combined, save_predictions, stage_config, start, test_split, write_table

ROWS = ("MiniLM (small encoder)", "LLM retriever, base", "after retrieval stage", "after generation stage")


def invar_system_from(config: RunConfig) -> RAGSystem:
    """One LLM (`model.generator`) under the retrieval and generation adapters, as a RAGSystem whose
    retriever (tied towers) runs the first and whose generator runs the second, over the LLM index
    `model.index` (built over the small encoder's corpus on first use). With `invar.adapter`, the
    retrieval adapter comes from that retrieval-stage checkpoint."""
    from ..cli import load_template, resolve_index

    i, model = config.invar, config.model
    if config.method.name == "invar-retrieval" and not model.train_passage_tower:
        raise UserError("invar-retrieval: the LLM retriever's towers are one model; set model.train_passage_tower=true "
                        "so the index is re-encoded with the trained adapter")
    if model.lora:
        raise UserError("invar: the generator trains its own LoRA adapter (invar.lora_*); set model.lora=false")
    if model.index is None:
        raise UserError("invar: set model.index, the LLM retriever's index directory (built on first use)")
    generator = generator_from(config)
    generator.model = with_adapters(generator.model, (RETRIEVAL, GENERATION), r=i.lora_r, alpha=i.lora_alpha,
                                    targets=i.lora_targets, seed=config.train.seed)
    generator.adapter = GENERATION
    encoder = Encoder(AdapterView(body(generator.model), RETRIEVAL), generator.tokenizer, name=generator.name,
                      pooling=i.pooling, normalize=True, max_length=i.max_length, append_eos=i.pooling == "last",
                      adapter=RETRIEVAL)
    retriever = BiEncoder(encoder, encoder, query_template=i.query_template, passage_template=i.passage_template)
    system = RAGSystem(retriever, generator, None, load_template(model.template), train_passage_tower=model.train_passage_tower)
    if i.adapter:
        directory = Path(i.adapter)
        weights = torch.load(directory / "weights.pt", weights_only=True) if (directory / "weights.pt").is_file() else {}
        adapter = {name: w for name, w in weights.items() if f".{RETRIEVAL}." in name}
        if not adapter:
            raise UserError(f"invar.adapter: {directory} is not an Invar-RAG retrieval-stage checkpoint (RUN/retrieval/checkpoint)")
        load_weights(system, adapter, directory)
    directory = Path(model.index)
    if (directory / "manifest.json").is_file():
        system.index = RetrievalIndex.open(directory, retriever)
    else:
        corpus = resolve_index(i.teacher).corpus
        passages = (p for batch in corpus.iter_batches(4096) for p in batch)
        system.index = build_index(passages, directory, retriever=retriever, kind="exact", precision=config.train.precision,
                                   source=str(corpus.directory))
    return system


def stages(config: RunConfig) -> tuple[RunConfig, RunConfig]:
    out = Path(config.out)
    retrieval = stage_config(config, "invar-retrieval", "retrieval")
    retrieval.model.index = config.model.index or str(out / "index-base")
    retrieval.model.train_passage_tower = True
    generation = stage_config(config, "invar-generation", "generation")
    generation.model.index = str(out / "retrieval" / "index")
    generation.model.train_passage_tower = False
    generation.invar.adapter = str(out / "retrieval" / CHECKPOINT)
    return retrieval, generation


def run_invar(config: RunConfig, resume: bool = False) -> dict:
    """Train both stages, save both adapters, and return the test rows {row: metrics}."""
    out = start(config, resume, ["retrieval", "generation"])
    retrieval, generation = stages(config)
    test = test_split(config)
    table = out / "table" / config.eval.decode
    rows = {}

    def evaluate(row: str, system) -> None:
        system.requires_grad_(False)
        predictions, rows[row] = evaluate_system(system.eval(), config, test)
        save_predictions(table, row, predictions)

    small = copy.deepcopy(config)
    small.model.index = config.invar.teacher
    evaluate(ROWS[0], system_from(small, needs_posterior=False))
    evaluate(ROWS[1], invar_system_from(retrieval))  # builds the base LLM index on first use
    retrieval_checkpoint = run_stage(retrieval, resume)
    evaluate(ROWS[2], invar_system_from(generation))  # the trained retrieval adapter, the base generator
    generation_checkpoint = run_stage(generation, resume)
    combined = load_config(str(generation_checkpoint / "config.yaml"))
    combined.invar.adapter = str(out / CHECKPOINT)  # its retrieval adapter: the one in the combined checkpoint
    save_combined(out, [retrieval_checkpoint, generation_checkpoint], generation_checkpoint, combined)
    evaluate(ROWS[3], load_trained(out / CHECKPOINT)[1])
    write_table(table, f"Invar-RAG (test split, {config.eval.decode})", rows,
                ("em", "f1", "gold_recall@1", f"gold_recall@{config.eval.k}"))
    return rows
