"""Knowledge-grounded dialog data: DSTC9/DSTC10 track 2, DSTC11 track 5, MTRAG-UN, OR-QuAC and DoQA
(methods.md §8).

Every loader returns `(examples, passages)`: one `Example` per response to predict, and the
knowledge corpus as `Passage`s (each passage once, in first-seen order). A dialog example is an
`Example` whose fields mean:

- `history`: the (speaker, text) turns before the response, oldest first. Speakers are normalised to
  "user" and "agent": DSTC's "U"/"S" map to them, and in OR-QuAC and DoQA every question is a user
  turn and every answer an agent turn. `render_history` writes them speaker-tagged for a prompt.
- `question`: the retrieval query: the texts of the last `last_turns` history turns, oldest first,
  without speaker tags, joined by " " (`history_query`). The default, 3, is the user's question, the
  agent turn before it and the user turn before that: enough to resolve "it" and "there", while
  encoders that truncate on the right still see the question. None takes every turn.
- `answers`: `(response,)`, the gold next agent turn (DoQA adds its other annotated answers after it).
- `gold_ids`: the ids of the gold knowledge passages (possibly none).
- `id`: `f"{dialog}#{turn}"`, QuAC's own convention (`C_..._q#3`), so that `dialog_id` recovers the
  dialog and `split_by_dialog` keeps every turn of a dialog on one side.

Passage ids per format: DSTC11 `f"{domain}/{entity_id}/faq/{doc_id}"` for an FAQ pair and
`f"{domain}/{entity_id}/review/{doc_id}/{sent_id}"` for one review sentence; DSTC9/10 the same FAQ ids
for its documents (DSTC11's FAQs are DSTC9/10's documents, so the ids agree; `entity_id` is "*" for a
domain-wide document); MTRAG-UN the published `document_id`; OR-QuAC and DoQA, which give passages no
ids, `f"orquac/{h}"` and `f"doqa/{h}"` with `h` the first 16 hex digits of the SHA-1 of the passage
text (stable, and equal texts merge).

Bad input raises `UserError` naming the file and the line (JSON Lines) or the record's JSON path
(`[12].knowledge[0].doc_id`), and the field.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jointrag.data.qa import _field, _get, _id, _object, _parse_json, _read_text, _type_name
from jointrag.errors import UserError, at
from jointrag.io import jsonl_records
from jointrag.types import Example, Passage

DEFAULT_LAST_TURNS = 3
CANNOTANSWER = "CANNOTANSWER"  # QuAC's and DoQA's answer for an unanswerable question, kept verbatim

History = tuple[tuple[str, str], ...]
Loaded = tuple[list[Example], list[Passage]]

_SPEAKERS = {"U": "user", "S": "agent", "user": "user", "agent": "agent"}
_DSTC_LOGS = re.compile(r"(?:.*_)?logs(?=\.json(?:\.gz)?$)")  # logs.json, val_logs.json.gz: matches up to "logs"


# --- public API -------------------------------------------------------------------------------------


def load_dialog(path: str | Path, fmt: str | None = None, last_turns: int | None = DEFAULT_LAST_TURNS) -> Loaded:
    """Read dialog examples and their knowledge corpus from `path` in format `fmt` (one of `FORMATS`).

    When `fmt` is None it is detected: a folder, or a file named like `logs.json`, is DSTC9/10 when
    the entities of its knowledge file hold "docs" and DSTC11 when they hold "faqs" or "reviews"; a
    JSON Lines file is MTRAG-UN when its first record has "input" and "targets" and OR-QuAC when it
    has "evidences"; a JSON document with "data" is DoQA. Anything else must name its format.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown dialog format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    return FORMATS[fmt or _detect_format(path)](path, last_turns=last_turns)


def history_query(history: History, last_turns: int | None = DEFAULT_LAST_TURNS) -> str:
    """The retrieval query: the last `last_turns` turns' texts (all when None) joined by " ", untagged."""
    turns = history if last_turns is None else history[-last_turns:]
    return " ".join(text.strip() for _, text in turns)


def render_history(history: History, user: str = "User", agent: str = "Agent") -> str:
    """The history as speaker-tagged lines for a prompt: "User: ...\\nAgent: ..."."""
    labels = {"user": user, "agent": agent}
    return "\n".join(f"{labels[speaker]}: {text.strip()}" for speaker, text in history)


