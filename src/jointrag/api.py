"""The Python API, of which the CLI's `retrieve`, `ask` and `eval` and the HTTP server are faces.

    import jointrag

    rag = jointrag.open()                              # the embedded SQuAD index and the default models
    rag.retrieve("Who won Super Bowl 50?", k=5)        # [[Hit(id, title, text, score, rank, used)]]
    rag.answer(["Who won Super Bowl 50?", "..."])      # [Answer(question, answer, passages, timings)]
    for piece in rag.stream_answer("Who won Super Bowl 50?"):
        print(piece, end="")
    jointrag.evaluate(rag, jointrag.examples("qa.jsonl"), out="runs/eval")
    jointrag.train(method="jsa", data="train.jsonl", data__dev="dev.jsonl", out="runs/jsa", steps=500)

A `Pipeline` loads what it needs when it first needs it: the index (with its query tower) on the first
retrieval, the generator on the first answer. Retrieval alone therefore never loads an LM, and a
pipeline over a trained checkpoint retrieves with its trained query tower alone
(`train.load_trained_index`) until it must answer, when the whole trained system loads
(`train.load_trained`) and serves both from then on. Every method takes one question or a list, and a
list runs as batches. Examples are accepted as a file path, a list of dicts or `Example`s, or a
`datasets.Dataset` (`examples`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data.qa import read_examples
from .errors import UserError
from .evaluation.evaluate import DECODERS, Retrieved, decode as decode_answers, evaluate as evaluate_examples, retrieve as retrieve_passages
from .generation.generator import Generator, PromptTemplate, load_generator, load_template
from .io import check_out_dir, exclusive, write_json, write_jsonl
from .retrieval.index import RetrievalIndex
from .types import Example, Passage

CHECKPOINT_FILE = "weights.pt"  # what makes a directory a checkpoint (`train.loop.read_checkpoint`)


@dataclass(frozen=True)
class Hit:
    """A retrieved passage: its rank from 1, its retrieval score, and whether it was given to the
    generator (`used`; always False in `Pipeline.retrieve`'s results)."""

    id: str
    title: str
    text: str
    score: float
    rank: int
    used: bool = False


@dataclass(frozen=True)
class Answer:
    """An answer with the passages retrieved for it. `timings` are the seconds the call that made it
    spent retrieving and generating, for its whole batch. `chosen`: the passage ids a BGM checkpoint's
    bridge gave the generator, in its order (None for the other models)."""

    question: str
    answer: str
    passages: list[Hit]
    timings: dict[str, float]
    chosen: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Reader:
    """The answering half of a pipeline: the generator, its prompt, and a BGM checkpoint's bridge system."""

    generator: Generator
    template: PromptTemplate
    bridged: Any = None  # methods.bgm_bridge.BridgeSystem


def _questions(questions: str | Iterable[str]) -> list[str]:
    listed = [questions] if isinstance(questions, str) else list(questions)
    for i, question in enumerate(listed):
        if not isinstance(question, str):
            raise UserError(f"question {i + 1}: expected a string, got {type(question).__name__}")
    return listed


def _hits(result: Retrieved, used: Iterable[str] = ()) -> list[Hit]:
    used = set(used)
    return [Hit(p.id, p.title, p.text, float(s), rank, p.id in used) for rank, (p, s) in enumerate(zip(result.passages, result.scores), 1)]


class StreamedAnswer:
    """One answer generated token by token (greedy, top1 decoder). Iterating gives its text in pieces as
    they come; joined, they are the answer `Pipeline.answer` gives (cut at its first line break, white
    space at its ends dropped). `passages` are known from the start; `answer` and `timings` once the
    iteration has ended. Generation runs in `run`, which the first iteration hands to `runner` (default:
    a thread of its own; a server hands it to the thread that runs its models)."""

    def __init__(self, question: str, passages: list[Hit], generator: Generator, prompt, max_new_tokens: int,
                 retrieve_s: float, runner: Callable[[Callable[[], None]], Any] | None = None):
        from transformers import TextIteratorStreamer

        self.question, self.passages = question, passages
        self.answer: str | None = None
        self.timings = {"retrieve_s": round(retrieve_s, 4)}
        self._generator, self._prompt, self._max_new_tokens = generator, prompt, max_new_tokens
        self._streamer = TextIteratorStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._runner = runner or (lambda run: threading.Thread(target=run, daemon=True).start())
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._started = False

    def run(self) -> None:
        """Generate, feeding the iteration; an error is raised by the iteration, not here."""
        started = time.perf_counter()
        try:
            self.answer = self._generator.generate([self._prompt], max_new_tokens=self._max_new_tokens, streamer=self._streamer)[0]
        except BaseException as error:  # handed to the iterating thread, which raises it
            self._error = error
            self._streamer.end()
        finally:
            self.timings["generate_s"] = round(time.perf_counter() - started, 4)
            self._done.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a streamed answer can be iterated once")
        self._started = True
        self._runner(self.run)
        shown, raw, ended = "", "", False
        for piece in self._streamer:
            if ended:
                continue  # past the first line: the answer ends there; let generation finish
            raw += piece
            text = raw.lstrip()
            ended = "\n" in text
            line = text.split("\n")[0].strip() if ended else text.rstrip()  # trailing space waits for the next word
            if line.startswith(shown) and len(line) > len(shown):
                yield line[len(shown):]
                shown = line
        self._done.wait()
        if self._error is not None:
            raise self._error
        if self.answer.startswith(shown) and len(self.answer) > len(shown):
            yield self.answer[len(shown):]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "passages": [asdict(h) for h in self.passages],
                "timings": self.timings}


