"""The systems a run trains, built from its configuration (duck-typed: `config.model`, `config.train`).

`rag_system` is the system of every retriever + generator method; BGM's is `bgm_bridge.bridge_system`,
Invar-RAG's `invar_adapters.invar_system`. Each takes `(config, objective or None)`.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..generation.generator import Generator, load_generator, load_template, with_lora
from ..retrieval.resolve import resolve_index
from ..system import RAGSystem


def generator_from(config: Any) -> Generator:
    generator = load_generator(config.model.generator, chat=config.model.chat, precision=config.train.precision)
    generator.max_prompt_tokens = config.model.max_prompt_tokens
    return generator


def rag_system(config: Any, objective: Any = None) -> RAGSystem:
    """The index (with its retriever), the generator (under LoRA with `model.lora`) and, if the
    objective needs one, the posterior tower."""
    model = config.model
    index = resolve_index(model.index, model.retriever)
    if index.retriever is None:
        raise UserError(f"{index.directory}: training needs a dense index, not '{index.kind}'")
    generator = generator_from(config)
    if model.lora:
        generator.model = with_lora(generator.model, r=model.lora_r, alpha=model.lora_alpha, targets=model.lora_targets,
                                    dropout=model.lora_dropout)
    system = RAGSystem(
        index.retriever, generator, index, load_template(model.template),
        posterior_template=model.posterior_template, train_passage_tower=model.train_passage_tower,
    )
    if getattr(objective, "needs_posterior", False):
        system.add_posterior()
    return system
