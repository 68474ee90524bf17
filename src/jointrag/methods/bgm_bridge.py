"""BGM (Ke et al., ACL 2024, arXiv 2401.06954): a trainable bridge between a frozen retriever and a
frozen LLM (methods.md §5).

The bridge is any Hugging Face seq2seq or decoder-only LM (optionally a LoRA adapter). It reads the
query and the retrieved passages, each tagged with an id (`who wrote x? [1] p1 [2] p2 ...`), and
writes a sequence of ids (`2 1 2`): it may select, reorder and repeat passages, or write `none`.
The frozen LLM then answers from those passages, in that order. Retriever and LLM never change.

This module holds the model side; the two training stages are objectives (`objectives/bgm.py`):
- `Bridge`, `load_bridge`: the policy; `BridgeSystem`: the bridge with the frozen parts around it
  (the LLM, PPO's stage-1 reference, the index, the LLM's prompt), the system the objectives get.
- `Judge`: the frozen LLM answers from given passages; its answers are scored against the references.
- `greedy_silver`: silver passage sequences. From the empty sequence, repeatedly append the
  candidate that most improves the frozen LLM's score (EM, then F1, then log p(reference) as the
  tie-breaker, compared in that order); stop when nothing improves it. Batched over examples: one
  judge call per step for all of them. `SilverStore` caches the result per example id in a JSONL
  file, rewritten atomically after each batch, so an interrupted run resumes where it stopped.
- `bridge_answers`, `score_bridged`: inference, retrieve -> bridge (greedy or beam) -> LLM, and its
  EM, F1 and passages passed.

Shapes: B examples, K candidate passages, N actions (id sequences), L action tokens.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import metrics as qa
from ..errors import UserError
from ..io import read_cache, read_tensors, write_cache
from ..generation.generator import Generator, PromptTemplate, load_generator, load_template, with_lora
from ..io import load_fields
from ..retrieval.resolve import resolve_index
from ..system import eval_frozen, load_weights
from ..types import Example, Passage
from .systems import generator_from

Metric = Callable[[str, Sequence[str]], float]  # (prediction, reference answers) -> score in [0, 1]
Score = tuple[float, ...]  # compared lexicographically: metrics in order, then log p(reference)

METRICS: dict[str, Metric] = {
    "em": qa.exact_match,
    "f1": qa.token_f1,
    "rouge_l": qa.rouge_l,
    "bleu1": lambda prediction, answers: qa.corpus_bleu([prediction], [list(answers)], max_order=1),
    "bleu4": lambda prediction, answers: qa.corpus_bleu([prediction], [list(answers)], max_order=4),
}


def metric_functions(metrics: Sequence[str | Metric]) -> tuple[Metric, ...]:
    """The metrics named (keys of METRICS) or given as callables; an unknown name is a user error."""
    unknown = [m for m in metrics if isinstance(m, str) and m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"BGM metrics: unknown {unknown or 'none given'}; choose from {', '.join(METRICS)}")
    return tuple(METRICS[m] if isinstance(m, str) else m for m in metrics)


def metric_names(metrics: Sequence[str | Metric]) -> list[str]:
    return [m if isinstance(m, str) else getattr(m, "__name__", repr(m)) for m in metrics]


# --- the bridge -----------------------------------------------------------------------------------


# the placeholders each field of a bridge template file may use, with sample values to check it against
BRIDGE_PLACEHOLDERS = {"template": {"question": "question", "passages": "passages"},
                       "passage_template": {"index": 1, "title": "title", "text": "text"}}


@dataclass(frozen=True)
class BridgeTemplate:
    """How the bridge reads candidates and writes ids (methods.md §5: `[query] [1] p1 [2] p2 …`).

    `template` receives `{question}` and `{passages}`; each passage is `passage_template` with
    `{index}` (from 1), `{title}`, `{text}` (cut to its first `passage_words` words; 0 keeps all),
    joined by `separator`. The output is the 1-based ids joined by `output_separator`, or `empty`.
    """

    template: str = "{question} {passages}"
    passage_template: str = "[{index}] {title}: {text}"
    separator: str = " "
    passage_words: int = 100
    output_separator: str = " "
    empty: str = "none"

    def input(self, question: str, passages: Sequence[Passage]) -> str:
        def cut(text: str) -> str:
            return " ".join(text.split()[: self.passage_words]) if self.passage_words else text

        rendered = self.separator.join(
            self.passage_template.format(index=i + 1, title=p.title, text=cut(p.text)) for i, p in enumerate(passages)
        )
        return self.template.format(question=question, passages=rendered)

    def output(self, positions: Sequence[int]) -> str:
        """0-based candidate positions -> the text the bridge should write."""
        return self.output_separator.join(str(p + 1) for p in positions) if positions else self.empty

    @staticmethod
    def parse(text: object, count: int, limit: int) -> list[int]:
        """0-based positions from a bridge output; never fails.

        Every integer in the text is an id (`2 1`, `[2], [1]`, `ids: 2;1` read alike); ids outside
        1..count (0, -1, 99) and everything that is not an integer are ignored; at most `limit`
        ids are kept (a policy that repeats `1 1 1 ...` cannot flood the LLM's prompt).
        """
        if not isinstance(text, str):
            return []
        ids = (int(token) for token in re.findall(r"-?\d+", text))
        return [i - 1 for i in ids if 1 <= i <= count][:limit]


class Bridge(nn.Module):
    """The bridge policy: an LM (`Generator`: causal or seq2seq, padding and batching) that writes ids.

    `logprobs` gives the differentiable log p(action | input) of whole id sequences (token ids,
    summed over tokens including end-of-sequence); `sample` draws actions as token ids, so PPO's
    ratio is computed on exactly the tokens that were sampled (a decode/re-encode round trip could
    change them). Both take the sampling temperature T: the policy at T is softmax(logits / T) per token.
    """

    def __init__(self, lm: Generator, template: BridgeTemplate = BridgeTemplate(), *, max_new_tokens: int = 24,
                 max_passages: int = 10):
        super().__init__()
        self.lm = lm
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.max_passages = max_passages

    def inputs(self, examples: Sequence[Example], candidates: Sequence[Sequence[Passage]]) -> list[str]:
        return [self.template.input(e.question, c) for e, c in zip(examples, candidates)]

    def select(self, texts: Sequence[str], candidates: Sequence[Sequence[Passage]]) -> list[list[Passage]]:
        """The passages each output names, in its order."""
        return [[c[p] for p in self.template.parse(t, len(c), self.max_passages)] for t, c in zip(texts, candidates)]

    def target_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of target outputs, as the LM scores them (end-of-sequence included)."""
        return self.lm.target_ids(texts)

    def text(self, actions: Sequence[Sequence[int]]) -> list[str]:
        return self.lm.tokenizer.batch_decode([list(a) for a in actions], skip_special_tokens=True)

    def logprobs(self, inputs: Sequence[str], actions: Sequence[Sequence[int]], temperature: float = 1.0) -> torch.Tensor:
        """log p_T(action | input) (N,), differentiable; N inputs, N actions as token ids. p_T is the
        policy `sample` draws from at `temperature` T: each token from softmax(logits / T)."""
        token_logp, mask = self.lm.flat_logprobs(self.lm.prompt_ids(inputs), [list(a) for a in actions],
                                                 temperature=temperature)  # (N, L)
        return (token_logp * mask).sum(-1)

    def decode(self, inputs: Sequence[str], num_beams: int = 1) -> list[str]:
        """The most likely outputs (greedy, or beam search) of the policy as trained: without the
        checkpoint's own settings, which may ban the repeats BGM allows (see `plain_generation`)."""
        with plain_generation(self.lm.model):
            return self.lm.generate(list(inputs), max_new_tokens=self.max_new_tokens, num_beams=num_beams)

    @torch.no_grad()
    def sample(self, inputs: Sequence[str], n: int, temperature: float = 1.0) -> list[list[int]]:
        """n sampled actions per input, input after input (N = len(inputs) * n), as token ids up to and
        including the first end-of-sequence token. Pure ancestral sampling from softmax(logits /
        temperature), no top-k or top-p: `logprobs(..., temperature)` gives their probabilities."""
        lm = self.lm
        batch = lm.tokenizer.pad({"input_ids": lm.prompt_ids(list(inputs))}, return_tensors="pt").to(lm.device)
        with plain_generation(lm.model):
            output = lm.model.generate(
                **batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_beams=1,
                num_return_sequences=n, max_new_tokens=self.max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id,
            )
        new = output[:, 1:] if lm.seq2seq else output[:, batch["input_ids"].shape[1] :]  # drop decoder start / prompt
        eos = lm.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) | {lm.tokenizer.eos_token_id}
        actions = []
        for row in new.tolist():
            end = next((i for i, token in enumerate(row) if token in stops), len(row) - 1)
            actions.append(row[: end + 1])
        return actions


