#!/usr/bin/env python3
"""Convert a DPR retriever JSON file (biencoder-nq-train.json[.gz]) into compact QA JSON Lines.

    .venv/bin/python scripts/dpr_to_jsonl.py data/nq/biencoder-nq-train.json.gz data/nq/nq-train.jsonl

jointrag reads DPR JSON itself (`--data FILE.json`, format `dpr`), but as one JSON document: DPR's NQ
training file holds every question's positive, negative and hard-negative passages with their text,
several GB, and each training process would parse all of it. This streams the list one question at a
time and keeps what training reads: `{"id", "question", "answers", "gold_ids"}`, the gold ids being the
`passage_id`s of the question's positive passages (ids of psgs_w100.tsv). Ids are `dpr:<position>`, as
jointrag's own DPR reader names them, so both readings of a file give the same examples.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Iterator, TextIO

CHUNK = 1 << 22  # characters read at a time


def records(stream: TextIO, name: str = "input") -> Iterator[dict]:
    """The objects of a top-level JSON list, one at a time, without holding the whole document."""
    decoder = json.JSONDecoder()
    buffer, position, started, finished = "", 0, False, False
    while True:
        chunk = stream.read(CHUNK)
        buffer = buffer[position:] + chunk
        position = 0
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n,":
                position += 1
            if position >= len(buffer):
                break
            if not started:
                if buffer[position] != "[":
                    raise SystemExit(f"{name}: not a DPR file: expected a JSON list, found {buffer[position]!r}")
                started, position = True, position + 1
                continue
            if buffer[position] == "]":
                finished = True
                break
            try:
                record, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError:
                if not chunk:  # no more text to complete it
                    raise SystemExit(f"{name}: invalid or truncated JSON near character {position} of the last chunk") from None
                break  # the next chunk completes it
            yield record
            position = end
        if finished or not chunk:
            break
    if not finished:
        raise SystemExit(f"{name}: the JSON list is not closed (a truncated file?)")


def convert(source: Path, target: Path) -> int:
    opener = gzip.open if source.name.endswith(".gz") else open
    count = 0
    with opener(source, "rt", encoding="utf-8") as f, open(f"{target}.tmp", "w", encoding="utf-8") as out:
        for i, record in enumerate(records(f, str(source))):
            if not isinstance(record, dict) or "question" not in record or "answers" not in record:
                raise SystemExit(f"{source}: question {i} has no 'question' or 'answers'")
            gold = [str(ctx.get("passage_id", ctx.get("id"))) for ctx in record.get("positive_ctxs", [])
                    if ctx.get("passage_id", ctx.get("id")) is not None]
            out.write(json.dumps({"id": f"dpr:{i}", "question": record["question"], "answers": record["answers"],
                                  "gold_ids": gold}, ensure_ascii=False) + "\n")
            count += 1
    Path(f"{target}.tmp").replace(target)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="DPR retriever JSON, optionally .gz")
    parser.add_argument("target", type=Path, help="QA JSON Lines to write")
    args = parser.parse_args(argv)
    count = convert(args.source, args.target)
    print(f"{args.target}: {count} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
