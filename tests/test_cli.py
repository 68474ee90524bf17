"""Tests for the `jointrag` command line, run in-process on the tiny models: index, retrieve, ask,
eval, and the user errors (exit status 2, one line on stderr, no traceback)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from jointrag.cli import EXIT_USER_ERROR, main
from cli_helpers import assert_user_error, run, train_argv, write_jsonl

QA = [
    {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"], "gold_ids": ["p0"]},
    {"id": "q2", "question": "Who won Super Bowl 50?", "answers": ["Denver Broncos", "Broncos"]},
    {"id": "q3", "question": "What do plants make from light?", "answers": ["sugar"], "gold_ids": ["p7"]},
]

pytestmark = pytest.mark.usefixtures("isolated_home")  # no test may build or read the default index in the real home


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import write_files

    return write_files(tmp_path_factory.mktemp("cli-files"), QA)


@pytest.fixture(scope="module")
def encoder(tiny_dir) -> str:
    return str(tiny_dir / "encoder")


@pytest.fixture(scope="module")
def other_encoder(tiny_dir, tmp_path_factory) -> str:
    """The tiny encoder's architecture and tokenizer with other random weights."""
    directory = tmp_path_factory.mktemp("other-encoder") / "encoder"
    shutil.copytree(tiny_dir / "encoder", directory)
    torch.manual_seed(1)
    BertModel(BertModel.from_pretrained(tiny_dir / "encoder").config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def index_dir(files, encoder, tmp_path_factory) -> str:
    """An exact index of the fixture passages, built once through the CLI and only read after."""
    out = tmp_path_factory.mktemp("cli-index") / "index"
    assert main(["index", "--corpus", str(files["corpus"]), "--out", str(out), "--retriever", encoder]) == 0
    return str(out)






# --- index and retrieve -------------------------------------------------------------------------


def test_index_prints_a_summary(capsys, files, encoder, tmp_path):
    code, out, _ = run(capsys, "index", "--corpus", files["corpus"], "--out", tmp_path / "i", "--retriever", encoder, "--precision", "fp32", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["kind"] == "exact" and summary["count"] == 8 and summary["index"] == str(tmp_path / "i")
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["corpus"]["source"] == str(files["corpus"])
    code, out, _ = run(capsys, "index", "--corpus", files["corpus"], "--out", tmp_path / "i", "--retriever", encoder, "--kind", "flat")
    assert code == 0 and out.startswith("built a flat index of 8 passages")
    code, out, _ = run(capsys, "index", "--corpus", files["corpus"], "--out", tmp_path / "i", "--retriever", encoder)
    assert code == 0 and out.startswith("built an exact index of 8 passages")


def test_retrieve_json(capsys, index_dir):
    code, out, _ = run(capsys, "retrieve", "--index", index_dir, "-k", "3", "What is the capital of France?", "--json")
    assert code == 0
    [result] = json.loads(out)  # a list for one question too
    assert result["question"] == "What is the capital of France?"
    passages = result["passages"]
    assert [p["rank"] for p in passages] == [1, 2, 3]
    assert all(isinstance(p["score"], float) and p["id"].startswith("p") for p in passages)
    assert len({p["id"] for p in passages}) == 3
    assert passages[0]["score"] >= passages[1]["score"] >= passages[2]["score"]


def test_retrieve_several_questions_and_more_than_the_corpus(capsys, index_dir):
    code, out, _ = run(capsys, "retrieve", "--index", index_dir, "-k", "20", "capital of Spain", "Super Bowl", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["question"] for r in rows] == ["capital of Spain", "Super Bowl"]
    assert all(len(r["passages"]) == 8 for r in rows)  # padding is dropped


def test_retrieve_plain(capsys, index_dir):
    code, out, _ = run(capsys, "retrieve", "--index", index_dir, "-k", "2", "Where is the Danube?")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "Q: Where is the Danube?"
    assert len(lines) == 3
    assert all(re.match(r"^\s+\d\. \[-?\d+\.\d{4}\] p\d ", line) for line in lines[1:])


def test_bm25_index(capsys, files, tmp_path):
    out_dir = tmp_path / "bm25"
    code, out, _ = run(capsys, "index", "--corpus", files["corpus"], "--out", out_dir, "--kind", "bm25", "--json")
    assert code == 0 and json.loads(out)["kind"] == "bm25"
    assert json.loads((out_dir / "manifest.json").read_text())["encoder"] is None
    code, out, _ = run(capsys, "retrieve", "--index", out_dir, "-k", "2", "Denver Broncos", "--json")
    assert code == 0
    assert json.loads(out)[0]["passages"][0]["id"] == "p6"
    code, out, _ = run(capsys, "eval", "--index", out_dir, "--data", files["qa"], "--retrieval-only", "-k", "2", "--out", tmp_path / "run", "--json")
    assert code == 0 and json.loads(out)["answer_recall@1"] > 0


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_faiss_index_with_search_params(capsys, files, encoder, tmp_path, kind):
    out_dir = tmp_path / kind
    assert run(capsys, "index", "--corpus", files["corpus"], "--out", out_dir, "--retriever", encoder, "--kind", kind)[0] == 0
    param = "ef_search=8" if kind == "hnsw" else "nprobe=1"
    code, out, _ = run(capsys, "retrieve", "--index", out_dir, "--param", param, "-k", "3", "capital", "--json")
    assert code == 0 and len(json.loads(out)[0]["passages"]) == 3


# --- ask and eval -------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["causal", "seq2seq"])
def test_ask(capsys, index_dir, tiny_dir, generator):
    argv = ["ask", "--index", index_dir, "--generator", tiny_dir / generator, "-k", "3", "--contexts", "2", "--max-new-tokens", "3", "What is the capital of France?"]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["question"] == "What is the capital of France?"
    assert isinstance(result["answer"], str) and "\n" not in result["answer"]
    assert [p["used"] for p in result["passages"]] == [True, True, False]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.startswith("Answer: ") and "(* = given to the generator)" in out


@pytest.mark.parametrize("generator", ["causal", "seq2seq"])
def test_eval(capsys, index_dir, files, tiny_dir, tmp_path, generator):
    out_dir = tmp_path / "run"
    argv = ["eval", "--index", index_dir, "--data", files["qa"], "--generator", tiny_dir / generator, "-k", "3", "--max-new-tokens", "3", "--batch-size", "2", "--out", out_dir]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    printed = json.loads(out)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert printed == metrics
    assert {"em", "f1", "answer_recall@1", "answer_recall@3", "gold_recall@3", "mrr@3"} <= metrics.keys()
    assert metrics["examples"] == len(QA) and metrics["k"] == 3
    assert all(0 <= metrics[key] <= 100 for key in ("em", "f1", "answer_recall@3"))
    predictions = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [q["id"] for q in QA]
    assert all(isinstance(p["prediction"], str) and len(p["passages"]) == 3 for p in predictions)

    code, out, _ = run(capsys, *argv)  # plain output
    assert code == 0 and re.search(r"^em\s+\S+$", out, re.M) and "wrote " in out


def test_eval_retrieval_only(capsys, index_dir, files, tmp_path):
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "eval", "--index", index_dir, "--data", files["qa"], "--retrieval-only", "-k", "8", "--out", out_dir, "--json")
    assert code == 0
    metrics = json.loads(out)
    assert "em" not in metrics and "f1" not in metrics
    assert metrics["answer_recall@8"] == 100.0  # all 8 passages retrieved: every answer is in one
    assert metrics["gold_recall@8"] == 100.0
    predictions = (out_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(QA) and all(json.loads(line)["prediction"] is None for line in predictions)


def test_eval_limit(capsys, index_dir, files, tmp_path):
    code, out, _ = run(capsys, "eval", "--index", index_dir, "--data", files["qa"], "--retrieval-only", "--limit", "2", "--out", tmp_path / "run", "--json")
    assert code == 0 and json.loads(out)["examples"] == 2
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 2


# --- user errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "names"),
    [
        (['{"id": "a", "text": "fine"}', '{"id": "b", "text": broken}'], ("corpus.jsonl, line 2", "invalid JSON")),
        (['{"id": "a", "text": "fine"}', '{"id": "b", "title": "no text"}'], ("corpus.jsonl, line 2", "'text'", "missing")),
        (['{"text": "no id"}'], ("corpus.jsonl, line 1", "'id'", "missing")),
        (['{"id": "a", "text": "fine"}', '{"id": "b", "text": "   "}'], ("'b'", "empty text")),
        (['{"id": "a", "text": "fine"}', '{"id": "a", "text": "again"}'], ("duplicate passage id 'a'",)),
        ([], ("empty",)),
    ],
    ids=["malformed", "missing-text", "missing-id", "empty-passage", "duplicate-id", "empty-corpus"],
)
def test_bad_corpus(capsys, encoder, tmp_path, lines, names):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", lines)
    assert_user_error(capsys, "index", "--corpus", corpus, "--out", tmp_path / "i", "--retriever", encoder, names=names)
    assert not (tmp_path / "i").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]  # no temporary directories