@contextlib.contextmanager
def plain_generation(model: nn.Module):
    """Generate with none of the model's own generation settings but its special token ids.

    Checkpoints ship settings that change the distribution sampled from (BART forces an end-of-
    sequence token at the last step and bans repeated trigrams; others add top-k or repetition
    penalties); then p(action) as `Bridge.logprobs` computes it would not be the probability the
    action was drawn with, and PPO's ratio would be wrong.
    """
    from transformers import GenerationConfig

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA adapter
    saved = hf_model.generation_config
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    hf_model.generation_config = GenerationConfig(**{key: getattr(saved, key, None) for key in ids})
    try:
        yield
    finally:
        hf_model.generation_config = saved


def load_bridge(
    name_or_path: str | None = None,
    *,
    template: BridgeTemplate = BridgeTemplate(),
    lora: bool = False,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_targets: str = "all-linear",
    precision: str = "auto",
    max_input_tokens: int = 2048,
    max_new_tokens: int = 24,
    max_passages: int = 10,
) -> Bridge:
    """A bridge from a hub id, a local directory or a GGUF file (causal or seq2seq), LoRA optional.

    `max_input_tokens` is generous because the query comes first: an over-long input loses its
    start (see `Generator`), so bound it with `template.passage_words` rather than with this.
    """
    lm = load_generator(name_or_path, precision=precision)
    lm.max_prompt_tokens = max_input_tokens
    if lora:
        lm.model = with_lora(lm.model, r=lora_r, alpha=lora_alpha, targets=lora_targets)
    return Bridge(lm, template, max_new_tokens=max_new_tokens, max_passages=max_passages)


