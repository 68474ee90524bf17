"""Invar-RAG's one LLM (Liu et al. 2024, arXiv 2411.07021; methods.md §6) and its varied views.

One decoder-only LM carries two LoRA adapters: `retrieval` makes it a bi-encoder (query and passage
towers tied: one `Encoder` over the LM's transformer body, last-token pooling of an appended
end-of-sequence token, instruction prefixes in the retriever's templates), `generation` makes it the
generator. Both adapters sit in the same layers of the same base weights, so one base model in memory
serves both: the generator runs with `generation` active, and the retriever's `AdapterView` switches
the layers to `retrieval` for the duration of each of its forward passes.

The varied views of the invariance loss: a rewritten query (a given rewrite, else the query with a
share of its words dropped) and a resized context window (a random window of the passage's words, or
the passage grown by the next passage of the same title).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..generation.generator import load_template
from ..io import read_tensors
from ..retrieval.encoders import BiEncoder, Encoder
from ..retrieval.index import RetrievalIndex, build_index
from ..retrieval.resolve import resolve_index
from ..system import RAGSystem, load_weights
from .systems import generator_from

RETRIEVAL, GENERATION = "retrieval", "generation"


@contextmanager
def active_adapter(model: nn.Module, name: str):
    """Run the LoRA layers of `model` with adapter `name` only, then restore theirs.

    peft's own `set_adapter` also sets which adapter weights require gradients; the trainer owns that,
    so only the layers' active adapter is switched here.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, active in zip(layers, saved):
            layer._active_adapter = active


class AdapterView(nn.Module):
    """`module` (a part of a peft model) run with LoRA adapter `adapter` active."""

    def __init__(self, module: nn.Module, adapter: str):
        super().__init__()
        self.module = module
        self.adapter = adapter

    @property
    def config(self):
        return self.module.config

    def forward(self, *args, **kwargs):
        with active_adapter(self.module, self.adapter):
            return self.module(*args, **kwargs)


def with_adapters(model: nn.Module, names: Sequence[str], *, r: int, alpha: int, targets: str, seed: int) -> nn.Module:
    """`model` (a causal LM) under one fresh LoRA adapter per name, the last one active.

    The adapters start from `seed` whatever the global random state, so a rebuilt model is the same
    model (an index built with its fresh retrieval adapter stays valid for it).
    """
    from peft import LoraConfig, get_peft_model

    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft.add_adapter(name, config)
    peft.set_adapter(names[-1])
    return peft


def body(peft_model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a peft-wrapped causal LM: what an LLM retriever pools."""
    return peft_model.get_base_model().base_model


def drop_words(text: str, share: float, rng: random.Random) -> str:
    """`text` with each word dropped with probability `share`; at least one word is kept."""
    words = text.split()
    kept = [w for w in words if rng.random() >= share]
    if words and not kept:
        kept = [rng.choice(words)]
    return " ".join(kept)


def window(text: str, share: float, rng: random.Random) -> str:
    """A random contiguous window of at least `share` of the words of `text`."""
    words = text.split()
    if not words:
        return text
    size = rng.randint(max(1, round(share * len(words))), len(words))
    start = rng.randint(0, len(words) - size)
    return " ".join(words[start : start + size])


def invar_system(config: Any, objective: Any = None) -> RAGSystem:
    """One LLM (`model.generator`) under the retrieval and generation adapters, as a RAGSystem whose
    retriever (tied towers) runs the first and whose generator runs the second, over the LLM index
    `model.index` (built over the small encoder's corpus on first use). With `invar.adapter`, the
    retrieval adapter comes from that retrieval-stage checkpoint."""
    i, model = config.invar, config.model
    if objective is not None and "query" in objective.trains and not model.train_passage_tower:
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
        weights = read_tensors(directory / "weights.pt") if (directory / "weights.pt").is_file() else {}
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
