"""Turn a `RunConfig` into the objects of a run: the system, the objective, the data.

This is the one place where configuration becomes plain constructor arguments.
"""

from __future__ import annotations

from ..config import MethodConfig, RunConfig
from ..data import corpus_examples, embedded_examples, load_examples
from ..errors import UserError
from ..objectives import Objective, build_objective
from ..system import RAGSystem
from ..types import Example


def objective_from(config: RunConfig) -> Objective:
    return objective_for(config.method)


def objective_for(m: MethodConfig) -> Objective:
    return build_objective(
        m.name, k=m.k, tau=m.tau, reduce=m.reduce, beta=m.beta, estimator=m.estimator,
        candidates=m.candidates, proposals=m.proposals, cache=m.cache, states=m.states, lm_k=m.lm_k,
        lm_tau=m.lm_tau, lsr_form=m.lsr_form, lm_scores=m.lm_scores,
    )


def system_from(config: RunConfig, needs_posterior: bool) -> RAGSystem:
    """Load the index (with its retriever), the generator and, if needed, the posterior tower."""
    from ..cli import load_template, resolve_index
    from ..generator import load_generator

    model = config.model
    index = resolve_index(model.index, model.retriever)
    if index.retriever is None:
        raise UserError(f"{index.directory}: training needs a dense index, not '{index.kind}'")
    generator = load_generator(model.generator, chat=model.chat, precision=config.train.precision)
    generator.max_prompt_tokens = model.max_prompt_tokens
    if model.lora:
        from peft import LoraConfig, get_peft_model

        targets = model.lora_targets if model.lora_targets == "all-linear" else [t.strip() for t in model.lora_targets.split(",")]
        generator.model = get_peft_model(
            generator.model,
            LoraConfig(r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout, target_modules=targets),
        )
    system = RAGSystem(
        index.retriever, generator, index, load_template(model.template),
        posterior_template=model.posterior_template, train_passage_tower=model.train_passage_tower,
    )
    if needs_posterior:
        system.add_posterior()
    return system


def set_trainable(system: RAGSystem, trains: frozenset, *, passage_tower: bool, lora: bool) -> None:
    """Freeze everything, then unfreeze what the method trains (LoRA: the adapter only)."""
    system.requires_grad_(False)
    if "query" in trains:
        system.retriever.query_encoder.requires_grad_(True)
    if "posterior" in trains and system.posterior is not None:
        system.posterior.requires_grad_(True)
    if passage_tower:
        system.retriever.passage_encoder.requires_grad_(True)
    if "generator" in trains:
        for name, parameter in system.generator.named_parameters():
            parameter.requires_grad_(not lora or "lora_" in name)


def examples_from(config: RunConfig, corpus=None) -> tuple[list[Example], list[Example]]:
    """Training and dev examples: the given files, or the embedded train and dev splits; with
    `method.corpus_ratio`, corpus-derived examples from `corpus` make up that share of the training mix."""
    data, method = config.data, config.method
    train = load_examples(data.train, data.format) if data.train else embedded_examples("train")
    dev = load_examples(data.dev, data.format) if data.dev else embedded_examples("dev")
    if not train:
        raise UserError(f"{data.train or 'the embedded train split'}: no training examples")
    if method.corpus_ratio:
        count = round(len(train) * method.corpus_ratio / (1 - method.corpus_ratio))
        train = train + corpus_examples(corpus, count, method.corpus_words, config.train.seed)
    if config.eval.limit:
        dev = dev[: config.eval.limit]
    return train, dev
