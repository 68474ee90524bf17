"""The Python API (`jointrag.open`, `Pipeline`, `build_index`, `examples`, `train`, `evaluate`) on the
tiny models: what it returns, that it gives what the CLI prints (the CLI is a layer over it), that it
loads no more than it needs, and the README's example, run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import jointrag
from cli_helpers import run
from conftest import PASSAGES, QA
from jointrag.errors import UserError
from jointrag.types import Example

pytestmark = pytest.mark.usefixtures("isolated_home")  # nothing may build or read the default index in the real home

QUESTIONS = ["What is the capital of France?", "Who won Super Bowl 50?", "What do plants make from light?"]


@pytest.fixture(scope="module")
def rag(index_dir, tiny_dir):
    return jointrag.open(index_dir, generator=str(tiny_dir / "causal"), precision="fp32")


@pytest.fixture(scope="module")
def trained(files, index_dir, tiny_dir, tmp_path_factory):
    """A one-step RAG-Sequence checkpoint trained through `jointrag.train`, its data given as a Dataset."""
    from datasets import Dataset

    out = tmp_path_factory.mktemp("api-train") / "run"
    metrics = jointrag.train({"method": {"name": "rag-sequence", "k": 3}, "train": {"batch_size": 2, "precision": "fp32"}},
                             data=Dataset.from_list(QA), data__dev=files["qa"], index=index_dir, out=out, steps=1,
                             model__generator=str(tiny_dir / "causal"), eval__limit=2, eval__max_new_tokens=3, eval__k=3)
    assert {"em", "f1"} <= metrics.keys()
    return out


def no_loading(*args, **kwargs):
    raise AssertionError("a generator was loaded")


# --- import ---------------------------------------------------------------------------------------


def test_import_jointrag_loads_no_model_library():
    code = "import sys, jointrag; print(sorted(m for m in ('torch', 'transformers', 'jointrag.api') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert set(jointrag.API) <= set(dir(jointrag))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        jointrag.nothing  # noqa: B018


def test_train_is_the_package_and_the_function():
    """`jointrag.train` is the training package and, called, the API's `train`, however it was first reached."""
    import jointrag.train as package
    from jointrag.train import train as loop_train

    assert jointrag.train is package and callable(jointrag.train) and callable(loop_train)
    with pytest.raises(UserError, match="setting train__stepz: unknown key 'train.stepz'"):
        jointrag.train(train__stepz=3)


# --- retrieve ---------------------------------------------------------------------------------------


def test_retrieve_gives_ranked_hits_batched_as_one_by_one(rag, monkeypatch):
    from jointrag import api

    monkeypatch.setattr(api, "load_generator", no_loading)
    together = rag.retrieve(QUESTIONS, k=3)
    assert [len(hits) for hits in together] == [3, 3, 3]
    for question, hits in zip(QUESTIONS, together):
        [alone] = rag.retrieve(question, k=3)  # one question: still a list of lists
        assert [h.id for h in alone] == [h.id for h in hits]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hits], abs=1e-5)
        assert [h.rank for h in hits] == [1, 2, 3] and not any(h.used for h in hits)
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert {h.id: (h.title, h.text) for h in hits} == {p.id: (p.title, p.text) for p in PASSAGES if p.id in {h.id for h in hits}}
    assert rag.retrieve([], k=3) == []


def test_retrieve_is_what_the_cli_prints(rag, index_dir, capsys):
    code, out, _ = run(capsys, "retrieve", "--index", index_dir, "-k", "4", *QUESTIONS, "--json")
    assert code == 0
    printed = json.loads(out)
    for row, hits in zip(printed, rag.retrieve(QUESTIONS, k=4)):
        assert [p["id"] for p in row["passages"]] == [h.id for h in hits]
        assert [p["score"] for p in row["passages"]] == [round(h.score, 4) for h in hits]


@pytest.mark.parametrize("bad, message", [("", "question 1 is empty"), ([3], "question 1: expected a string"), (None, "")])
def test_bad_questions_are_user_errors(rag, bad, message):
    if bad is None:
        with pytest.raises(UserError, match="k must be a whole number of at least 1"):
            rag.retrieve("capital?", k=0)
        return
    with pytest.raises(UserError, match=message):
        rag.retrieve(bad)


