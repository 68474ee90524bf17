"""Turn a `RunConfig` into the objects of a run: the objective, the system, the data.

The method's registry entry (`methods.METHODS`) says how its objective reads its options and which
system it trains; this module looks the entry up once and adds what every run shares.
"""

from __future__ import annotations

import sys

from torch import nn

from .. import distributed
from ..config import EMBEDDED, RunConfig
from ..data.qa import corpus_examples, embedded_examples, load_examples
from ..errors import UserError
from ..methods import METHODS, Method, Objective, method
from ..types import Example


def entry(config: RunConfig) -> Method:
    return method(config.method.name)


def objective_from(config: RunConfig) -> Objective:
    return entry(config).build(config)


def system_for(config: RunConfig, objective: Objective | None = None) -> nn.Module:
    """The system the run's method trains (or that its checkpoints hold, without `objective`)."""
    return entry(config).system(config, objective)


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


def checkpoint_activations(system: nn.Module) -> None:
    """Activation checkpointing of the generator's layers (transformers' non-reentrant kind)."""
    model = system.generator.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"train.checkpointing: the generator {system.generator.name} does not support activation checkpointing")
    model.activation_checkpointing_enable({"use_reentrant": False})




def check_held_out(config: RunConfig, split: str) -> None:
    """Refuse evaluating a run trained on the user's questions on the embedded SQuAD `split` unless asked:
    its scores would say nothing about the user's data."""
    data = config.data
    if data.train and getattr(data, split) is None:
        raise UserError(f"data.{split} is not set while data.train is {data.train}: the {split} evaluation would use the "
                        f"embedded SQuAD {split} questions, not yours. Set data.{split}=FILE (held-out questions of your "
                        f"data), or data.{split}={EMBEDDED} to evaluate on the embedded split on purpose")


def held_out(config: RunConfig, split: str) -> list[Example]:
    """The `split` ("dev" or "test") examples: data.<split>, or the embedded split when it says
    `embedded` or when training uses the embedded questions too (`check_held_out`)."""
    check_held_out(config, split)
    path = getattr(config.data, split)
    return embedded_examples(split) if path in (None, EMBEDDED) else load_examples(path, config.data.format)


def examples_from(config: RunConfig, corpus=None) -> tuple[list[Example], list[Example]]:
    """Training and dev examples: the given files, or the embedded train and dev splits; with
    `method.corpus_ratio` (only for a method that excludes an example's source passage from its
    candidates, `Method.corpus_examples`), corpus-derived examples from `corpus` make up that share of
    the training mix. Example ids must be unique: per-example state (JSA's chain cache, precomputed
    scores) is keyed by them."""
    data, method = config.data, config.method
    where = data.train or "the embedded train split"
    loaded = load_examples(data.train, data.format) if data.train else embedded_examples("train")
    train = answerable(loaded, where)
    dev = held_out(config, "dev")
    if not train:
        raise UserError(f"{where}: no training examples" + (" with an answer: every one is unanswerable" if loaded else ""))
    unique_ids(train, where)
    if method.corpus_ratio:
        if not entry(config).corpus_examples:
            raise UserError(f"method.corpus_ratio: '{method.name}' would retrieve the passage a corpus-derived example's "
                            f"answer is cut from; only {', '.join(m.name for m in corpus_mixing())} mix them in")
        count = round(len(train) * method.corpus_ratio / (1 - method.corpus_ratio))
        train = train + corpus_examples(corpus, count, method.corpus_words, config.train.seed)
    if config.eval.limit:
        dev = dev[: config.eval.limit]
    return train, dev


def answerable(examples: list[Example], where: str) -> list[Example]:
    """The examples with an answer to train on. An unanswerable one (no answers, see `data.qa`) has no
    target sequence, so it is skipped, and a note on stderr says how many were; evaluation keeps them
    (it scores abstaining)."""
    kept = [example for example in examples if example.answers]
    skipped = len(examples) - len(kept)
    if skipped and distributed.is_main():
        print(f"jointrag: {where}: skipped {skipped} of {len(examples)} examples, which are unanswerable: training needs "
              "an answer", file=sys.stderr)
    return kept


def corpus_mixing() -> list[Method]:
    return [m for m in METHODS.values() if m.corpus_examples]


def unique_ids(examples: list[Example], where: str) -> None:
    """Refuse a training set whose example ids repeat, naming the first repeated id."""
    seen = set()
    for example in examples:
        if example.id in seen:
            raise UserError(f"{where}: example id '{example.id}' appears more than once; ids must be unique "
                            "(per-example training state is keyed by them)")
        seen.add(example.id)