# --- the system ------------------------------------------------------------------------------------


class PassageIndex(Protocol):
    """What BGM needs of an index (`index.RetrievalIndex` is one): search, and passages by row and id."""

    corpus: object

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def passages(self, rows: np.ndarray) -> list[list[Passage | None]]: ...


class BridgeSystem(nn.Module):
    """The trainable bridge with the frozen parts around it: the generator (the LLM that answers and
    judges), the stage-1 reference policy for PPO's KL term, the index and the LLM's prompt."""

    def __init__(self, bridge: Bridge, generator: Generator, index: PassageIndex, template: PromptTemplate):
        super().__init__()
        self.bridge = bridge
        self.generator = generator.requires_grad_(False)
        self.reference: Bridge | None = None  # set by `freeze_reference`
        self.index = index
        self.template = template

    def train(self, mode: bool = True) -> "BridgeSystem":
        """Train mode for the bridge; the frozen LLM (it answers, judges and writes the silver
        sequences) and the frozen reference stay in eval mode, without dropout (`eval_frozen`)."""
        super().train(mode)
        if mode:
            eval_frozen([self.bridge, self.generator, self.reference])
        return self

    def freeze_reference(self) -> None:
        """The bridge as it is now (after stage 1) becomes PPO's frozen reference policy (eval mode)."""
        self.reference = copy.deepcopy(self.bridge).requires_grad_(False).eval()

    def candidates(self, examples: Sequence[Example], k: int) -> list[list[Passage]]:
        """The top-k passages of each example (fewer where the index has fewer), its `exclude` left out."""
        extra = max(len(e.exclude) for e in examples)
        rows = self.index.search([e.question for e in examples], k + extra)[1]
        return [[p for p in row if p is not None and p.id not in e.exclude][:k]
                for e, row in zip(examples, self.index.passages(rows))]

    def passages_by_id(self, ids: Sequence[str], where: str) -> list[Passage]:
        corpus = self.index.corpus
        rows = [corpus.row_of(i) for i in ids]
        missing = [i for i, r in zip(ids, rows) if r is None]
        if missing:
            raise UserError(f"{where}: passage '{missing[0]}' is not in the index's corpus")
        return [corpus[r] for r in rows]


