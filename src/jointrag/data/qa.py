"""Load QA examples (question, reference answers, gold passage ids) from the common file formats.

Every loader returns `list[Example]`. Bad input raises `UserError` whose message names the file and,
where it applies, the line (JSON Lines) or the field (a JSON path such as `data[0].title`), so that a
user can find and fix the offending record without a traceback.

Our JSON Lines format may also carry a dialog `history` (`[[speaker, text], ...]`, speaker "user" or
"agent"); `save_examples` writes it, so dialog data converted once (`jointrag dialog-data`) is read
by every command like QA data.

Answers are deduplicated with their order kept, in every format: duplicates carry no information for
max-over-answers metrics and SQuAD repeats the same span once per annotator.

A question with no answers is unanswerable (`metrics` scores abstaining on it; training skips it,
having no target). Only an explicit mark makes one, so that a lost answer is still an error: in JSON
Lines `"answers": []`, where blank answers are dropped (ClapNQ gives its unanswerable questions the
answer "", so `[""]` is unanswerable too), and in SQuAD a question with `"is_impossible": true` (SQuAD
2.0). NQ-open's `answer` and DPR's `answers` must not be empty: those sets have no unanswerable
questions.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from jointrag.errors import UserError, at
from jointrag.io import jsonl_records, write_jsonl
from jointrag.types import Example

FORMATS = ("squad", "jsonl", "dpr", "nq-open")
SPLITS = ("train", "dev", "test", "all")
SPEAKERS = ("user", "agent")

EMBEDDED_SQUAD = Path(__file__).parent.parent / "resources" / "squad-v1.1-dev-part-a.json.gz"

_JSONL_FORMATS = ("jsonl", "nq-open")
_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


# --- public API -------------------------------------------------------------------------------------


def load_examples(path: str | Path, fmt: str | None = None) -> list[Example]:
    """Read QA examples from `path` in format `fmt` (one of `FORMATS`), or detect the format.

    Detection, when `fmt` is None: a `.jsonl` file is JSON Lines (which covers NQ-open); a `.json`
    file is SQuAD when its top level is an object with "data" and DPR when it is a list. A trailing
    `.gz` means gzip and is otherwise ignored.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown QA format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    text = _read_text(path)
    if fmt is None:
        fmt = _format_from_suffix(path)
    if fmt in _JSONL_FORMATS:
        return _parse_jsonl(path, text)
    doc = _parse_json(path, text)
    if fmt == "json":
        fmt = _format_from_document(path, doc)
    if fmt == "squad":
        return _parse_squad(path, doc)
    return _parse_dpr(path, doc)


def read_examples(source: Any = None, *, format: str | None = None, split: str = "test") -> list[Example]:
    """Examples from any source the Python API takes: None (the embedded split `split`), a QA file's
    path (`load_examples`, in `format` or detected), or an iterable of `Example`s or of mappings with
    the fields of a JSON Lines record, such as a Python list of dicts or a `datasets.Dataset`
    (`examples_from_records`)."""
    if source is None:
        return embedded_examples(split)
    if isinstance(source, (str, os.PathLike)):
        return load_examples(source, format)
    datasets = sys.modules.get("datasets")  # only a program that imported it can hold a DatasetDict
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        raise UserError(f"examples: a DatasetDict holds the splits {', '.join(source)}; pass one of them, e.g. data['test']")
    if isinstance(source, (Mapping, bytes)) or not isinstance(source, Iterable):
        raise UserError(f"examples: expected a QA file's path, a list of examples or a datasets.Dataset, got {_type_name(source)}")
    return examples_from_records(source)


def examples_from_records(records: Iterable[Any], source: str = "examples") -> list[Example]:
    """Examples from Python values: `Example`s as they are, or mappings read as JSON Lines records
    (`question`, `answers`, optional `id`, `gold_ids`, `history`; other keys are ignored). `answers`
    may also be a mapping with a `text` list, as the SQuAD sets of the Hugging Face hub give it. A
    record without an id gets `source:N` (N from 1); an error names the record as `source[i]`."""
    examples = []
    for i, record in enumerate(records):
        if isinstance(record, Example):
            examples.append(record)
            continue
        where = Path(f"{source}[{i}]")
        if not isinstance(record, Mapping):
            raise UserError(f"{where}: expected a mapping with 'question' and 'answers', got {_type_name(record)}")
        record = dict(record)
        if isinstance(record.get("answers"), Mapping) and "text" in record["answers"]:
            record["answers"] = record["answers"]["text"]
        record.setdefault("id", f"{source}:{i + 1}")
        examples.append(_jsonl_example(where, None, record))
    return examples