def dialog_id(example: Example) -> str:
    """The dialog an example belongs to: its id up to the last "#" (the whole id if it has none)."""
    return example.id.rpartition("#")[0] or example.id


def split_by_dialog(
    examples: Sequence[Example],
    test_fraction: float = 0.2,
    seed: int = 0,
    dialog_of: Callable[[Example], str] = dialog_id,
) -> tuple[list[Example], list[Example]]:
    """Split `examples` into (train, test) by dialog: every turn of a dialog lands on the same side.

    The sorted dialog ids are shuffled with `random.Random(seed)` and the first
    round(test_fraction * dialogs) of them (at least 1, at most all but 1) go to test, so the split
    depends only on the set of dialogs and the seed. Each side keeps the input order of examples.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    dialogs = sorted({dialog_of(example) for example in examples})
    if len(dialogs) < 2:
        raise UserError(f"cannot split {len(dialogs)} dialog(s) into train and test; at least 2 are needed")
    random.Random(seed).shuffle(dialogs)
    n_test = min(max(round(test_fraction * len(dialogs)), 1), len(dialogs) - 1)
    test_dialogs = set(dialogs[:n_test])
    train = [example for example in examples if dialog_of(example) not in test_dialogs]
    test = [example for example in examples if dialog_of(example) in test_dialogs]
    return train, test


# --- DSTC11 track 5 and DSTC9/10 track 2 ------------------------------------------------------------


def load_dstc11(
    path: str | Path,
    last_turns: int | None = DEFAULT_LAST_TURNS,
    knowledge_seeking_only: bool = True,
) -> Loaded:
    """DSTC11 track 5 (Zhao et al. 2023): MultiWOZ dialogs with turns asking for reviews and FAQs.

    `path` is a logs file (`logs.json` or `val_logs.json`, optionally `.gz`) or a folder holding one.
    The labels file has the logs file's name with "logs" replaced by "labels", in the same folder;
    `knowledge.json[.gz]` is in the same folder or the one above (the official layout is
    `data/knowledge.json` with `data/val/logs.json`). logs[i] and labels[i] describe instance i.

    The corpus has one passage per review sentence (its text) and per FAQ pair ("question answer"),
    titled with the entity's name. By default only knowledge-seeking instances (`target: true`)
    become examples; with `knowledge_seeking_only=False` the others come too, with no answers and no
    gold ids (for turn detection). DSTC11 gives no dialog ids and the instances are shuffled, so
    the dialog is the first turn's text lower-cased with non-word characters removed (as a 12-digit
    SHA-1 prefix in the id): the instances cut from one dialog share it. Dialogs that open with the
    same words merge, which only makes `split_by_dialog` coarser.
    """
    return _load_dstc(path, "dstc11", _dstc11_knowledge, last_turns, knowledge_seeking_only)


def load_dstc9(
    path: str | Path,
    last_turns: int | None = DEFAULT_LAST_TURNS,
    knowledge_seeking_only: bool = True,
) -> Loaded:
    """DSTC9 track 2 (Kim et al. 2020) and DSTC10 track 2 (Kim et al. 2021): MultiWOZ dialogs with turns
    that need FAQ documents beyond the database. Both use this layout.

    Files as for `load_dstc11` (logs, labels beside them, `knowledge.json[.gz]` there or one folder up);
    DSTC10's extra fields (the ASR `nbest` of its spoken turns) are not read. The knowledge is
    `knowledge[domain][entity_id]` = {"name", "docs": {doc_id: {"title", "body"}}}, with entity "*" (name
    null) holding a domain's general documents (taxi, train). Each document is one passage,
    "title body" (question and answer), titled with the entity's name, or the domain for "*". A label's
    knowledge snippets are `{"domain", "entity_id", "doc_id"}`; a `doc_type` there, if any, must be "faq".
    Instances, targets and dialog ids as for DSTC11, with "dstc9/" ids.
    """
    return _load_dstc(path, "dstc9", _dstc9_knowledge, last_turns, knowledge_seeking_only)


def _load_dstc(
    path: str | Path,
    fmt: str,
    read_knowledge: Callable[[Path], list[Passage]],
    last_turns: int | None,
    knowledge_seeking_only: bool,
) -> Loaded:
    """The instances of a DSTC logs/labels pair and the passages `read_knowledge` finds; `fmt` ("dstc9"
    or "dstc11") prefixes the dialog ids and says how gold snippets are named (`_dstc_gold`)."""
    _check_last_turns(last_turns)
    knowledge_path, logs_path, labels_path = _dstc_files(Path(path))
    passages = read_knowledge(knowledge_path)
    known = {passage.id for passage in passages}
    logs = _json_list(logs_path)
    labels = _json_list(labels_path)
    if len(logs) != len(labels):
        raise UserError(
            f"{at(labels_path)}: {len(labels)} labels for the {len(logs)} instances of {logs_path}; "
            "logs and labels must be aligned lists"
        )
    examples = []
    for i, (log, label) in enumerate(zip(logs, labels)):
        history = _dstc_history(logs_path, i, log)
        label = _object(labels_path, None, f"[{i}]", label)
        target = _field(labels_path, None, label, "target", bool, f"[{i}].")
        if not target and knowledge_seeking_only:
            continue
        answers: tuple[str, ...] = ()
        gold_ids: tuple[str, ...] = ()
        if target:
            answers = (_text(labels_path, None, label, "response", f"[{i}]."),)
            gold_ids = _dstc_gold(labels_path, i, label, known, fmt)
        dialog = f"{fmt}/" + _digest(re.sub(r"\W+", "", history[0][1].lower()), 12)
        examples.append(_example(f"{dialog}#{i}", history, answers, gold_ids, last_turns))
    return examples, passages


def _dstc_files(path: Path) -> tuple[Path, Path, Path]:
    """(knowledge, logs, labels) for a logs file or a folder holding exactly one."""
    logs = path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if _DSTC_LOGS.match(p.name))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise UserError(f"{at(path)}: expected one DSTC logs file (logs.json or *_logs.json), found {names}")
        logs = found[0]
    if not logs.is_file():
        raise UserError(f"{at(logs)}: no such file")
    match = _DSTC_LOGS.match(logs.name)
    if match is None:
        raise UserError(f"{at(logs)}: a DSTC logs file is named logs.json or *_logs.json (optionally .gz)")
    labels = logs.with_name(logs.name[: match.end() - len("logs")] + "labels" + logs.name[match.end() :])
    if not labels.is_file():
        raise UserError(f"{at(logs)}: its labels file {labels.name} is not next to it")
    folders = (logs.parent, logs.parent.parent)
    candidates = [folder / name for folder in folders for name in ("knowledge.json", "knowledge.json.gz")]
    knowledge = next((p for p in candidates if p.is_file()), None)
    if knowledge is None:
        raise UserError(f"{at(logs)}: no knowledge.json(.gz) next to it or in the folder above")
    return knowledge, logs, labels


def _dstc11_knowledge(path: Path) -> list[Passage]:
    """Passages of `knowledge[domain][entity_id]` = {"name", "reviews": {doc_id: {"sentences": {sent_id:
    text}}}, "faqs": {doc_id: {"question", "answer"}}}, in file order, reviews before FAQs."""
    passages = []
    for domain, entity_id, entity in _dstc_entities(path, "dstc11"):
        name = f"{domain}.{entity_id}"
        title = _text(path, None, entity, "name", name + ".")
        for doc_id, review in _field(path, None, entity, "reviews", dict, name + ".").items():
            r_name = f"{name}.reviews.{doc_id}"
            review = _object(path, None, r_name, review)
            for sent_id, sentence in _field(path, None, review, "sentences", dict, r_name + ".").items():
                text = _string(path, None, f"{r_name}.sentences.{sent_id}", sentence)
                passages.append(Passage(f"{domain}/{entity_id}/review/{doc_id}/{sent_id}", title, text))
        passages += _faqs(path, domain, entity_id, entity, title, ("faqs", "question", "answer"))
    return passages


def _dstc9_knowledge(path: Path) -> list[Passage]:
    """Passages of `knowledge[domain][entity_id]` = {"name", "docs": {doc_id: {"title", "body"}}}, in
    file order; "name" may be null (entity "*", a domain's general documents): the domain is the title."""
    passages = []
    for domain, entity_id, entity in _dstc_entities(path, "dstc9"):
        name = f"{domain}.{entity_id}"
        title = _get(path, None, entity, "name", name + ".")
        if title is None:
            title = domain
        elif not isinstance(title, str):
            raise UserError(f"{at(path, None, name + '.name')}: expected a string or null, got {_type_name(title)}")
        passages += _faqs(path, domain, entity_id, entity, title, ("docs", "title", "body"))
    return passages


def _faqs(path: Path, domain: str, entity_id: str, entity: dict, title: str, keys: tuple[str, str, str]) -> list[Passage]:
    """One passage "question answer" per FAQ document of `entity`; `keys` names the documents' field and
    their question and answer fields (DSTC11: faqs, question, answer; DSTC9/10: docs, title, body)."""
    field, question_key, answer_key = keys
    name, passages = f"{domain}.{entity_id}", []
    for doc_id, doc in _field(path, None, entity, field, dict, name + ".").items():
        d_name = f"{name}.{field}.{doc_id}"
        doc = _object(path, None, d_name, doc)
        question = _text(path, None, doc, question_key, d_name + ".")
        answer = _text(path, None, doc, answer_key, d_name + ".")
        passages.append(Passage(f"{domain}/{entity_id}/faq/{doc_id}", title, f"{question} {answer}"))
    return passages


_DSTC_KNOWLEDGE_KEYS = {"dstc11": ("reviews", "faqs"), "dstc9": ("docs",)}


def _dstc_entities(path: Path, fmt: str) -> Iterator[tuple[str, str, dict]]:
    """(domain, entity_id, entity object) for every entity of a DSTC knowledge file, in file order.

    An entity laid out for the other DSTC format is refused with a hint to name that format, instead
    of a missing-field error about the keys it never had."""
    doc = _parse_json(path, _read_text(path))
    for domain, entities in _object(path, None, "(top level)", doc).items():
        for entity_id, entity in _object(path, None, domain, entities).items():
            name = f"{domain}.{entity_id}"
            entity = _object(path, None, name, entity)
            other = _dstc_kind(entity)
            if other is not None and other != fmt:
                keys = " and ".join(f"'{key}'" for key in _DSTC_KNOWLEDGE_KEYS[other])
                raise UserError(f"{at(path, None, name)}: has {keys}, the {other.upper()} knowledge layout; use format '{other}'")
            yield domain, entity_id, entity


def _dstc_kind(entity: Any) -> str | None:
    """The DSTC format an entity's keys say ("docs": dstc9; "faqs" or "reviews": dstc11), or None."""
    if isinstance(entity, dict):
        return next((fmt for fmt, keys in _DSTC_KNOWLEDGE_KEYS.items() if any(key in entity for key in keys)), None)
    return None


def _dstc_format(path: Path) -> str:
    """"dstc9" or "dstc11", from the first entity of the knowledge file that belongs to `path`."""
    knowledge, _, _ = _dstc_files(path)
    doc = _parse_json(knowledge, _read_text(knowledge))
    entities = (e for d in doc.values() if isinstance(d, dict) for e in d.values()) if isinstance(doc, dict) else ()
    kind = next((k for k in map(_dstc_kind, entities) if k is not None), None)
    if kind is None:
        raise UserError(f"{at(knowledge)}: cannot tell DSTC9/10 knowledge (entities with 'docs') from DSTC11 "
                        "(entities with 'faqs' and 'reviews'); pass the format, 'dstc9' or 'dstc11'")
    return kind


def _dstc_history(path: Path, i: int, log: Any) -> History:
    if not isinstance(log, list):
        raise UserError(f"{at(path, None, f'[{i}]')}: expected a list of turns, got {_type_name(log)}")
    if not log:
        raise UserError(f"{at(path, None, f'[{i}]')}: empty dialog")
    return tuple(_turn(path, None, f"[{i}][{j}].", turn) for j, turn in enumerate(log))


def _dstc_gold(path: Path, i: int, label: dict, known: set[str], fmt: str) -> tuple[str, ...]:
    """The passage ids of instance i's knowledge snippets. DSTC11 snippets name their `doc_type`
    ("faq", or "review" with a `sent_id`); DSTC9/10 snippets are documents, FAQ ids, and carry no type."""
    gold = []
    for j, snippet in enumerate(_field(path, None, label, "knowledge", list, f"[{i}].")):
        prefix = f"[{i}].knowledge[{j}]."
        snippet = _object(path, None, prefix[:-1], snippet)
        domain = _text(path, None, snippet, "domain", prefix)
        entity_id = _id(path, None, prefix + "entity_id", _get(path, None, snippet, "entity_id", prefix))
        doc_type = _text(path, None, snippet, "doc_type", prefix) if fmt == "dstc11" or "doc_type" in snippet else "faq"
        doc_id = _id(path, None, prefix + "doc_id", _get(path, None, snippet, "doc_id", prefix))
        if doc_type == "faq":
            snippet_id = f"{domain}/{entity_id}/faq/{doc_id}"
        elif doc_type == "review" and fmt == "dstc11":
            sent_id = _id(path, None, prefix + "sent_id", _get(path, None, snippet, "sent_id", prefix))
            snippet_id = f"{domain}/{entity_id}/review/{doc_id}/{sent_id}"
        elif fmt == "dstc11":
            raise UserError(f"{at(path, None, prefix + 'doc_type')}: expected 'review' or 'faq', got {doc_type!r}")
        else:
            raise UserError(f"{at(path, None, prefix + 'doc_type')}: expected 'faq' (DSTC9/10 knowledge holds FAQ "
                            f"documents only; reviews are DSTC11's), got {doc_type!r}")
        if snippet_id not in known:
            raise UserError(f"{at(path, None, prefix[:-1])}: {snippet_id} is not in the knowledge file")
        gold.append(snippet_id)
    return tuple(dict.fromkeys(gold))


# --- MTRAG-UN ---------------------------------------------------------------------------------------


def load_mtrag(path: str | Path, last_turns: int | None = DEFAULT_LAST_TURNS, collection: str | None = None) -> Loaded:
    """MTRAG-UN generation tasks (IBM mt-rag-benchmark, `reference.jsonl`), one task per line.

    History = `input` (ending with the user's question), response = `targets[0].text`, gold ids = the
    task's `contexts[*].document_id` (none for unanswerable tasks), and the corpus = the union of all
    tasks' contexts by `document_id`, titled with their `title` where given. `collection` (e.g.
    "govt") keeps only the tasks, and so the passages, of that `Collection`. The example id is
    `f"{conversation_id}#{turn}"`; MTRAG's own `task_id` is `f"{conversation_id}<::>{turn}"`.
    """
    _check_last_turns(last_turns)
    path = Path(path)
    examples = []
    passages: dict[str, Passage] = {}
    first_line: dict[str, int] = {}
    collections = set()
    for line, record in _jsonl_records(path):
        collections.add(_text(path, line, record, "Collection"))
        if collection is not None and record["Collection"] != collection:
            continue
        inputs = _field(path, line, record, "input", list)
        if not inputs:
            raise UserError(f"{at(path, line, 'input')}: empty conversation")
        history = tuple(_turn(path, line, f"input[{j}].", turn) for j, turn in enumerate(inputs))
        targets = _field(path, line, record, "targets", list)
        if not targets:
            raise UserError(f"{at(path, line, 'targets')}: empty list; the response is needed")
        response = _text(path, line, _object(path, line, "targets[0]", targets[0]), "text", "targets[0].")
        gold = []
        for j, context in enumerate(_field(path, line, record, "contexts", list)):
            prefix = f"contexts[{j}]."
            context = _object(path, line, prefix[:-1], context)
            doc_id = _text(path, line, context, "document_id", prefix)
            text = _text(path, line, context, "text", prefix)
            title = _text(path, line, context, "title", prefix) if "title" in context else ""
            if doc_id in passages and passages[doc_id].text != text:
                raise UserError(
                    f"{at(path, line, prefix + 'text')}: document {doc_id} has another text on line "
                    f"{first_line[doc_id]}"
                )
            passages.setdefault(doc_id, Passage(doc_id, title, text))
            first_line.setdefault(doc_id, line)
            gold.append(doc_id)
        conversation = _text(path, line, record, "conversation_id")
        turn = _id(path, line, "turn", _get(path, line, record, "turn"))
        gold_ids = tuple(dict.fromkeys(gold))
        examples.append(_example(f"{conversation}#{turn}", history, (response,), gold_ids, last_turns))
    if collection is not None and collection not in collections:
        raise UserError(f"{at(path)}: no task in collection {collection!r}; it has {', '.join(sorted(collections))}")
    return examples, list(passages.values())


# --- OR-QuAC ----------------------------------------------------------------------------------------


def load_orquac(path: str | Path, last_turns: int | None = DEFAULT_LAST_TURNS) -> Loaded:
    """OR-QuAC (Qu et al. 2020), the preprocessed JSON Lines files (`train.txt`, `dev.txt`, `test.txt`).

    Each line is one turn: `qid` ("C_<dialog>_q#<turn>"), `question` (as asked, in context),
    `rewrite` (CANARD's self-contained rewrite; not used, since the query is built from the history
    as for the other sets), `history` (the earlier turns, `[{"question", "answer": {"text", ...}}]`),
    `answer` (`{"text", "answer_start", ...}`; "CANNOTANSWER" is kept verbatim), and `evidences` (passage
    texts) with `retrieval_labels` (1 marks a gold passage; dev and test turns may have none).

    The published collection (`all_blocks.txt`, 11M Wikipedia passages) is not read: the corpus is the
    union of the file's `evidences`, with content-hash ids, and the gold ids are those labelled 1.
    """
    _check_last_turns(last_turns)
    path = Path(path)
    examples = []
    passages: dict[str, Passage] = {}
    for line, record in _jsonl_records(path):
        history = []
        for j, turn in enumerate(_field(path, line, record, "history", list)):
            turn = _object(path, line, f"history[{j}]", turn)
            history.append(("user", _text(path, line, turn, "question", f"history[{j}].")))
            history.append(("agent", _answer_text(path, line, turn, f"history[{j}].")))
        history.append(("user", _text(path, line, record, "question")))
        response = _answer_text(path, line, record)
        evidences = _field(path, line, record, "evidences", list)
        labels = _field(path, line, record, "retrieval_labels", list)
        if len(labels) != len(evidences):
            where = at(path, line, "retrieval_labels")
            raise UserError(f"{where}: {len(labels)} labels for {len(evidences)} evidences; they must align")
        gold = []
        for j, (evidence, label) in enumerate(zip(evidences, labels)):
            text = _string(path, line, f"evidences[{j}]", evidence)
            if label not in (0, 1):
                raise UserError(f"{at(path, line, f'retrieval_labels[{j}]')}: expected 0 or 1, got {label!r}")
            passage_id = _text_id("orquac", text)
            passages.setdefault(passage_id, Passage(passage_id, "", text))
            if label:
                gold.append(passage_id)
        qid = _text(path, line, record, "qid")
        examples.append(_example(qid, tuple(history), (response,), tuple(dict.fromkeys(gold)), last_turns))
    return examples, list(passages.values())


# --- DoQA -------------------------------------------------------------------------------------------


def load_doqa(path: str | Path, last_turns: int | None = DEFAULT_LAST_TURNS) -> Loaded:
    """DoQA v2.1 (Campos et al. 2020): Stack Exchange FAQ dialogs in QuAC's JSON layout.

    `{"data": [{"title", "background", "paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text", "answer_start"}], "orig_answer": {"text", "answer_start"}, ...}]}]}]}`:
    each paragraph is one dialog about one FAQ answer (`context`), its `qas` the turns in order.
    QuAC appends " CANNOTANSWER" to every context so that a span can select it; the passage is the
    context without it, titled with the thread's `title`, and is every turn's gold passage. The
    response is `orig_answer.text` (the answer given in the dialog), else `answers[0].text`; the other
    annotated answers follow it in `answers`. "CANNOTANSWER" is kept verbatim, as in QuAC scoring.
    """
    _check_last_turns(last_turns)
    path = Path(path)
    doc = _object(path, None, "(top level)", _parse_json(path, _read_text(path)))
    examples = []
    passages: dict[str, Passage] = {}
    for i, article in enumerate(_field(path, None, doc, "data", list)):
        name = f"data[{i}]"
        article = _object(path, None, name, article)
        title = _text(path, None, article, "title", name + ".")
        for p, paragraph in enumerate(_field(path, None, article, "paragraphs", list, name + ".")):
            p_name = f"{name}.paragraphs[{p}]"
            paragraph = _object(path, None, p_name, paragraph)
            text = _text(path, None, paragraph, "context", p_name + ".").removesuffix(CANNOTANSWER).rstrip()
            passage_id = _text_id("doqa", text)
            passages.setdefault(passage_id, Passage(passage_id, title, text))
            history: list[tuple[str, str]] = []
            for q, qa in enumerate(_field(path, None, paragraph, "qas", list, p_name + ".")):
                q_name = f"{p_name}.qas[{q}]"
                qa = _object(path, None, q_name, qa)
                history.append(("user", _text(path, None, qa, "question", q_name + ".")))
                answers = _doqa_answers(path, q_name, qa)
                qid = _text(path, None, qa, "id", q_name + ".")
                examples.append(_example(qid, tuple(history), answers, (passage_id,), last_turns))
                history.append(("agent", answers[0]))
    return examples, list(passages.values())


def _doqa_answers(path: Path, q_name: str, qa: dict) -> tuple[str, ...]:
    texts = []
    if "orig_answer" in qa:
        texts.append(_answer_text(path, None, qa, q_name + ".", key="orig_answer"))
    for a, answer in enumerate(_field(path, None, qa, "answers", list, q_name + ".")):
        a_name = f"{q_name}.answers[{a}]"
        texts.append(_text(path, None, _object(path, None, a_name, answer), "text", a_name + "."))
    if not texts:
        where = at(path, None, q_name + ".answers")
        raise UserError(f"{where}: empty list and no 'orig_answer'; the response is needed")
    return tuple(dict.fromkeys(texts))


FORMATS: dict[str, Callable[..., Loaded]] = {
    "dstc9": load_dstc9,
    "dstc11": load_dstc11,
    "mtrag": load_mtrag,
    "orquac": load_orquac,
    "doqa": load_doqa,
}


# --- shared helpers ---------------------------------------------------------------------------------


def _example(
    example_id: str,
    history: History,
    answers: tuple[str, ...],
    gold_ids: tuple[str, ...],
    last_turns: int | None,
) -> Example:
    return Example(example_id, history_query(history, last_turns), answers, gold_ids, history=history)


def _check_last_turns(last_turns: int | None) -> None:
    if last_turns is not None and (isinstance(last_turns, bool) or not isinstance(last_turns, int) or last_turns < 1):
        raise UserError(f"last_turns must be a positive integer or None (all turns), got {last_turns!r}")


def _detect_format(path: Path) -> str:
    if path.is_dir() or _DSTC_LOGS.match(path.name):
        return _dstc_format(path)
    text = _read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
    if isinstance(record, dict):
        if "input" in record and "targets" in record:
            return "mtrag"
        if "evidences" in record:
            return "orquac"
        if "data" in record:
            return "doqa"
    raise UserError(
        f"{at(path)}: cannot tell the dialog format (a DSTC9/10/11 folder or logs file, MTRAG-UN or OR-QuAC "
        f"JSON Lines, DoQA JSON); pass it explicitly, one of: {', '.join(FORMATS)}"
    )


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file."""
    return jsonl_records(path, _read_text(path), objects=True, type_name=_type_name)


def _json_list(path: Path) -> list:
    doc = _parse_json(path, _read_text(path))
    if not isinstance(doc, list):
        raise UserError(f"{at(path)}: expected a JSON list, got {_type_name(doc)}")
    return doc


def _turn(path: Path, line: int | None, prefix: str, turn: Any) -> tuple[str, str]:
    """One {"speaker", "text"} turn as (normalised speaker, text)."""
    turn = _object(path, line, prefix[:-1], turn)
    speaker = _text(path, line, turn, "speaker", prefix)
    if speaker not in _SPEAKERS:
        expected = ", ".join(repr(s) for s in _SPEAKERS)
        raise UserError(f"{at(path, line, prefix + 'speaker')}: expected one of {expected}, got {speaker!r}")
    return _SPEAKERS[speaker], _field(path, line, turn, "text", str, prefix)


def _answer_text(path: Path, line: int | None, obj: dict, prefix: str = "", key: str = "answer") -> str:
    """`obj[key]["text"]`, QuAC's answer object."""
    answer = _field(path, line, obj, key, dict, prefix)
    return _text(path, line, answer, "text", f"{prefix}{key}.")


def _text(path: Path, line: int | None, obj: dict, key: str, prefix: str = "") -> str:
    return _field(path, line, obj, key, str, prefix)


def _string(path: Path, line: int | None, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise UserError(f"{at(path, line, name)}: expected a string, got {_type_name(value)}")
    return value


def _digest(text: str, digits: int) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:digits]


def _text_id(prefix: str, text: str) -> str:
    return f"{prefix}/{_digest(text, 16)}"