# --- the frozen LLM as judge -----------------------------------------------------------------------


@dataclass
class Judge:
    """Answers with the frozen LLM from given passages and scores the answers against the references.

    `scores` gives each (example, passages) its metric values in order, then (with `tie_break`)
    log p(first reference | prompt), the smooth tie-breaker of methods.md §5; `rewards` the mean of
    the metric values. Identical prompts are answered once; calls are batched by `batch_size`.
    """

    generator: Generator
    template: PromptTemplate
    metrics: tuple[Metric, ...] = (qa.exact_match, qa.token_f1)
    tie_break: bool = True
    max_new_tokens: int = 32
    batch_size: int = 16

    def _prompts(self, examples: Sequence[Example], contexts: Sequence[Sequence[Passage]]) -> list:
        return [self.template.prompt(e, list(c), self.generator.chat) for e, c in zip(examples, contexts)]

    def answers(self, examples: Sequence[Example], contexts: Sequence[Sequence[Passage]]) -> list[str]:
        prompts = self._prompts(examples, contexts)
        unique = list(dict.fromkeys(prompts))
        answered = {}
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            answered.update(zip(chunk, self.generator.generate(chunk, max_new_tokens=self.max_new_tokens)))
        return [answered[p] for p in prompts]

    @torch.no_grad()
    def reference_logp(self, examples: Sequence[Example], contexts: Sequence[Sequence[Passage]]) -> list[float]:
        prompts = self._prompts(examples, contexts)
        targets = [e.answers[0] if e.answers else "" for e in examples]
        values = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            logp, mask = self.generator.pair_logprobs(prompts[chunk], targets[chunk])
            values += (logp * mask).sum(-1).float().tolist()
        return values

    def scores(self, examples: Sequence[Example], contexts: Sequence[Sequence[Passage]]) -> list[Score]:
        answers = self.answers(examples, contexts)
        values = [[m(a, e.answers) for m in self.metrics] for e, a in zip(examples, answers)]
        if self.tie_break:
            values = [v + [lp] for v, lp in zip(values, self.reference_logp(examples, contexts))]
        return [tuple(v) for v in values]

    def rewards(self, examples: Sequence[Example], contexts: Sequence[Sequence[Passage]]) -> list[float]:
        answers = self.answers(examples, contexts)
        return [sum(m(a, e.answers) for m in self.metrics) / len(self.metrics) for e, a in zip(examples, answers)]


# --- silver passage sequences ----------------------------------------------------------------------