# --- answer and stream ---------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["causal", "seq2seq"])
def test_answer_is_what_ask_prints(index_dir, tiny_dir, capsys, generator):
    rag = jointrag.open(index_dir, generator=str(tiny_dir / generator), precision="fp32")
    [answer] = rag.answer(QUESTIONS[0], k=3, contexts=2, max_new_tokens=3)
    code, out, _ = run(capsys, "ask", "--index", index_dir, "--generator", tiny_dir / generator, "--precision", "fp32", "-k", "3",
                       "--contexts", "2", "--max-new-tokens", "3", QUESTIONS[0], "--json")
    assert code == 0
    printed = json.loads(out)
    assert answer.answer == printed["answer"] and answer.question == QUESTIONS[0]
    assert [(h.id, h.used) for h in answer.passages] == [(p["id"], p["used"]) for p in printed["passages"]]
    assert [h.used for h in answer.passages] == [True, True, False] and answer.chosen is None
    assert set(answer.timings) == {"retrieve_s", "generate_s"} and all(t >= 0 for t in answer.timings.values())
    assert answer.to_dict()["passages"][0]["id"] == answer.passages[0].id


def test_answers_of_a_batch_are_those_of_one_question_each(rag):
    together = rag.answer(QUESTIONS, k=3, max_new_tokens=4, batch_size=2)
    assert [a.question for a in together] == QUESTIONS
    assert [a.answer for a in together] == [rag.answer(q, k=3, max_new_tokens=4)[0].answer for q in QUESTIONS]


def test_the_generator_loads_once_and_only_to_answer(index_dir, tiny_dir, monkeypatch):
    from jointrag import api

    loads = []
    real = api.load_generator
    monkeypatch.setattr(api, "load_generator", lambda *a, **k: loads.append(1) or real(*a, **k))
    rag = jointrag.open(index_dir, generator=str(tiny_dir / "causal"))
    rag.retrieve(QUESTIONS)
    assert loads == [] and rag.generator_name is None
    rag.answer(QUESTIONS[0], max_new_tokens=2)
    rag.answer(QUESTIONS[1:], max_new_tokens=2, decode="rag-sequence-fast", k=2)
    assert loads == [1] and rag.generator_name == str(tiny_dir / "causal")


def test_a_rag_decoder_uses_every_passage(rag):
    [answer] = rag.answer(QUESTIONS[0], k=3, decode="rag-token", max_new_tokens=3)
    assert [h.used for h in answer.passages] == [True, True, True]
    with pytest.raises(UserError, match="decode must be one of"):
        rag.answer(QUESTIONS[0], decode="best")
    with pytest.raises(UserError, match="contexts must be a whole number of at least 0"):
        rag.answer(QUESTIONS[0], contexts=-1)


@pytest.mark.parametrize("generator", ["causal", "seq2seq"])
def test_a_streamed_answer_joins_to_the_answer(index_dir, tiny_dir, generator):
    rag = jointrag.open(index_dir, generator=str(tiny_dir / generator), precision="fp32")
    for question in QUESTIONS:
        stream = rag.stream_answer(question, k=3, contexts=2, max_new_tokens=12)
        assert [h.used for h in stream.passages] == [True, True, False] and stream.answer is None  # known before generating
        pieces = list(stream)
        expected = rag.answer(question, k=3, contexts=2, max_new_tokens=12)[0].answer
        assert "".join(pieces) == expected == stream.answer
        assert all(pieces) and (len(pieces) >= 1) == bool(expected)
        assert set(stream.timings) == {"retrieve_s", "generate_s"}
        with pytest.raises(RuntimeError, match="once"):
            list(stream)


def test_only_the_top1_decoder_streams(rag):
    assert rag.streams() and not rag.streams("rag-token")
    with pytest.raises(UserError, match="top1 decoder only, not 'rag-token'"):
        rag.stream_answer(QUESTIONS[0], decode="rag-token")


def test_a_generation_error_is_raised_by_the_iteration(rag, monkeypatch):
    stream = rag.stream_answer(QUESTIONS[0], max_new_tokens=3)
    monkeypatch.setattr(stream._generator, "generate", lambda *a, **k: (_ for _ in ()).throw(UserError("broken model")))
    with pytest.raises(UserError, match="broken model"):
        list(stream)


# --- open ----------------------------------------------------------------------------------------------


