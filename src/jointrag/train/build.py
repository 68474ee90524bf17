"""Turn a `RunConfig` into the objects of a run: the system, the objective, the data.

This is the one place where configuration becomes plain constructor arguments.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..bgm import BRIDGE_PLACEHOLDERS, BridgeSystem, BridgeTemplate, load_bridge
from ..config import BgmConfig, InvarConfig, MethodConfig, RunConfig, names
from ..data import corpus_examples, embedded_examples, load_examples
from ..errors import UserError
from ..generator import Generator, load_generator, with_lora
from ..objectives import Objective, build_objective
from ..objectives.invar import InvarRetrieval
from ..system import RAGSystem
from ..types import Example


def objective_from(config: RunConfig) -> Objective:
    return objective_for(config.method, config.bgm, config.invar)


def objective_for(m: MethodConfig, b: BgmConfig | None = None, i: InvarConfig | None = None) -> Objective:
    b, i = b or BgmConfig(), i or InvarConfig()
    if m.name == "invar-retrieval":
        return InvarRetrieval(teacher=i.teacher, negatives=i.negatives, tau=i.tau, teacher_tau=i.teacher_tau,
                              w_contrastive=i.w_contrastive, w_align=i.w_align, w_invariance=i.w_invariance,
                              word_drop=i.word_drop, rewrites=i.rewrites, window=i.window)
    return build_objective(
        m.name, k=m.k, tau=m.tau, reduce=m.reduce, beta=m.beta, estimator=m.estimator,
        candidates=m.candidates, proposals=m.proposals, cache=m.cache, states=m.states, lm_k=m.lm_k,
        lm_tau=m.lm_tau, lsr_form=m.lsr_form, lm_scores=m.lm_scores, silver=b.silver, metrics=tuple(names(b.metrics)),
        tie_break=b.tie_break, max_len=b.max_len, repeat=b.repeat, answer_tokens=b.answer_tokens, samples=b.samples,
        clip=b.clip, kl_beta=b.beta, epochs=b.epochs, temperature=b.temperature,
    )


def system_for(config: RunConfig, objective: Objective) -> nn.Module:
    """The system `objective` trains: a `BridgeSystem` for BGM, else a `RAGSystem`."""
    if "bridge" in objective.trains:
        return bridge_system_from(config, reference=objective.needs_reference)
    if config.method.name.startswith("invar-"):
        from .invar import invar_system_from

        return invar_system_from(config)
    return system_from(config, objective.needs_posterior)


def generator_from(config: RunConfig) -> Generator:
    generator = load_generator(config.model.generator, chat=config.model.chat, precision=config.train.precision)
    generator.max_prompt_tokens = config.model.max_prompt_tokens
    return generator


def system_from(config: RunConfig, needs_posterior: bool) -> RAGSystem:
    """Load the index (with its retriever), the generator and, if needed, the posterior tower."""
    from ..cli import load_template, resolve_index

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
    if needs_posterior:
        system.add_posterior()
    return system


def bridge_system_from(config: RunConfig, reference: bool) -> BridgeSystem:
    """BGM: the index and the LLM, both frozen, and the bridge. With `reference` (PPO), the bridge
    starts from the stage-1 checkpoint `bgm.reference` (unset: the base bridge) and a frozen copy of
    it becomes the reference policy of the KL term, so a resumed run has the same reference."""
    from ..cli import load_fields, load_template, resolve_index

    model, b = config.model, config.bgm
    if model.train_passage_tower or model.lora:
        raise UserError("bgm: the retriever and the LLM stay frozen (methods.md §5); set model.train_passage_tower=false "
                        "and model.lora=false (bgm.lora puts the LoRA adapter on the bridge)")
    template = load_fields(b.bridge_template, BridgeTemplate, BRIDGE_PLACEHOLDERS) if b.bridge_template else BridgeTemplate()
    bridge = load_bridge(b.bridge, template=template, lora=b.lora, lora_r=b.lora_r, lora_alpha=b.lora_alpha,
                         lora_targets=b.lora_targets, precision=config.train.precision, max_new_tokens=b.max_new_tokens,
                         max_passages=b.max_passages)
    system = BridgeSystem(bridge, generator_from(config), resolve_index(model.index, model.retriever),
                          load_template(model.template))
    if reference:
        if b.reference:
            directory = Path(b.reference)
            weights = torch.load(directory / "weights.pt", weights_only=True) if (directory / "weights.pt").is_file() else {}
            if not weights or not all(name.startswith("bridge.") for name in weights):
                raise UserError(f"bgm.reference: {directory} is not a BGM checkpoint (RUN/sl/checkpoint)")
            load_weights(system, weights, directory)
        system.freeze_reference()
    return system


def load_weights(system: nn.Module, weights: dict, where: Path) -> None:
    missing = set(weights) - {name for name, _ in system.named_parameters()}
    if missing:
        raise UserError(f"{where}: weights for parameters this model does not have: {sorted(missing)[:3]}")
    system.load_state_dict(weights, strict=False)


def unfreeze(module: nn.Module) -> None:
    """Make `module` trainable: all its weights, or under LoRA its adapter's only (`module.adapter`, the
    adapter it runs, when its model carries several)."""
    adapter = getattr(module, "adapter", None)
    lora = any("lora_" in name for name, _ in module.named_parameters())
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(not lora or ("lora_" in name and (adapter is None or f".{adapter}." in name)))


def set_trainable(system: nn.Module, trains: frozenset, *, passage_tower: bool) -> None:
    """Freeze everything, then unfreeze what the method trains."""
    system.requires_grad_(False)
    if "query" in trains:
        unfreeze(system.retriever.query_encoder)
    if "posterior" in trains and system.posterior is not None:
        unfreeze(system.posterior)
    if passage_tower:
        unfreeze(system.retriever.passage_encoder)
    for part in ("generator", "bridge"):
        if part in trains:
            unfreeze(getattr(system, part))


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