def greedy_silver(
    sizes: Sequence[int],
    score: Callable[[list[tuple[int, tuple[int, ...]]]], list[Score]],
    *,
    max_len: int,
    repeat: bool = False,
) -> list[tuple[tuple[int, ...], Score]]:
    """Greedy silver passage sequences for many examples at once (methods.md §5).

    `sizes[i]`: example i's number of candidates. `score(pairs)` scores (example, sequence of 0-based
    candidate positions) pairs, all of one step in one call. Starting from the empty sequence, each
    example appends the candidate whose sequence scores highest, while that strictly beats its
    current score and the sequence is shorter than `max_len`; ties go to the earlier (better
    retrieved) candidate. `repeat` allows a candidate more than once. At most K * max_len + 1 pairs
    per example, in at most max_len + 1 calls. Returns each example's (sequence, score).
    """
    best = score([(i, ()) for i in range(len(sizes))])
    current: list[tuple[int, ...]] = [()] * len(sizes)
    active = [i for i, n in enumerate(sizes) if n > 0 and max_len > 0]
    while active:
        pairs = [(i, current[i] + (j,)) for i in active for j in range(sizes[i]) if repeat or j not in current[i]]
        improved = set()
        for (i, sequence), value in zip(pairs, score(pairs) if pairs else []):
            if value > best[i]:
                current[i], best[i] = sequence, value
                improved.add(i)
        active = [i for i in active if i in improved and len(current[i]) < max_len]
    return list(zip(current, best))


@dataclass
class SilverRecord:
    question: str
    candidates: list[str]  # passage ids, in retrieval order: the bridge's ids 1..K
    silver: list[str]  # passage ids, in the silver order (repeats allowed)
    score: list[float]


class SilverStore:
    """Silver sequences by example id, cached in a JSONL file: a header line (the settings that made
    them: another k, judge or LLM is refused), then one example a line. Rewritten atomically after
    each batch (`data.write_cache`), so a crash never leaves a half-written file."""

    def __init__(self, path: Path | str | None, header: dict):
        self.path = None if path is None else Path(path)
        self.header = {"jointrag": "bgm-silver", **header}
        self.records: dict[str, SilverRecord] = {}
        self.lines: dict[str, int] = {}
        if self.path is not None and self.path.exists():
            self._read()

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.records

    def _read(self) -> None:
        for line_no, record in read_cache(self.path, self.header, "set bgm.silver to a new path"):
            self.records[str(record.get("id"))] = self._record(record, line_no)
            self.lines[str(record.get("id"))] = line_no

    def _record(self, record: dict, line_no: int) -> SilverRecord:
        try:
            entry = SilverRecord(str(record["question"]), [str(i) for i in record["candidates"]],
                                 [str(i) for i in record["silver"]], [float(v) for v in record["score"]])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{self.path}:{line_no}: expected fields 'id', 'question', 'candidates', 'silver' "
                            "(passage ids) and 'score' (numbers)") from None
        stray = [i for i in entry.silver if i not in entry.candidates]
        if stray:
            raise UserError(f"{self.path}:{line_no}: field 'silver': '{stray[0]}' is not one of the candidates")
        return entry

    def get(self, example: Example) -> SilverRecord:
        record = self.records[example.id]
        if record.question != example.question:
            where = f"{self.path}:{self.lines[example.id]}" if example.id in self.lines else "silver sequences"
            raise UserError(f"{where}: example {example.id} has another question there than in this run's data; "
                            "delete the file or set bgm.silver to a new path")
        return record

    def save(self) -> None:
        if self.path is not None:
            write_cache(self.path, self.header, {example_id: asdict(r) for example_id, r in self.records.items()})

    def fill(
        self,
        examples: Sequence[Example],
        candidates: Callable[[Sequence[Example]], list[list[Passage]]],
        scores: Callable[[Sequence[Example], Sequence[Sequence[Passage]]], list[Score]],
        *,
        max_len: int,
        repeat: bool,
        batch_size: int = 8,
    ) -> int:
        """Compute and store the silver sequences of the examples that have none; returns how many.
        The file is rewritten after each batch of examples."""
        missing = list({e.id: e for e in examples if e.id not in self.records}.values())
        with tqdm(total=len(missing), unit="example", desc="BGM: silver passage sequences", dynamic_ncols=True,
                  disable=not missing) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                passages = candidates(batch)

                def score(pairs):
                    return scores([batch[i] for i, _ in pairs], [[passages[i][j] for j in seq] for i, seq in pairs])

                found = greedy_silver([len(p) for p in passages], score, max_len=max_len, repeat=repeat)
                for example, ps, (sequence, value) in zip(batch, passages, found):
                    self.records[example.id] = SilverRecord(example.question, [p.id for p in ps],
                                                            [ps[j].id for j in sequence], [round(v, 5) for v in value])
                self.save()
                bar.update(len(batch))
        return len(missing)


