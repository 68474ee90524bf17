"""Typed, layered, strict training configuration: defaults -> YAML recipe -> `--set key=value` flags.

Every field has a help text. Unknown keys and ill-typed values are errors that name the file, the
line and the field. The choices of `method.name` are the method registry's (`methods.METHODS`).
Components never receive these objects: a method's registry entry and `train.build` turn them into
plain constructor arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .io import names
from .methods import DEFAULT_METHOD, METHODS


def _field(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    index: str | None = _field(None, "index directory (default: the embedded SQuAD index, built on first use)")
    retriever: str | None = _field(None, "query-tower checkpoint (default: the encoder named in the index manifest)")
    generator: str | None = _field(None, "hub id, directory or .gguf file (default: SmolLM2-135M-Instruct)")
    chat: bool = _field(False, "wrap prompts in the generator's chat template")
    template: str | None = _field(None, "YAML prompt template file (default: the two-shot QA prompt)")
    max_prompt_tokens: int = _field(512, "prompts are cut to their last N tokens")
    lora: bool = _field(False, "train a LoRA adapter on the generator instead of all its weights")
    lora_r: int = _field(8, "LoRA rank (JSA-RAG paper: 8)")
    lora_alpha: int = _field(16, "LoRA scaling numerator")
    lora_dropout: float = _field(0.0, "LoRA dropout")
    lora_targets: str = _field("all-linear", "peft target_modules: 'all-linear' or comma-separated module names")
    posterior_template: str = _field("{question} [SEP] {answer}", "text the posterior query tower reads, x [SEP] y")
    train_passage_tower: bool = _field(False, "also train the passage tower; turns on scheduled re-indexing")
    refresh: str = _field("0-:500", "re-index schedule when the passage tower trains: 'start-end:every,...'")
    staleness_probe: int = _field(64, "dev questions used to measure index staleness at each refresh")


@dataclass
class MethodConfig:
    name: str = _field(DEFAULT_METHOD, "the method, one of: " + "; ".join(f"{m.name} ({m.help})" for m in METHODS.values()))
    k: int = _field(5, "candidates retrieved per example (prior top-K; VRAG/JSA also take the posterior's top-K; RA-DIT R-ft: paper 10; "
                       "BGM: the passages the bridge chooses from in training)")
    tau: float = _field(0.1, "retrieval temperature: p(z|x) = softmax(s(x,z)/tau) (JSA-RAG reference: 0.1, normalised embeddings; RA-DIT's gamma)")
    reduce: str = _field("sum", "log p(y|x,z) as the 'sum' of token log-probs or their 'mean' (JSA-RAG reference code)")
    beta: float = _field(1.0, "VRAG: weight of KL(q || p)")
    estimator: str = _field("enumerate", "VRAG: 'enumerate' (exact q-weighted sum) or 'sample' (REINFORCE with a baseline)")
    candidates: str = _field("union", "VRAG: renormalise over the 'union' of prior and posterior top-K, or the 'posterior' top-K")
    proposals: int = _field(50, "JSA: proposals M drawn from q per step (reference: 50); VRAG sample: samples per example")
    cache: bool = _field(True, "JSA: keep each example's last chain state between visits (textbook JSA)")
    states: str = _field("all", "JSA: pseudo-labels from 'all' chain states weighted by frequency (reference), or the 'last'")
    lm_k: int = _field(3, "RA-DIT LM-ft: retrieved passages k', one training example each (paper: 3)")
    lm_tau: float = _field(1.0, "RA-DIT R-ft: LM temperature in p_LSR = softmax(log p_LM(y|z,x) / lm_tau); 1 makes p_LSR the LM "
                                "likelihood normalised over the candidates. The paper's 0.01 belongs to its probability form (lsr_form=prob)")
    lsr_form: str = _field("log", "RA-DIT R-ft: softmax of the LM's 'log'-likelihood, or of its 'prob'ability (the paper's formula)")
    lm_scores: str | None = _field(None, "RA-DIT R-ft: file of the frozen LM's scores, computed before training for the examples "
                                         "the run visits and reused by later runs (the paper precomputes); unset: scored online each step")
    corpus_ratio: float = _field(0.0, "RA-DIT R-ft: share of corpus-derived examples (x = a passage's first words, y = its last) in the training mix")
    corpus_words: int = _field(32, "RA-DIT R-ft: words in x and in y of a corpus-derived example")


@dataclass
class TrainConfig:
    steps: int = _field(100, "optimiser steps")
    batch_size: int = _field(4, "examples per micro-batch")
    grad_accum: int = _field(1, "micro-batches per optimiser step")
    lr_generator: float = _field(2e-5, "generator learning rate (JSA-RAG paper: 2e-5)")
    lr_retriever: float = _field(1e-5, "query-tower (and passage-tower) learning rate (JSA-RAG paper: 1e-5)")
    lr_bridge: float = _field(5e-5, "BGM bridge learning rate, in both stages")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_steps: int = _field(0, "linear warm-up steps")
    schedule: str = _field("linear", "learning-rate schedule after warm-up: linear, cosine or constant")
    max_grad_norm: float = _field(1.0, "gradient clipping norm; 0 turns clipping off")
    precision: str = _field("auto", "auto (bf16 where the device runs it fast), bf16 or fp32")
    checkpointing: bool = _field(False, "activation checkpointing of a trained generator: backward keeps each layer's input "
                                        "and recomputes the rest (a third more generator compute, a small part of the memory)")
    seed: int = _field(0, "seed for data order, sampling and initialisation")
    log_every: int = _field(1, "steps between training-metric log lines")
    eval_every: int = _field(0, "steps between dev evaluations; 0: only at the end")
    save_every: int = _field(0, "steps between checkpoints; 0: only at the end")
    fsdp: bool = _field(False, "under torchrun: shard the generator's parameters, gradients and optimiser state over the ranks "
                               "(FSDP) instead of replicating them (DDP); for generators that do not fit one device")
    dist_timeout: int = _field(3600, "under torchrun: seconds a rank waits for the others (rank 0 evaluates and rebuilds "
                                     "the index alone) before the run fails")


EMBEDDED = "embedded"  # data.dev / data.test: the embedded split, said on purpose


@dataclass
class DataConfig:
    train: str | None = _field(None, "training QA file (default: the embedded train split)")
    dev: str | None = _field(None, "dev QA file, or 'embedded' (default: the embedded dev split when data.train is unset; "
                                   "required when it is set)")
    test: str | None = _field(None, "test QA file of a two-stage method's final table (RA-DIT ablation), or 'embedded' "
                                    "(default: the embedded test split when data.train is unset; required when it is set)")
    format: str | None = _field(None, "squad, jsonl, dpr or nq-open (default: from the file name)")


@dataclass
class EvalConfig:
    limit: int = _field(100, "dev questions evaluated during training; 0: all")
    test_limit: int = _field(0, "test questions in a two-stage method's final table; 0: all")
    k: int = _field(5, "passages retrieved for retrieval metrics and decoding")
    decode: str = _field("top1", "top1 (greedy on the top passage), rag-sequence-fast, rag-sequence-thorough, rag-token, "
                                 "or ensemble (RA-DIT: a greedy answer per passage, the best p_R-weighted mixture wins)")
    max_new_tokens: int = _field(16, "answer length limit")
    num_beams: int = _field(1, "beam size; 1 is greedy")
    batch_size: int = _field(16, "questions per generation batch")


@dataclass
class BgmConfig:
    """BGM (methods.md §5): the bridge model, its silver sequences (stage 1) and PPO (stage 2)."""

    bridge: str | None = _field(None, "bridge model: hub id, directory or .gguf file, causal or seq2seq "
                                      "(default: SmolLM2-135M-Instruct, the default generator; paper: T5-XXL)")
    bridge_template: str | None = _field(None, "YAML file of the bridge's input and output: template ({question}, {passages}), "
                                               "passage_template ({index}, {title}, {text}), separator, passage_words, "
                                               "output_separator, empty (default: '{question} [1] title: text [2] ...' -> '2 1' or 'none')")
    max_passages: int = _field(10, "ids of a bridge output passed to the LLM at most; the rest are dropped")
    max_new_tokens: int = _field(24, "bridge output length limit in tokens")
    lora: bool = _field(False, "train a LoRA adapter on the bridge instead of all its weights")
    lora_r: int = _field(8, "bridge LoRA rank")
    lora_alpha: int = _field(16, "bridge LoRA scaling numerator")
    lora_targets: str = _field("all-linear", "bridge peft target_modules: 'all-linear' or comma-separated module names")
    silver: str | None = _field(None, "file of silver passage sequences, computed once for the examples a run visits and reused "
                                      "by later runs (unset: kept in memory; the bgm pipeline: RUN/silver.jsonl)")
    metrics: str = _field("em,f1", "comma-separated scores of the LLM's answer (em, f1, rouge_l, bleu1, bleu4): silver search "
                                   "compares them in order, the PPO reward is their mean")
    tie_break: bool = _field(True, "silver search: ties go to the higher log-likelihood of the reference answer")
    max_len: int = _field(5, "silver search: passages in a silver sequence at most")
    repeat: bool = _field(False, "silver search: a passage may appear more than once")
    answer_tokens: int = _field(16, "LLM answer length limit when judging silver sequences and PPO rewards")
    samples: int = _field(4, "PPO: id sequences sampled per example (G >= 2: each one's baseline is the mean reward of the others)")
    clip: float = _field(0.2, "PPO: clipping range of the probability ratio (Schulman et al. 2017: 0.2)")
    beta: float = _field(0.05, "PPO: weight of KL(policy || stage-1 policy)")
    epochs: int = _field(2, "PPO: updates per rollout (a rollout is reused in this many consecutive steps)")
    temperature: float = _field(1.0, "PPO: sampling temperature")
    reference: str | None = _field(None, "PPO: a stage-1 checkpoint; the bridge starts from it and the KL term holds it fixed "
                                         "(unset: the base bridge; the bgm pipeline sets RUN/sl/checkpoint)")


@dataclass
class InvarConfig:
    """Invar-RAG (methods.md §6): the LLM retriever (a LoRA adapter on the generator's base model), its
    three losses (retrieval stage), and the generation adapter (generation stage)."""

    pooling: str = _field("mean", "LLM retriever pooling: 'mean' of the token states, or 'last' (the state of an end-of-sequence token appended to "
                                  "the text, as RepLLaMA; it needs long training: the base SmolLM2-135M retrieved nothing with it)")
    query_template: str = _field("query: {question}", "text the LLM retriever reads for a query (instruction prefix)")
    passage_template: str = _field("passage: {title}. {text}", "text the LLM retriever reads for a passage (instruction prefix)")
    max_length: int = _field(256, "LLM retriever: tokens read per text at most")
    lora_r: int = _field(8, "rank of both LoRA adapters (retrieval, generation)")
    lora_alpha: int = _field(16, "LoRA scaling numerator of both adapters")
    lora_targets: str = _field("all-linear", "peft target_modules of both adapters: 'all-linear' or comma-separated module names")
    teacher: str | None = _field(None, "index of the small encoder whose relevance the LLM retriever aligns to and whose top-k "
                                       "are the hard negatives (default: the embedded MiniLM index); same corpus as the run")
    negatives: int = _field(4, "hard negatives per query: the small encoder's top-ranked passages that are not positives")
    tau: float = _field(0.05, "LLM retriever temperature: p(z|x) = softmax(cos(x, z) / tau)")
    teacher_tau: float = _field(0.05, "small-encoder temperature of the alignment target (MiniLM scores are cosines)")
    w_contrastive: float = _field(1.0, "weight of the InfoNCE loss (positives against in-batch and hard negatives)")
    w_align: float = _field(1.0, "weight of KL(p_small || p_LLM) over each query's candidates")
    w_invariance: float = _field(1.0, "weight of KL(p_original || p_varied) over each query's candidates")
    word_drop: float = _field(0.15, "query rewriting: share of the query's words dropped at random in the varied view")
    rewrites: str | None = _field(None, "JSONL file of rewritten queries {\"id\", \"rewrite\"} used as the varied view "
                                        "where an example has one (e.g. written by an LLM); else words are dropped")
    window: float = _field(0.5, "context-window resizing: a varied passage keeps a random window of at least this share of its "
                                "words, or (half of the time) grows by the next passage of the same title; 1: windows are not resized")
    adapter: str | None = _field(None, "generation stage: the retrieval-stage checkpoint whose adapter is loaded and frozen "
                                       "(the invar-rag pipeline sets RUN/retrieval/checkpoint)")


@dataclass
class RunConfig:
    out: str = _field("runs/train", "run directory: checkpoints, metrics.jsonl, TensorBoard logs, plots")
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bgm: BgmConfig = field(default_factory=BgmConfig)
    invar: InvarConfig = field(default_factory=InvarConfig)


CHOICES = {
    "invar.pooling": ("last", "mean"),
    "method.lsr_form": ("log", "prob"),
    "method.reduce": ("sum", "mean"),
    "method.estimator": ("enumerate", "sample"),
    "method.candidates": ("union", "posterior"),
    "method.states": ("all", "last"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "data.format": ("squad", "jsonl", "dpr", "nq-open", None),
    "eval.decode": ("top1", "rag-sequence-fast", "rag-sequence-thorough", "rag-token", "ensemble"),
}
POSITIVE = {"method.k", "method.tau", "method.proposals", "train.steps", "train.batch_size", "train.grad_accum",
            "train.log_every", "eval.k", "eval.max_new_tokens", "eval.num_beams", "eval.batch_size",
            "model.max_prompt_tokens", "model.lora_r", "method.lm_k", "method.lm_tau", "method.corpus_words",
            "bgm.max_passages", "bgm.max_new_tokens", "bgm.lora_r", "bgm.max_len", "bgm.answer_tokens", "bgm.clip",
            "bgm.epochs", "bgm.temperature", "invar.max_length", "invar.lora_r", "invar.negatives", "invar.tau", "invar.teacher_tau",
            "invar.window", "model.lora_alpha", "bgm.lora_alpha", "invar.lora_alpha", "train.dist_timeout"}
AT_LEAST = {"bgm.samples": 2, "bgm.beta": 0, "invar.w_contrastive": 0, "invar.w_align": 0, "invar.w_invariance": 0,
            "method.beta": 0, "train.lr_generator": 0, "train.lr_retriever": 0, "train.lr_bridge": 0, "train.weight_decay": 0,
            "train.max_grad_norm": 0, "train.warmup_steps": 0, "train.seed": 0, "train.eval_every": 0, "train.save_every": 0,
            "eval.limit": 0, "eval.test_limit": 0, "model.staleness_probe": 0}
FRACTION = {"method.corpus_ratio", "invar.word_drop", "model.lora_dropout"}  # in [0, 1)
AT_MOST = {"invar.window": 1}  # and positive
LISTS = {"bgm.metrics": ("em", "f1", "rouge_l", "bleu1", "bleu4")}  # comma-separated, at least one


def _coerce(value, kind, where: str):
    """`value` as the field type `kind`, or a UserError naming `where`."""
    options = typing.get_args(kind)
    if type(None) in options:
        if value is None:
            return None
        kind = next(o for o in options if o is not type(None))
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _set(config, dotted: str, value, where: str) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    for i, part in enumerate(parents):
        target = getattr(target, part, None)
        if not dataclasses.is_dataclass(target):
            raise UserError(f"{where}: unknown section '{'.'.join(parents[: i + 1])}'")
    hints = typing.get_type_hints(type(target))
    if leaf not in hints or dataclasses.is_dataclass(getattr(target, leaf)):
        known = ", ".join(f.name for f in dataclasses.fields(target) if not dataclasses.is_dataclass(getattr(target, f.name)))
        raise UserError(f"{where}: unknown key '{dotted}' (known here: {known})")
    value = _coerce(value, hints[leaf], f"{where}: '{dotted}'")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: '{dotted}' must be a finite number, not {value!r}")
    if dotted == "method.name" and value not in METHODS:  # the registry as it is now (a test may add a method)
        raise UserError(f"{where}: 'method.name' must be one of {', '.join(METHODS)}, not {value!r}")
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise UserError(f"{where}: '{dotted}' must be one of {', '.join(c for c in CHOICES[dotted] if c)}, not {value!r}")
    if dotted in POSITIVE and value <= 0:
        raise UserError(f"{where}: '{dotted}' must be positive, not {value!r}")
    if dotted in AT_LEAST and value < AT_LEAST[dotted]:
        raise UserError(f"{where}: '{dotted}' must be at least {AT_LEAST[dotted]}, not {value!r}")
    if dotted in AT_MOST and value > AT_MOST[dotted]:
        raise UserError(f"{where}: '{dotted}' must be at most {AT_MOST[dotted]}, not {value!r}")
    if dotted in FRACTION and not 0 <= value < 1:
        raise UserError(f"{where}: '{dotted}' must be at least 0 and below 1, not {value!r}")
    if dotted in LISTS and not (value and set(names(value)) <= set(LISTS[dotted])):
        raise UserError(f"{where}: '{dotted}' must list some of {', '.join(LISTS[dotted])} (comma-separated), not {value!r}")
    setattr(target, leaf, value)


def _leaves(node, prefix: str = ""):
    """(dotted key, value, line) for every scalar in a composed YAML mapping; a key given twice in one
    mapping is an error (YAML would silently keep the last)."""
    if not isinstance(node, yaml.MappingNode):
        raise UserError(f"line {node.start_mark.line + 1}: expected a mapping of settings")
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        dotted, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if dotted in seen:
            raise UserError(f"line {line}: '{dotted}' is given twice (first at line {seen[dotted]})")
        seen[dotted] = line
        if isinstance(value_node, yaml.MappingNode):
            yield from _leaves(value_node, dotted + ".")
        else:
            yield dotted, _yaml_value(yaml.serialize(value_node), f"line {line}: '{dotted}'"), line


def _yaml_value(text: str, where: str):
    """A setting's value parsed by `yaml.safe_load` (plain data only: a `!!python/...` tag is refused)."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise UserError(f"{where}: not a plain YAML value: {' '.join(str(error).split())}") from None


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML recipe at `path`, then `key.sub=value` overrides (values parsed as YAML)."""
    config = RunConfig()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file not found: {file}")
        try:
            node = yaml.compose(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise UserError(f"{file}: not UTF-8 text (byte {error.start}: {error.reason})") from None
        except yaml.YAMLError as error:
            raise UserError(f"{file}: not valid YAML: {' '.join(str(error).split())}") from None
        if node is not None:
            try:
                for dotted, value, line in _leaves(node):
                    _set(config, dotted, value, f"{file}:{line}")
            except UserError as error:
                message = str(error)
                raise UserError(message if message.startswith(str(file)) else f"{file}: {message}") from None
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. train.steps=200")
        dotted, raw = item.split("=", 1)
        _set(config, dotted.strip(), _yaml_value(raw, f"--set {item}"), f"--set {item}")
    return config


# keyword shorthands of the Python API's `train(**settings)`, the CLI's `train --method/--data/--index/--steps`
SHORTHANDS = {"method": "method.name", "data": "data.train", "index": "model.index", "steps": "train.steps"}


def setting_key(keyword: str) -> str:
    """The dotted key a keyword setting names: a shorthand, or the key with `__` for each dot (`train__steps`)."""
    return SHORTHANDS.get(keyword, keyword.replace("__", "."))


def _flatten(mapping: typing.Mapping, prefix: str = ""):
    for key, value in mapping.items():
        if isinstance(value, typing.Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _plain(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def settings_config(config=None, settings: typing.Mapping[str, typing.Any] | None = None) -> RunConfig:
    """The config of the Python API's `train(config, **settings)`: `config` is None (the defaults), a
    YAML recipe's path, a mapping shaped like one (`{"method": {"name": "jsa"}}`, dotted keys allowed)
    or a `RunConfig` (copied); then each keyword setting (`setting_key`) in turn. Values are checked as
    the YAML recipe's are."""
    if isinstance(config, RunConfig):
        run = copy.deepcopy(config)
    elif config is None or isinstance(config, (str, os.PathLike)):
        run = load_config(None if config is None else os.fspath(config))
    elif isinstance(config, typing.Mapping):
        run = RunConfig()
        for dotted, value in _flatten(config):
            _set(run, dotted, _plain(value), "config")
    else:
        raise UserError(f"config: expected a YAML recipe's path, a mapping of settings or a RunConfig, got {type(config).__name__}")
    for keyword, value in (settings or {}).items():
        _set(run, setting_key(keyword), _plain(value), f"setting {keyword}")
    return run


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


# settings that may name a local file or directory (or a hub id, which is left as it is)
PATHS = ("out", "model.index", "model.retriever", "model.generator", "model.template", "method.lm_scores", "data.train",
         "data.dev", "data.test", "bgm.bridge", "bgm.bridge_template", "bgm.silver", "bgm.reference", "invar.teacher",
         "invar.rewrites", "invar.adapter")


def save_config(config: RunConfig, path: Path) -> None:
    """Write `config` as YAML, with every setting that names an existing file or directory made absolute:
    the saved run then loads from any working directory."""
    values = to_dict(config)
    for dotted in PATHS:
        *sections, leaf = dotted.split(".")
        holder = values
        for section in sections:
            holder = holder[section]
        if isinstance(holder[leaf], str) and Path(holder[leaf]).exists():
            holder[leaf] = str(Path(holder[leaf]).resolve())
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def describe() -> str:
    """Every key with its default and help, for `jointrag train --help-config`."""
    lines = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name} = {value!r}\n    {f.metadata.get('help', '')}")

    walk(RunConfig(), "")
    return "\n".join(lines)