def test_open_refuses_what_it_cannot_open(tmp_path, trained, tiny_dir):
    with pytest.raises(UserError, match="not an index"):
        jointrag.open(tmp_path)
    with pytest.raises(UserError, match=f"{trained} is a run directory; open its checkpoint"):
        jointrag.open(trained)
    with pytest.raises(UserError, match="holds its own retriever and generator; generator does not apply"):
        jointrag.open(trained / "checkpoint", generator=str(tiny_dir / "causal"))


def test_a_checkpoint_retrieves_without_its_generator_then_answers_as_ask(trained, capsys, monkeypatch):
    from jointrag.methods import systems
    from jointrag.train import load_trained_index

    rag = jointrag.open(trained / "checkpoint")
    with monkeypatch.context() as patch:
        patch.setattr(systems, "load_generator", no_loading)
        hits = rag.retrieve(QUESTIONS, k=3)
    expected = load_trained_index(trained / "checkpoint")[1].search(QUESTIONS, 3)[1]
    assert [[h.id for h in row] for row in hits] == [[PASSAGES[r].id for r in rows] for rows in expected.tolist()]
    assert rag.decoder() == "top1"
    [answer] = rag.answer(QUESTIONS[0], k=3, max_new_tokens=3)
    code, out, _ = run(capsys, "ask", "--checkpoint", trained / "checkpoint", "-k", "3", "--max-new-tokens", "3", QUESTIONS[0], "--json")
    assert code == 0 and json.loads(out)["answer"] == answer.answer
    assert rag.describe()["checkpoint"] == str(trained / "checkpoint")


# --- build_index and examples -----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["dicts", "passages", "dataset", "file"])
def test_build_index_from_python_or_a_file(source, files, tiny_dir, tmp_path):
    from datasets import Dataset

    dicts = [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES]
    given = {"dicts": dicts, "passages": iter(PASSAGES), "dataset": Dataset.from_list(dicts), "file": files["corpus"]}[source]
    rag = jointrag.build_index(given, tmp_path / "index", retriever=str(tiny_dir / "encoder"), precision="fp32")
    assert rag.index.manifest["count"] == len(PASSAGES)
    assert rag.retrieve("Denver Broncos Super Bowl", k=8)[0][0].id in {p.id for p in PASSAGES}
    assert jointrag.open(tmp_path / "index").retrieve("Rome", k=2)[0] == rag.retrieve("Rome", k=2)[0]


def test_build_index_names_a_bad_passage(tmp_path, tiny_dir):
    with pytest.raises(UserError, match=r"passages\[1\], field 'text': missing"):
        jointrag.build_index([{"id": "a", "text": "fine"}, {"id": "b"}], tmp_path / "index", retriever=str(tiny_dir / "encoder"))
    with pytest.raises(UserError, match="passages: no passages given"):
        jointrag.build_index([], tmp_path / "index", kind="bm25")
    assert not (tmp_path / "index").exists()


def test_examples_from_every_source(files, tmp_path):
    from datasets import Dataset, DatasetDict

    expected = jointrag.examples(files["qa"])
    assert [e.question for e in expected] == [q["question"] for q in QA]
    assert jointrag.examples(QA) == expected
    assert jointrag.examples(Dataset.from_list(QA)) == expected
    assert jointrag.examples(expected) == expected
    squad_style = [{"id": q["id"], "question": q["question"], "answers": {"text": q["answers"], "answer_start": [0]}, "context": "x"}
                   for q in QA]
    assert [e.answers for e in jointrag.examples(Dataset.from_list(squad_style))] == [tuple(q["answers"]) for q in QA]
    assert jointrag.examples([{"question": "q?", "answers": ["a"]}])[0] == Example("examples:1", "q?", ("a",))
    assert len(jointrag.examples()) == 672 and len(jointrag.examples(split="dev")) == 647
    with pytest.raises(UserError, match=r"examples\[1\], field 'answers': missing"):
        jointrag.examples([QA[0], {"question": "no answers?"}])
    with pytest.raises(UserError, match="DatasetDict holds the splits test"):
        jointrag.examples(DatasetDict({"test": Dataset.from_list(QA)}))
    with pytest.raises(UserError, match="got an object"):
        jointrag.examples(QA[0])


# --- train and evaluate ------------------------------------------------------------------------------