def save_examples(path: str | Path, examples: Iterable[Example]) -> None:
    """Write examples as JSON Lines that `load_examples` reads back equal: `id`, `question`, `answers`,
    `gold_ids`, and `history` where there is one. `exclude` is not written."""
    write_jsonl(path, (_example_record(e) for e in examples))


def _example_record(example: Example) -> dict:
    record = {"id": example.id, "question": example.question, "answers": list(example.answers),
              "gold_ids": list(example.gold_ids)}
    if example.history:
        record["history"] = [list(turn) for turn in example.history]
    return record


def split_of_article(i: int) -> str:
    """The embedded-SQuAD split of article `i` (0-based, file order).

    Rule: dev if i % 6 == 4, test if i % 6 == 5, else train. Splitting by article (not by question)
    keeps test questions on articles that training never asked about; with 24 articles this gives
    16 / 4 / 4 articles.
    """
    return {4: "dev", 5: "test"}.get(i % 6, "train")


def embedded_examples(split: str) -> list[Example]:
    """The questions of the embedded SQuAD v1.1 dev part a (24 articles, 4961 questions) in `split`.

    `split` is "train", "dev" or "test" (the fixed article split of `split_of_article`), or "all".
    Gold ids are `f"{title}#{paragraph_index}"`, matching the ids of the embedded corpus.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    return [
        example
        for i, article in enumerate(_embedded_articles())
        if split == "all" or split_of_article(i) == split
        for example in article
    ]


# --- reading and format detection -------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file's text, gunzipped when its name ends in `.gz`; unreadable files are user errors."""
    if not path.exists():
        raise UserError(f"{at(path)}: no such file")
    if not path.is_file():
        raise UserError(f"{at(path)}: not a file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8-sig") as f:
                return f.read()
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{at(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError) as e:  # gzip reports a corrupt or truncated file this way
        raise UserError(f"{at(path)}: cannot read: {e}") from e


def _format_from_suffix(path: Path) -> str:
    """The format a file name implies: "jsonl", or "json" when the document must say SQuAD or DPR."""
    suffixes = path.suffixes[:-1] if path.suffix == ".gz" else path.suffixes
    suffix = suffixes[-1] if suffixes else ""
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    raise UserError(
        f"{at(path)}: cannot tell the QA format from the name (expected .json, .jsonl, optionally "
        f"with .gz); pass the format explicitly, one of: {', '.join(FORMATS)}"
    )


def _format_from_document(path: Path, doc: Any) -> str:
    if isinstance(doc, dict) and "data" in doc:
        return "squad"
    if isinstance(doc, list):
        return "dpr"
    raise UserError(
        f"{at(path)}: neither SQuAD (an object with 'data') nor DPR (a list of questions); "
        f"the top level is {_type_name(doc)}"
    )


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (is it JSON Lines? then use format 'jsonl')" if e.msg == "Extra data" else ""
        raise UserError(f"{at(path, e.lineno)}: invalid JSON: {e.msg}{hint}") from e


def _stem(path: Path) -> str:
    """The file name without `.gz` and without its format suffix: `nq.jsonl.gz` -> `nq`."""
    name = path.name.removesuffix(".gz")
    return name.rsplit(".", 1)[0] if "." in name else name


# --- JSON Lines (and NQ-open) -----------------------------------------------------------------------


def _parse_jsonl(path: Path, text: str) -> list[Example]:
    _reject_json_document(path, text)
    records = jsonl_records(path, text, objects=True, type_name=_type_name)
    return [_jsonl_example(path, line_no, record) for line_no, record in records]


def _reject_json_document(path: Path, text: str) -> None:
    """Refuse a SQuAD or DPR document given as JSON Lines, rather than report a baffling field error.

    Only a one-value file parses as a whole; a real multi-line JSONL file fails fast after line 1.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(doc, dict) and "data" in doc:
        raise UserError(f"{at(path)}: this is a SQuAD JSON file, not JSON Lines; use format 'squad'")
    if isinstance(doc, list):
        raise UserError(f"{at(path)}: this is a JSON list (DPR?), not JSON Lines; use format 'dpr'")


def _jsonl_example(path: Path, line: int, record: dict) -> Example:
    question = _question(path, line, record, "question")
    if "answers" in record:
        answers = _strings(path, line, "answers", record["answers"], allow_empty=True)
        answers = tuple(answer for answer in answers if answer.strip())  # none: unanswerable
    elif "answer" in record:  # NQ-open spells it "answer", as a list (some files use one string)
        answers = _strings(path, line, "answer", record["answer"], allow_str=True)
    else:
        raise UserError(f"{at(path, line, 'answers')}: missing field (or 'answer', as in NQ-open)")
    example_id = f"{_stem(path)}:{line}"
    if "id" in record:
        example_id = _id(path, line, "id", record["id"])
    gold_ids: tuple[str, ...] = ()
    if "gold_ids" in record:
        gold_ids = _strings(path, line, "gold_ids", record["gold_ids"], allow_empty=True)
    history = _history(path, line, record["history"]) if "history" in record else ()
    return Example(id=example_id, question=question, answers=answers, gold_ids=gold_ids, history=history)


def _history(path: Path, line: int, value: Any) -> tuple[tuple[str, str], ...]:
    """A dialog history: a list of [speaker, text] pairs of strings, speaker "user" or "agent"."""
    if not isinstance(value, list):
        raise UserError(f"{at(path, line, 'history')}: expected a list of [speaker, text] pairs, got {_type_name(value)}")
    for j, turn in enumerate(value):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(v, str) for v in turn)):
            raise UserError(f"{at(path, line, f'history[{j}]')}: expected a [speaker, text] pair of strings, got {json.dumps(turn)[:80]}")
        if turn[0] not in SPEAKERS:
            raise UserError(f"{at(path, line, f'history[{j}][0]')}: expected speaker 'user' or 'agent', got {turn[0]!r}")
    return tuple((speaker, text) for speaker, text in value)


# --- SQuAD v1.1 -------------------------------------------------------------------------------------


def _parse_squad(path: Path, doc: Any) -> list[Example]:
    articles = _squad_articles(path, doc)
    return [ex for i, article in enumerate(articles) for ex in _squad_article_examples(path, i, article)]


def _squad_articles(path: Path, doc: Any) -> list[Any]:
    if not isinstance(doc, dict):
        hint = " (a DPR file? use format 'dpr')" if isinstance(doc, list) else ""
        raise UserError(f"{at(path)}: expected a SQuAD object with 'data', got {_type_name(doc)}{hint}")
    return _field(path, None, doc, "data", list)


def _squad_article_examples(path: Path, i: int, article: Any) -> list[Example]:
    """The questions of article `i`; each one's gold passage is `f"{title}#{paragraph_index}"`."""
    name = f"data[{i}]"
    article = _object(path, None, name, article)
    title = _field(path, None, article, "title", str, name + ".")
    examples = []
    for p, paragraph in enumerate(_field(path, None, article, "paragraphs", list, name + ".")):
        p_name = f"{name}.paragraphs[{p}]"
        paragraph = _object(path, None, p_name, paragraph)
        for q, qa in enumerate(_field(path, None, paragraph, "qas", list, p_name + ".")):
            q_name = f"{p_name}.qas[{q}]"
            qa = _object(path, None, q_name, qa)
            examples.append(
                Example(
                    id=_field(path, None, qa, "id", str, q_name + "."),
                    question=_question(path, None, qa, "question", q_name + "."),
                    answers=_squad_answers(path, q_name, qa),
                    gold_ids=(f"{title}#{p}",),
                )
            )
    return examples


def _squad_answers(path: Path, q_name: str, qa: dict) -> tuple[str, ...]:
    texts = []
    for a, answer in enumerate(_field(path, None, qa, "answers", list, q_name + ".")):
        a_name = f"{q_name}.answers[{a}]"
        texts.append(_field(path, None, _object(path, None, a_name, answer), "text", str, a_name + "."))
    if not texts and qa.get("is_impossible") is not True:
        where = at(path, None, q_name + ".answers")
        raise UserError(f"{where}: empty list; answers are needed to evaluate (mark an unanswerable question \"is_impossible\": true)")
    return tuple(dict.fromkeys(texts))


@lru_cache(maxsize=1)
def _embedded_articles() -> tuple[tuple[Example, ...], ...]:
    """The embedded SQuAD file parsed once per process, grouped by article for splitting."""
    doc = _parse_json(EMBEDDED_SQUAD, _read_text(EMBEDDED_SQUAD))
    articles = _squad_articles(EMBEDDED_SQUAD, doc)
    return tuple(tuple(_squad_article_examples(EMBEDDED_SQUAD, i, a)) for i, a in enumerate(articles))


# --- DPR retriever JSON -----------------------------------------------------------------------------


def _parse_dpr(path: Path, doc: Any) -> list[Example]:
    if not isinstance(doc, list):
        hint = " (a SQuAD file? use format 'squad')" if isinstance(doc, dict) and "data" in doc else ""
        raise UserError(f"{at(path)}: expected a DPR list of questions, got {_type_name(doc)}{hint}")
    return [_dpr_example(path, i, record) for i, record in enumerate(doc)]


def _dpr_example(path: Path, i: int, record: Any) -> Example:
    """One DPR question; its gold ids are its positive contexts' ids (none if it lists none)."""
    prefix = f"[{i}]."
    record = _object(path, None, f"[{i}]", record)
    question = _question(path, None, record, "question", prefix)
    answers = _strings(path, None, prefix + "answers", _get(path, None, record, "answers", prefix))
    ctxs = _field(path, None, record, "positive_ctxs", list, prefix) if "positive_ctxs" in record else []
    gold_ids = []
    for j, ctx in enumerate(ctxs):
        ctx_name = f"{prefix}positive_ctxs[{j}]"
        ctx = _object(path, None, ctx_name, ctx)
        if "passage_id" not in ctx and "id" not in ctx:
            raise UserError(f"{at(path, None, ctx_name + '.passage_id')}: missing field (or 'id')")
        key = "passage_id" if "passage_id" in ctx else "id"
        gold_ids.append(_id(path, None, f"{ctx_name}.{key}", ctx[key]))
    return Example(id=f"dpr:{i}", question=question, answers=answers, gold_ids=tuple(gold_ids))


# --- field validation -------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _get(path: Path, line: int | None, obj: dict, key: str, prefix: str = "") -> Any:
    """`obj[key]`, which must exist; the error names the field as `prefix + key`."""
    if key not in obj:
        raise UserError(f"{at(path, line, prefix + key)}: missing field")
    return obj[key]


def _field(path: Path, line: int | None, obj: dict, key: str, kind: type, prefix: str = "") -> Any:
    """`obj[key]`, which must exist and be of type `kind`; the error names it as `prefix + key`."""
    value = _get(path, line, obj, key, prefix)
    if not isinstance(value, kind):
        where = at(path, line, prefix + key)
        raise UserError(f"{where}: expected {_JSON_TYPE_NAMES[kind]}, got {_type_name(value)}")
    return value


def _object(path: Path, line: int | None, name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{at(path, line, name)}: expected an object, got {_type_name(value)}")
    return value


def _question(path: Path, line: int | None, obj: dict, key: str, prefix: str = "") -> str:
    question = _field(path, line, obj, key, str, prefix)
    if not question.strip():
        raise UserError(f"{at(path, line, prefix + key)}: empty question")
    return question


def _strings(
    path: Path,
    line: int | None,
    name: str,
    value: Any,
    *,
    allow_str: bool = False,
    allow_empty: bool = False,
) -> tuple[str, ...]:
    """A non-empty list of strings (or one string, if `allow_str`) as a deduplicated tuple."""
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{at(path, line, name)}: expected a list of strings, got {_describe(value)}")
    if not value and not allow_empty:
        hint = " (an unanswerable question has \"answers\": [] in JSON Lines)" if name == "answer" else ""
        raise UserError(f"{at(path, line, name)}: empty list; answers are needed to evaluate{hint}")
    return tuple(dict.fromkeys(value))


def _describe(value: Any) -> str:
    if isinstance(value, list):
        bad = next(v for v in value if not isinstance(v, str))
        return f"a list containing {_type_name(bad)}"
    return _type_name(value)


def _id(path: Path, line: int | None, name: str, value: Any) -> str:
    """An id given as a string or an integer (DPR files use both), as a string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        where = at(path, line, name)
        raise UserError(f"{where}: expected a string or integer id, got {_type_name(value)}")
    return str(value)


def corpus_examples(corpus, count: int, words: int, seed: int) -> list[Example]:
    """RA-DIT's corpus-derived examples: x = the first `words` words of a passage, y = its last `words`.

    `count` passages with at least 2 * `words` words are drawn from `corpus` (a `Corpus`) in a seeded
    random order, repeating only when it has fewer. Each example excludes its own passage from
    retrieval (`Example.exclude`): that passage holds y.
    """
    order = np.random.default_rng(seed).permutation(len(corpus))
    picked: list[Example] = []
    for row in order.tolist():
        if len(picked) == count:
            break
        passage = corpus[row]
        tokens = passage.text.split()
        if len(tokens) >= 2 * words:
            picked.append(Example(f"corpus:{passage.id}", " ".join(tokens[:words]), (" ".join(tokens[-words:]),),
                                  exclude=(passage.id,)))
    if not picked and count:
        raise UserError(f"no passage of the corpus has {2 * words} words for corpus-derived examples; lower method.corpus_words")
    return [picked[i % len(picked)] for i in range(count)]