# --- inference ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def policy_mode(*modules: nn.Module | None):
    """Run the bridge (and reference) without dropout: sampling, old and new log-probs must all be of
    the same policy (TRL disables dropout for PPO for the same reason). Restores the modes after."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


class Bridged(NamedTuple):
    """What `bridge_answers` gives per example: the LLM's answer and the passages it was given, in order."""

    answers: list[str]
    chosen: list[list[Passage]]


@torch.no_grad()
def bridge_answers(
    system: BridgeSystem, examples: Sequence[Example], *, k: int = 5, num_beams: int = 1, max_new_tokens: int = 32,
    batch_size: int = 16, top: int | None = None,
) -> Bridged:
    """Retrieve the top-k, let the bridge choose (greedy, or beam search with `num_beams`), answer
    with the LLM from the chosen passages (none: the LLM answers without passages). With `top`, no
    bridge: the top `top` passages go straight to the LLM (plain retrieval, the baseline)."""
    judge = Judge(system.generator, system.template, max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers, chosen = [], []
    with policy_mode(system.bridge), tqdm(total=len(examples), unit="question", desc="evaluating", dynamic_ncols=True) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            candidates = system.candidates(batch, k)
            if top is None:
                selected = system.bridge.select(system.bridge.decode(system.bridge.inputs(batch, candidates), num_beams),
                                                candidates)
            else:
                selected = [c[:top] for c in candidates]
            answers += judge.answers(batch, selected)
            chosen += selected
            bar.update(len(batch))
    return Bridged(answers, chosen)


def score_bridged(examples: Sequence[Example], result: Bridged) -> tuple[list[dict], dict]:
    """Predictions (one dict per example: the answer, the passages passed and their scores) and
    aggregate metrics: EM, F1 (percent, SQuAD normalisation) and ROUGE-L, the mean number of passages
    passed, and for a set with unanswerable examples their count and the abstention scores (as
    `evaluation.evaluate.aggregate`)."""
    predictions = [
        {"id": e.id, "question": e.question, "answers": list(e.answers), "prediction": answer,
         "passages": [p.id for p in chosen], "em": qa.exact_match(answer, e.answers), "f1": qa.token_f1(answer, e.answers),
         "rouge_l": qa.rouge_l(answer, e.answers)}
        for e, answer, chosen in zip(examples, result.answers, result.chosen)
    ]
    metrics = {"examples": len(examples), **{name: 100 * qa.mean(p[name] for p in predictions) for name in ("em", "f1", "rouge_l")},
               "passages": qa.mean(len(p["passages"]) for p in predictions)}
    unanswerable = sum(not e.answers for e in examples)
    if unanswerable:
        scores = qa.abstention(result.answers, [e.answers for e in examples])
        metrics.update({"unanswerable": unanswerable, **{f"abstain_{name}": 100 * getattr(scores, name) for name in scores._fields}})
    return predictions, {key: round(value, 2) if isinstance(value, float) else value for key, value in metrics.items()}


def bridge_system(config: Any, objective: Any = None) -> BridgeSystem:
    """BGM: the index and the LLM, both frozen, and the bridge. When the objective needs a reference
    (PPO), the bridge starts from the stage-1 checkpoint `bgm.reference` (unset: the base bridge) and a
    frozen copy of it becomes the reference policy of the KL term, so a resumed run has the same reference."""
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
    if getattr(objective, "needs_reference", False):
        if b.reference:
            directory = Path(b.reference)
            weights = read_tensors(directory / "weights.pt") if (directory / "weights.pt").is_file() else {}
            if not weights or not all(name.startswith("bridge.") for name in weights):
                raise UserError(f"bgm.reference: {directory} is not a BGM checkpoint (RUN/sl/checkpoint)")
            load_weights(system, weights, directory)
        system.freeze_reference()
    return system