def test_settings_are_keywords_a_mapping_or_a_file(tmp_path):
    from jointrag.config import load_config, settings_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: jsa\n  k: 7\ntrain:\n  steps: 3\n")
    expected = load_config(str(recipe), ["data.train=x.jsonl", "out=runs/y"])
    assert settings_config(recipe, {"data": "x.jsonl", "out": Path("runs/y")}) == expected
    assert settings_config({"method": {"name": "jsa", "k": 7}, "train.steps": 3}, {"data__train": "x.jsonl", "out": "runs/y"}) == expected
    assert settings_config(None, {"method": "jsa", "method__k": 7, "steps": 3, "data": "x.jsonl", "out": "runs/y"}) == expected
    assert settings_config(expected) == expected and settings_config(expected) is not expected
    with pytest.raises(UserError, match="setting steps: 'train.steps' must be positive"):
        settings_config(None, {"steps": 0})
    with pytest.raises(UserError, match="config: unknown key 'method.nam'"):
        settings_config({"method": {"nam": "jsa"}})


def test_train_writes_examples_given_in_memory_and_the_checkpoint_opens(trained):
    import yaml

    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["data"]["train"] == str((trained / "data" / "train.jsonl").resolve())
    assert jointrag.examples(trained / "data" / "train.jsonl") == jointrag.examples(QA)
    assert (trained / "checkpoint" / "weights.pt").is_file()


def test_evaluate_is_what_eval_writes(rag, files, index_dir, tiny_dir, tmp_path, capsys):
    argv = ["eval", "--index", index_dir, "--data", files["qa"], "--generator", tiny_dir / "causal", "--precision", "fp32",
            "-k", "3", "--max-new-tokens", "3", "--batch-size", "2", "--out", tmp_path / "cli", "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    metrics = jointrag.evaluate(rag, files["qa"], k=3, max_new_tokens=3, batch_size=2, out=tmp_path / "api")
    assert metrics == json.loads(out) == json.loads((tmp_path / "api" / "metrics.json").read_text())
    assert (tmp_path / "api" / "predictions.jsonl").read_text() == (tmp_path / "cli" / "predictions.jsonl").read_text()
    unsaved = jointrag.evaluate(rag, jointrag.examples(files["qa"]), k=3, max_new_tokens=3, batch_size=2)
    assert unsaved == {**metrics, "data": "examples"}


def test_evaluate_a_dataset_retrieval_only_from_a_path(files, index_dir, monkeypatch):
    from datasets import Dataset

    from jointrag import api

    monkeypatch.setattr(api, "load_generator", no_loading)
    metrics = jointrag.evaluate(index_dir, Dataset.from_list(QA), k=8, retrieval_only=True, name="mine")
    assert metrics["data"] == "mine" and metrics["examples"] == len(QA) and "em" not in metrics
    assert metrics["answer_recall@8"] == 100.0 and metrics["decode"] == "top1"


def test_evaluate_refuses_an_out_another_writer_holds(rag, files, tmp_path):
    from jointrag.io import exclusive

    out = tmp_path / "held"
    with exclusive(out), pytest.raises(UserError, match="another jointrag process"):
        jointrag.evaluate(rag, files["qa"], retrieval_only=True, out=out)
    assert sorted(p.name for p in out.iterdir()) == [".jointrag.lock"]
    with pytest.raises(UserError, match="no questions to evaluate"):
        jointrag.evaluate(rag, [], out=tmp_path / "empty")


# --- the README's example ---------------------------------------------------------------------------


def readme_python_blocks() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_example_runs(tiny_dir, tmp_path, monkeypatch, capsys):
    """The README's code, as written, with the default models swapped for the tiny ones where the
    package finds them (the same code runs with the real ones)."""
    from jointrag.generation import generator
    from jointrag.retrieval import encoders

    monkeypatch.setattr(encoders, "default_retriever_path", lambda: tiny_dir / "encoder")
    monkeypatch.setattr(generator, "default_generator_path", lambda: tiny_dir / "causal")
    monkeypatch.chdir(tmp_path)
    [code] = readme_python_blocks()
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    print(printed)
    assert re.match(r"1 -?\d\.\d{3} \w+ ", printed)
    assert (tmp_path / "runs" / "api-eval" / "predictions.jsonl").is_file()
    assert (tmp_path / "runs" / "api-train" / "checkpoint" / "weights.pt").is_file()
    assert "Answer(question='Into which ocean does the Amazon flow?'" in printed