def test_unknown_corpus_suffix(capsys, files, encoder, tmp_path):
    corpus = tmp_path / "corpus.csv"
    shutil.copy(files["corpus"], corpus)
    assert_user_error(capsys, "index", "--corpus", corpus, "--out", tmp_path / "i", "--retriever", encoder, names=("corpus.csv", "format"))


def test_missing_corpus_file(capsys, encoder, tmp_path):
    assert_user_error(capsys, "index", "--corpus", tmp_path / "nope.jsonl", "--out", tmp_path / "i", "--retriever", encoder, names=("nope.jsonl",))


def test_corpus_in_the_wrong_format(capsys, files, encoder, tmp_path):
    assert_user_error(capsys, "index", "--corpus", files["corpus"], "--format", "squad", "--out", tmp_path / "i", "--retriever", encoder, names=("corpus.jsonl",))


@pytest.mark.parametrize("retriever", ["/nonexistent", "empty-dir"])
def test_unreadable_retriever(capsys, files, tmp_path, retriever):
    if retriever == "empty-dir":
        retriever = tmp_path / "empty-dir"
        retriever.mkdir()
    assert_user_error(capsys, "index", "--corpus", files["corpus"], "--out", tmp_path / "i", "--retriever", retriever, names=("retriever", str(retriever)))
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("generator", ["/nonexistent", "empty-dir", "missing.gguf"])
def test_unreadable_generator(capsys, index_dir, files, tmp_path, generator):
    if generator == "empty-dir":
        generator = tmp_path / "empty-dir"
        generator.mkdir()
    elif generator == "missing.gguf":
        generator = tmp_path / "missing.gguf"
    names = ("generator", str(generator))
    assert_user_error(capsys, "ask", "--index", index_dir, "--generator", generator, "Why?", names=names)
    assert_user_error(capsys, "eval", "--index", index_dir, "--data", files["qa"], "--generator", generator, "--out", tmp_path / "run", names=names)