class Pipeline:
    """A retriever over an index and a generator, or a trained checkpoint: retrieve, answer, stream.

    Build it with `jointrag.open`, `Pipeline.from_index` or `Pipeline.from_checkpoint`. It is safe to
    share between threads for loading (one thread loads, the others wait); the models themselves are
    best run from one thread at a time, as the server does."""

    def __init__(self, *, index: str | Path | RetrievalIndex | None = None, checkpoint: str | Path | None = None,
                 retriever: str | None = None, generator: str | None = None, search: dict | None = None,
                 template: str | PromptTemplate | None = None, chat: bool = False, precision: str = "auto"):
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self._index = index if isinstance(index, RetrievalIndex) else None
        self._index_path = None if isinstance(index, RetrievalIndex) else index
        self._retriever, self._search = retriever, search
        self._generator_name, self._chat, self._precision = generator, chat, precision
        self._template = template
        self._config = None  # a checkpoint's RunConfig, once read: its decoder and temperature are the defaults
        self._reader: _Reader | None = None
        self._lock = threading.RLock()

    @classmethod
    def from_index(cls, index: str | Path | None = None, *, retriever: str | None = None, generator: str | None = None,
                   search: dict | None = None, template: str | PromptTemplate | None = None, chat: bool = False,
                   precision: str = "auto") -> "Pipeline":
        """An index directory (None: the embedded SQuAD index, built on first use) searched with
        `retriever` (default: the encoder its manifest names) and `search` settings (e.g. {"nprobe":
        32}), and the generator `generator` (default: SmolLM2-135M-Instruct) with `template`, a YAML
        file or a `PromptTemplate`. A directory that is not an index is refused now."""
        if index is not None:
            from .retrieval.index import read_manifest

            read_manifest(index)
        return cls(index=index, retriever=retriever, generator=generator, search=search, template=template, chat=chat,
                   precision=precision)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, template: str | PromptTemplate | None = None) -> "Pipeline":
        """A trained checkpoint (RUN/checkpoint): its index, trained retriever, generator and prompt
        (`template` replaces the prompt); a BGM checkpoint answers through its bridge."""
        return cls(checkpoint=checkpoint, template=template)

    @property
    def index(self) -> RetrievalIndex:
        """The index with its query tower; opened (a checkpoint's: with the trained tower) on first use."""
        with self._lock:
            if self._index is None:
                if self.checkpoint is not None:
                    from .train import load_trained_index

                    self._config, self._index = load_trained_index(self.checkpoint)
                else:
                    from .retrieval.resolve import resolve_index

                    self._index = resolve_index(self._index_path, self._retriever, self._search)
            return self._index

    def load(self) -> "Pipeline":
        """Load the generator now rather than on the first answer (a server does, so that a bad model fails
        at start and the first request is not the slow one)."""
        self._load_reader()
        return self

    def _load_reader(self) -> _Reader:
        with self._lock:
            if self._reader is None:
                template = load_template(os.fspath(self._template)) if isinstance(self._template, (str, os.PathLike)) else self._template
                if self.checkpoint is not None:
                    from .methods.bgm_bridge import BridgeSystem
                    from .train import load_trained

                    self._config, system = load_trained(self.checkpoint)
                    system.template = template or system.template
                    bridged = system if isinstance(system, BridgeSystem) else None
                    self._reader = _Reader(system.generator, system.template, bridged)
                    self._index = system.index  # the whole system's (a retrieval-only one is let go)
                else:
                    generator = load_generator(self._generator_name, chat=self._chat, precision=self._precision)
                    self._reader = _Reader(generator, template or PromptTemplate())
            return self._reader

    @property
    def generator_name(self) -> str | None:
        """The generator's name once loaded (None before)."""
        return None if self._reader is None else self._reader.generator.name

    def describe(self) -> dict:
        """What this pipeline serves: index directory, checkpoint, generator (once loaded)."""
        return {"index": str(self.index.directory), "checkpoint": self.checkpoint, "generator": self.generator_name,
                "bridge": self._reader is not None and self._reader.bridged is not None}

    def decoder(self, decode: str | None = None) -> str:
        """The decoder an answer uses: `decode`, else a checkpoint's `eval.decode`, else top1; "bridge"
        for a BGM checkpoint once loaded, which refuses another."""
        if decode is not None and decode not in DECODERS:
            raise UserError(f"decode must be one of {', '.join(DECODERS)}, not {decode!r}")
        if self._reader is not None and self._reader.bridged is not None:
            if decode:
                raise UserError(f"--decode {decode}: {self.checkpoint} is a BGM checkpoint; its bridge chooses the passages")
            return "bridge"
        return decode or (self._config.eval.decode if self._config is not None else "top1")

    def _tau(self, tau: float | None) -> float:
        return tau or (self._config.method.tau if self._config is not None else 0.1)

    def retrieve(self, questions: str | Iterable[str], k: int = 5) -> list[list[Hit]]:
        """The top-k passages of each question, best first (fewer where the index holds fewer)."""
        questions = _questions(questions)
        _check_counts(k=k)
        return [_hits(result) for result in retrieve_passages(self.index, questions, k)] if questions else []

    def answer(self, questions: str | Iterable[str], k: int = 5, contexts: int = 1, decode: str | None = None,
               max_new_tokens: int = 16, beams: int = 1, *, tau: float | None = None, batch_size: int = 16) -> list[Answer]:
        """Answer each question from its top-k passages: "top1" decoding (the default) puts the top
        `contexts` in one prompt, the RAG decoders and "ensemble" mix all k (see `evaluation.evaluate.decode`,
        `tau` their temperature); `beams` 1 is greedy. A BGM checkpoint answers through its bridge."""
        questions = _questions(questions)
        _check_counts(k=k, max_new_tokens=max_new_tokens, beams=beams, batch_size=batch_size, contexts=contexts)
        reader = self._load_reader()
        decoder = self.decoder(decode)
        if not questions:
            return []
        started = time.perf_counter()
        results = retrieve_passages(self.index, questions, k)
        retrieved = time.perf_counter()
        examples = [Example(str(i), q, ()) for i, q in enumerate(questions)]
        chosen: list[list[str]] | None = None
        if reader.bridged is not None:
            from .methods.bgm_bridge import bridge_answers

            answers, picked = bridge_answers(reader.bridged, examples, k=k, num_beams=beams, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size)
            used = chosen = [[p.id for p in row] for row in picked]
        else:
            answers = [text for start in range(0, len(examples), batch_size) for text in decode_answers(
                reader.generator, reader.template, examples[start : start + batch_size], results[start : start + batch_size],
                method=decoder, contexts=contexts, tau=self._tau(tau), max_new_tokens=max_new_tokens, num_beams=beams)]
            width = contexts if decoder == "top1" else k
            used = [[p.id for p in r.passages[:width]] for r in results]
        timings = {"retrieve_s": round(retrieved - started, 4), "generate_s": round(time.perf_counter() - retrieved, 4)}
        return [Answer(q, text, _hits(r, u), dict(timings), None if chosen is None else chosen[i])
                for i, (q, text, r, u) in enumerate(zip(questions, answers, results, used))]

    def streams(self, decode: str | None = None) -> bool:
        """Whether `stream_answer` can stream with `decode`: the top1 decoder of a model without a bridge."""
        return self._load_reader().bridged is None and self.decoder(decode) == "top1"

    def stream_answer(self, question: str, k: int = 5, contexts: int = 1, decode: str | None = None, max_new_tokens: int = 16,
                      *, runner: Callable[[Callable[[], None]], Any] | None = None) -> StreamedAnswer:
        """One answer as it is generated (iterate it for the text pieces), from the top `contexts` of
        its top-k passages, greedy. Only the top1 decoder streams: the RAG decoders and "ensemble" choose
        among whole answers, and a BGM bridge answers after choosing; `answer` runs those."""
        [question] = _questions([question])
        _check_counts(k=k, max_new_tokens=max_new_tokens, contexts=contexts)
        reader = self._load_reader()
        decoder = self.decoder(decode)
        if decoder != "top1":
            raise UserError(f"streaming runs the top1 decoder only, not {decoder!r} (it chooses among whole answers); "
                            "use answer() for it")
        started = time.perf_counter()
        [result] = retrieve_passages(self.index, [question], k)
        passages = result.passages[:contexts]
        prompt = reader.template.prompt(Example("stream", question, ()), passages, reader.generator.chat)
        return StreamedAnswer(question, _hits(result, [p.id for p in passages]), reader.generator, prompt, max_new_tokens,
                              time.perf_counter() - started, runner)

    def evaluate(self, examples: list[Example], *, k: int = 5, contexts: int = 1, decode: str | None = None,
                 max_new_tokens: int = 16, beams: int = 1, tau: float | None = None, batch_size: int = 16,
                 retrieval_only: bool = False) -> tuple[list[dict], dict]:
        """(predictions, metrics) of `examples`, as `jointrag eval` scores them (`jointrag.evaluate`
        adds what was evaluated and writes them)."""
        reader = None if retrieval_only else self._load_reader()
        decoder = self.decoder(decode)
        if reader is not None and reader.bridged is not None:
            from .methods.bgm_bridge import bridge_answers, score_bridged

            result = bridge_answers(reader.bridged, examples, k=k, num_beams=beams, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
            predictions, metrics = score_bridged(examples, result)
        else:
            predictions, metrics = evaluate_examples(
                self.index, None if reader is None else reader.generator, examples, k=k, contexts=contexts,
                template=PromptTemplate() if reader is None else reader.template, batch_size=batch_size,
                max_new_tokens=max_new_tokens, num_beams=beams, decoder=decoder, tau=self._tau(tau),
            )
        return predictions, {"index": str(self.index.directory), "checkpoint": self.checkpoint, "decode": decoder, **metrics}


def _check_counts(**counts: int) -> None:
    """Refuse a count below its least value (1; `contexts` 0) or not a whole number, naming it."""
    for name, value in counts.items():
        least = 0 if name == "contexts" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{name} must be a whole number of at least {least}, got {value!r}")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CHECKPOINT_FILE).is_file()


def open(path: str | Path | None = None, *, retriever: str | None = None, generator: str | None = None,
         search: dict | None = None, template: str | PromptTemplate | None = None, chat: bool = False,
         precision: str = "auto") -> Pipeline:
    """A `Pipeline` over `path`: a trained checkpoint (RUN/checkpoint, which holds its own retriever
    and generator), an index directory, or None, the embedded SQuAD index (built on first use, as
    `jointrag eval` does). For an index: `retriever` (default: the encoder its manifest names),
    `search` settings such as {"nprobe": 32}, `generator` (default: SmolLM2-135M-Instruct), `chat`,
    `precision`. `template` (a prompt YAML file or a `PromptTemplate`) applies to both."""
    if path is not None and is_checkpoint(path):
        given = [name for name, value in (("retriever", retriever), ("generator", generator), ("search", search), ("chat", chat))
                 if value]
        if given:
            raise UserError(f"{path} is a checkpoint, which holds its own retriever and generator; {given[0]} does not apply to it")
        return Pipeline.from_checkpoint(path, template=template)
    if path is not None and is_checkpoint(Path(path) / "checkpoint"):
        raise UserError(f"{path} is a run directory; open its checkpoint, {Path(path) / 'checkpoint'}")
    return Pipeline.from_index(path, retriever=retriever, generator=generator, search=search, template=template, chat=chat,
                               precision=precision)


def build_index(passages: str | Path | Iterable[Passage | dict], out: str | Path, *, retriever: str | None = None,
                kind: str = "exact", params: dict | None = None, format: str | None = None, chunk_words: int | None = None,
                batch_size: int = 64, precision: str = "auto", generator: str | None = None) -> Pipeline:
    """Store, encode and index `passages` in the directory `out` and return a `Pipeline` over it (its
    generator `generator`, loaded on the first answer). `passages`: a corpus file (.jsonl, DPR .tsv,
    SQuAD .json, optionally .gz; `format` when its name does not say), or `Passage`s or dicts with `id`,
    `text` and optional `title` (a `datasets.Dataset` too). `retriever`: the encoder (default
    all-MiniLM-L6-v2); `kind`: exact, flat, hnsw, ivfpq or bm25, with `params` (e.g. {"nlist": 1024});
    `chunk_words`: split passages into chunks of at most that many words."""
    from .data.corpus import chunk_passages, passages_from_records
    from .retrieval.encoders import load_retriever
    from .retrieval.index import build_index as build
    from .retrieval.resolve import build_from_file

    if isinstance(passages, (str, os.PathLike)):
        index = build_from_file(passages, out, format=format, chunk_words=chunk_words, retriever=retriever, kind=kind,
                                params=params, batch_size=batch_size, precision=precision)
    else:
        check_out_dir(Path(out))
        records = passages_from_records(passages)
        if chunk_words:
            records = chunk_passages(records, chunk_words)
        encoder = None if kind == "bm25" else load_retriever(retriever)
        index = build(records, out, retriever=encoder, kind=kind, params=params or {}, batch_size=batch_size, precision=precision,
                      source="python")
    return Pipeline(index=index, generator=generator)


def examples(source: Any = None, *, format: str | None = None, split: str = "test") -> list[Example]:
    """QA examples from `source`: a file (SQuAD .json, JSONL, DPR .json, NQ-open .jsonl; `format` when
    its name does not say), a list of dicts (`question`, `answers`, optional `id`, `gold_ids`,
    `history`) or `Example`s, a `datasets.Dataset` with those columns (`answers` may be SQuAD's
    {"text": [...]}), or None: the embedded SQuAD questions of `split` (train, dev, test or all)."""
    return read_examples(source, format=format, split=split)


def _data_name(source: Any) -> str:
    if source is None:
        return "embedded:test"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "examples"


def evaluate(pipeline: Pipeline | str | Path | None, examples: Any = None, *, k: int = 5, contexts: int = 1,
             decode: str | None = None, max_new_tokens: int = 16, beams: int = 1, tau: float | None = None, batch_size: int = 16,
             retrieval_only: bool = False, out: str | Path | None = None, name: str | None = None) -> dict:
    """Answer and score `examples` (anything `examples` reads; None: the embedded test split) and return
    the metrics: EM, F1, ROUGE-L, answer and gold recall@k, MRR (see `evaluation.evaluate`), with what
    was evaluated (`data`: `name`, default the file or 'examples'; `index`, `checkpoint`, `decode`).
    `pipeline`: a `Pipeline`, or a path `open` takes. With `retrieval_only` no generator loads. With
    `out`, writes `out/predictions.jsonl` and `out/metrics.json`, whole or not at all, and refuses an
    `out` another jointrag process is writing to (`io.exclusive`)."""
    if out is not None:
        check_out_dir(Path(out))
    rows = read_examples(examples)
    label = name or _data_name(examples)
    if not rows:
        raise UserError(f"{label}: no questions to evaluate")
    if not isinstance(pipeline, Pipeline):
        pipeline = open(pipeline)
    settings = dict(k=k, contexts=contexts, decode=decode, max_new_tokens=max_new_tokens, beams=beams, tau=tau,
                    batch_size=batch_size, retrieval_only=retrieval_only)
    if out is None:
        return {"data": label, **pipeline.evaluate(rows, **settings)[1]}
    out = Path(out)
    with exclusive(out):  # a second evaluation into `out` is refused, not interleaved
        predictions, metrics = pipeline.evaluate(rows, **settings)
        metrics = {"data": label, **metrics}
        write_jsonl(out / "predictions.jsonl", predictions)
        write_json(out / "metrics.json", metrics)
    return metrics


def train(config: Any = None, *, resume: bool = False, **settings: Any) -> dict:
    """Train a model and return its final metrics (a multi-stage method, RA-DIT, BGM or Invar-RAG: its
    comparison table, {row: metrics}); the checkpoint is `OUT/checkpoint`, for `jointrag.open`.

    `config`: None (the defaults), a YAML recipe's path, a mapping shaped like one (`{"method":
    {"name": "jsa"}, "train": {"steps": 10}}`) or a `config.RunConfig`. Then `settings`, one keyword
    per setting: its dotted key with `__` for each dot (`train__steps=10`, `method__k=10`, `out="runs/x"`),
    or the CLI's shorthands `method`, `data` (data.train), `index` (model.index) and `steps`. Every key
    and value is checked as in a recipe (`jointrag train --help-config` lists them). `data`,
    `data__dev` and `data__test` also take examples in memory (a list, a `datasets.Dataset`), written to
    `OUT/data/` first. `resume` continues the run in `out` from its checkpoint."""
    from .train.settings import train_with

    return train_with(config, resume=resume, **settings)