@pytest.mark.parametrize("command", ["retrieve", "ask", "eval"])
def test_index_that_is_not_an_index(capsys, files, tmp_path, command):
    not_index = tmp_path / "not-an-index"
    not_index.mkdir()
    (not_index / "something.txt").write_text("x")
    extra = {"retrieve": ["q"], "ask": ["q"], "eval": ["--data", files["qa"], "--retrieval-only", "--out", tmp_path / "run"]}[command]
    assert_user_error(capsys, command, "--index", not_index, *extra, names=(str(not_index), "not an index"))
    assert_user_error(capsys, command, "--index", tmp_path / "missing", *extra, names=("not an index",))


def test_index_encoder_mismatch(capsys, index_dir, encoder, other_encoder):
    message = assert_user_error(capsys, "retrieve", "--index", index_dir, "--retriever", other_encoder, "q", names=(encoder, other_encoder))
    assert "fingerprint" in message


def test_qa_file_errors(capsys, index_dir, tmp_path):
    missing = write_jsonl(tmp_path / "qa.jsonl", [QA[0], {"id": "q2", "question": "No answers?"}])
    assert_user_error(capsys, "eval", "--index", index_dir, "--data", missing, "--retrieval-only", "--out", tmp_path / "run", names=("qa.jsonl, line 2", "answers"))
    broken = write_jsonl(tmp_path / "broken.jsonl", ['{"question": "x", "answers": ["y"]', ])
    assert_user_error(capsys, "eval", "--index", index_dir, "--data", broken, "--retrieval-only", "--out", tmp_path / "run", names=("broken.jsonl, line 1",))
    assert_user_error(capsys, "eval", "--index", index_dir, "--data", tmp_path / "absent.jsonl", "--retrieval-only", "--out", tmp_path / "run", names=("absent.jsonl",))
    assert not (tmp_path / "run").exists()


def test_bad_param(capsys, index_dir):
    assert_user_error(capsys, "retrieve", "--index", index_dir, "--param", "nprobe", "q", names=("key=value",))


@pytest.mark.parametrize(
    "argv",
    [
        ["retrieve", "-k", "0", "q"],
        ["retrieve", "-k", "-1", "q"],
        ["ask", "--beams", "0", "q"],
        ["ask", "--contexts", "-1", "q"],
        ["eval", "--batch-size", "0"],
        ["eval", "--limit", "0"],
        ["index", "--chunk-words", "0"],
        ["index", "--batch-size", "0"],
    ],
)
def test_counts_must_be_positive(capsys, index_dir, argv):
    """argparse refuses them (status 2, usage on stderr) before any work starts."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:1], *(["--index", index_dir] if argv[0] != "index" else []), *argv[1:]])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "must be at least" in err and "Traceback" not in err


def test_eval_out_that_is_a_file(capsys, index_dir, files, tmp_path):
    out = tmp_path / "metrics.txt"
    out.write_text("keep")
    assert_user_error(capsys, "eval", "--index", index_dir, "--data", files["qa"], "--retrieval-only", "--out", out, names=(str(out), "not a directory"))
    assert out.read_text() == "keep"


def test_index_out_that_is_a_file(capsys, files, encoder, tmp_path):
    out = tmp_path / "index"
    out.write_text("keep")
    assert_user_error(capsys, "index", "--corpus", files["corpus"], "--out", out, "--retriever", encoder, names=(str(out), "is not a directory"))
    assert out.read_text() == "keep"


def test_build_into_a_directory_that_is_not_an_index(capsys, files, encoder, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_user_error(capsys, "index", "--corpus", files["corpus"], "--out", out, "--retriever", encoder, names=(str(out), "not an index"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_failed_index_run_keeps_the_existing_index(capsys, files, encoder, tmp_path):
    out = tmp_path / "index"
    assert run(capsys, "index", "--corpus", files["corpus"], "--out", out, "--retriever", encoder)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    query = ["retrieve", "--index", out, "-k", "3", "capital of Italy", "--json"]
    code, expected, _ = run(capsys, *query)
    assert code == 0

    # a corpus whose third line is broken: two passages are read before the reader fails
    good = files["corpus"].read_text().splitlines()
    bad = write_jsonl(tmp_path / "bad.jsonl", good[:2] + ['{"id": "x", "text": '] + good[2:])
    assert_user_error(capsys, "index", "--corpus", bad, "--out", out, "--retriever", encoder, names=("bad.jsonl, line 3",))
    assert_user_error(capsys, "index", "--corpus", files["corpus"], "--out", out, "--retriever", "/nonexistent")

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "index"]
    code, out_again, _ = run(capsys, *query)
    assert code == 0 and out_again == expected


def test_prompt_template_file(tmp_path):
    from jointrag.generation.generator import load_template
    from jointrag.errors import UserError

    good = tmp_path / "t.yaml"
    good.write_text('template: "Q: {question}\\nC: {passages}\\nA:"\nseparator: " | "\n')
    assert load_template(str(good)).render("why?", []) == "Q: why?\nC: \nA:"
    unknown = tmp_path / "u.yaml"
    unknown.write_text("template: '{question}'\nsystem: hi\n")
    with pytest.raises(UserError, match="u.yaml"):
        load_template(str(unknown))
    placeholder = tmp_path / "p.yaml"
    placeholder.write_text("template: '{query}'\n")
    with pytest.raises(UserError, match="p.yaml, field 'template'.*query"):
        load_template(str(placeholder))


# --- which questions are evaluated ----------------------------------------------------------------------


def test_training_on_your_data_needs_your_dev_questions_or_says_embedded(capsys, files, index_dir, tiny_dir, tmp_path):
    argv = [a for a in train_argv(files, index_dir, tiny_dir, tmp_path / "run", "rag-sequence", 1) if not a.startswith("data.dev=")]
    argv.remove("--set")  # the one before data.dev
    assert_user_error(capsys, *argv, names=("data.dev is not set while data.train is", "data.dev=embedded"))
    assert not (tmp_path / "run").exists()  # refused before any model loads or anything is written


def test_held_out_examples_follow_the_settings(files):
    from jointrag.config import load_config
    from jointrag.data.qa import embedded_examples, load_examples
    from jointrag.train.build import held_out

    def ids(examples):
        return [e.id for e in examples]

    assert ids(held_out(load_config(None, []), "dev")) == ids(embedded_examples("dev"))
    assert ids(held_out(load_config(None, [f"data.train={files['qa']}", "data.dev=embedded"]), "dev")) == ids(embedded_examples("dev"))
    assert ids(held_out(load_config(None, [f"data.train={files['qa']}", f"data.test={files['qa']}"]), "test")) == ids(load_examples(files["qa"]))


def test_eval_of_a_checkpoint_trained_on_your_data_asks_which_questions(capsys, files, index_dir, tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 1, "eval.limit=1")) == 0
    capsys.readouterr()
    assert_user_error(capsys, "eval", "--checkpoint", out / "checkpoint", "--limit", "1", "--out", tmp_path / "ev",
                      names=(f"was trained on {files['qa']}", "--data FILE", "--split test"))
    code, _, err = run(capsys, "eval", "--checkpoint", out / "checkpoint", "--data", files["qa"], "--limit", "1",
                       "--max-new-tokens", "2", "--out", tmp_path / "ev")
    assert code == 0, err


def test_a_checkpoint_trained_with_relative_paths_evaluates_from_anywhere(capsys, files, index_dir, tiny_dir, tmp_path, monkeypatch):
    import os

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = {name: os.path.relpath(path, tmp_path / "a") for name, path in (("index", index_dir), ("qa", files["qa"]))}
    argv = train_argv({**files, "qa": relative["qa"]}, relative["index"], tiny_dir, "run", "rag-sequence", 1, "eval.limit=1")
    assert main(argv) == 0
    saved = (tmp_path / "a" / "run" / "checkpoint" / "config.yaml").read_text()
    assert f"index: {Path(index_dir).resolve()}" in saved and f"train: {Path(files['qa']).resolve()}" in saved
    monkeypatch.chdir(tmp_path / "b")
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "a" / "run" / "checkpoint", "--data", files["qa"], "--limit", "1",
                       "--max-new-tokens", "2", "--out", "ev")
    assert code == 0, err


def test_train_refuses_an_out_it_cannot_write_or_whose_config_is_the_users(capsys, files, index_dir, tiny_dir, tmp_path):
    recipe = tmp_path / "mine" / "config.yaml"
    recipe.parent.mkdir()
    recipe.write_text("train:\n  steps: 3\n")
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, recipe.parent, "rag-sequence", 1),
                      names=(str(recipe), "not one a jointrag run wrote"))
    assert recipe.read_text() == "train:\n  steps: 3\n"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, blocker / "run", "rag-sequence", 1),
                      names=("cannot create or write it", str(blocker)))
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, blocker, "rag-sequence", 1), names=("is not a directory",))
    # a run's own config.yaml (a run killed before its first checkpoint) is no reason to refuse
    run_dir = tmp_path / "run"
    assert main(train_argv(files, index_dir, tiny_dir, run_dir, "rag-sequence", 1, "eval.limit=1")) == 0
    shutil.rmtree(run_dir / "checkpoint")
    (run_dir / "metrics.jsonl").unlink()
    assert main(train_argv(files, index_dir, tiny_dir, run_dir, "rag-sequence", 1, "eval.limit=1")) == 0


def test_resume_continues_with_the_runs_own_settings(capsys, files, index_dir, tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 1, "eval.limit=1")) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", "2")  # no --config, --index, --data or tiny models
    assert code == 0, err
    assert f"resuming with the settings of {out / 'config.yaml'}" in err
    import yaml

    saved = yaml.safe_load((out / "checkpoint" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["model"]["generator"] == str((tiny_dir / "causal").resolve())
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 2


def test_resume_refuses_a_silent_change_of_precision(capsys, files, index_dir, tiny_dir, tmp_path, monkeypatch):
    """A run trained at fp32, resumed where `auto` means bf16, is refused before the models load, naming
    the checkpoint and both ways on; an explicit precision continues and says so."""
    import jointrag.runtime

    out = tmp_path / "run"
    assert main(train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 1, "eval.limit=1")) == 0
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)["precision"] == "fp32"
    capsys.readouterr()
    monkeypatch.setattr(jointrag.runtime, "bf16_supported", lambda device: True)
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 2, "eval.limit=1",
                                          "train.precision=auto"), "--resume",
                      names=(str(out / "checkpoint"), "was trained at fp32", "auto means bf16",
                             "--set train.precision=fp32", "--set train.precision=bf16"))
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 1
    code, _, err = run(capsys, *train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 2, "eval.limit=1",
                                           "train.precision=bf16"), "--resume")
    assert code == 0, err
    assert f"{out / 'checkpoint'} was trained at fp32; it continues at bf16" in err
    saved = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    assert saved["step"] == 2 and saved["precision"] == "bf16"


def test_the_default_index_lives_in_jointrag_home(monkeypatch, tmp_path):
    from jointrag.retrieval.resolve import default_index_dir

    monkeypatch.setenv("JOINTRAG_HOME", str(tmp_path / "home"))
    assert default_index_dir() == tmp_path / "home" / "indexes" / "squad-v1.1-dev-minilm"
