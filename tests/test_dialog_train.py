"""Dialog data through every command: `jointrag dialog-data` (DSTC11 track 5, the OR-QuAC fixture and the
DSTC9/10 track 2 fixture, the latter also through `index`, `eval` and `train`),
the JSONL `history` field, dialog prompts (tagged history, chat messages; QA prompts unchanged), a
tiny CPU training run of every method on dialog data through the CLI, and the dialog metrics of
`jointrag eval`.

The runs use the tiny random models of `conftest.py` and test plumbing, not learning.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_complete_run, assert_user_error, check_method_lines, run, train_argv, write_jsonl
from jointrag import metrics
from jointrag.cli import main
from jointrag.data.corpus import read_passages
from jointrag.data.qa import load_examples, save_examples
from jointrag.data.dialog import dialog_id, load_dialog, split_by_dialog
from jointrag.errors import UserError
from jointrag.evaluation.evaluate import Retrieved, aggregate, score_example
from jointrag.generation.generator import FEW_SHOT_QA, PromptTemplate
from jointrag.types import Example, Passage
from test_generator import CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
DIALOG_TEMPLATE = ROOT / "configs" / "templates" / "dialog.yaml"
ORQUAC = Path(__file__).parent / "fixtures" / "dialog" / "orquac_dev.txt"
DSTC9 = Path(__file__).parent / "fixtures" / "dialog" / "dstc9" / "val"
DSTC11 = ROOT.parent / "shared" / "data" / "dstc11-track5-val"
DIALOG_METRICS = ("bleu1", "bleu4", "rouge_l", "knowledge_precision", "knowledge_recall", "knowledge_f1")
HISTORY = (("user", "Hi, a hotel in the west?"), ("agent", "Hobsons House has 3 stars. "), ("user", "Is it clean?"))
KNOWLEDGE = Passage("hotel/1/faq/0", "Hobsons House", "The rooms are cleaned daily.")

pytestmark = pytest.mark.usefixtures("isolated_home")


# --- jointrag dialog-data ---------------------------------------------------------------------------


def convert(capsys, out: Path, *argv) -> dict:
    code, stdout, err = run(capsys, "dialog-data", "--out", out, *argv, "--json")
    assert code == 0, err
    return json.loads(stdout)


def assert_written(out: Path, examples: list[Example], passages: list[Passage], test_fraction: float, seed: int) -> None:
    """train.jsonl and test.jsonl read back as `split_by_dialog` splits the loaded examples; corpus.jsonl
    reads back as the knowledge passages."""
    train, test = split_by_dialog(examples, test_fraction, seed)
    assert load_examples(out / "train.jsonl") == train
    assert load_examples(out / "test.jsonl") == test
    assert list(read_passages(out / "corpus.jsonl")) == passages
    assert not {dialog_id(e) for e in train} & {dialog_id(e) for e in test}


@pytest.mark.skipif(not DSTC11.is_dir(), reason=f"no DSTC11 data at {DSTC11}")
def test_dialog_data_on_dstc11(capsys, tmp_path):
    out = tmp_path / "dstc11"
    summary = convert(capsys, out, "--format", "dstc11", "--input", DSTC11)
    assert summary["train"]["examples"] + summary["test"]["examples"] == 2129  # knowledge-seeking instances
    assert summary["passages"] == 8013 + 2869  # review sentences and FAQ pairs
    dialogs = summary["train"]["dialogs"] + summary["test"]["dialogs"]
    assert summary["test"]["dialogs"] == round(0.2 * dialogs)
    examples, passages = load_dialog(DSTC11, "dstc11")
    assert_written(out, examples, passages, 0.2, 0)
    first = load_examples(out / "test.jsonl")[0]
    assert first.history[-1][0] == "user" and first.gold_ids and first.question


def test_dialog_data_on_orquac(capsys, tmp_path):
    out = tmp_path / "orquac"
    summary = convert(capsys, out, "--input", ORQUAC, "--test-fraction", "0.5", "--seed", "3", "--last-turns", "0")
    assert summary == {"out": str(out), "passages": 5, "train": {"examples": 3, "dialogs": 1},
                       "test": {"examples": 3, "dialogs": 1}}
    examples, passages = load_dialog(ORQUAC, "orquac", last_turns=None)
    assert_written(out, examples, passages, 0.5, 3)
    code, stdout, err = run(capsys, "dialog-data", "--out", tmp_path / "text", "--input", ORQUAC)
    assert code == 0, err
    assert "3 examples from 1 dialogs" in stdout and "5 passages" in stdout


def test_dialog_data_on_dstc9(capsys, tmp_path):
    """The DSTC9/10 fixture (detected from its knowledge.json): 7 knowledge-seeking turns of 4 dialogs,
    9 FAQ documents; the 3 turns with `target: false` are left out."""
    out = tmp_path / "dstc9"
    summary = convert(capsys, out, "--input", DSTC9, "--test-fraction", "0.5")
    assert summary == {"out": str(out), "passages": 9, "train": {"examples": 4, "dialogs": 2},
                       "test": {"examples": 3, "dialogs": 2}}
    examples, passages = load_dialog(DSTC9, "dstc9")
    assert_written(out, examples, passages, 0.5, 0)
    assert convert(capsys, tmp_path / "named", "--input", DSTC9 / "logs.json", "--format", "dstc9", "--test-fraction", "0.5") == {
        **summary, "out": str(tmp_path / "named")}
    assert_user_error(capsys, "dialog-data", "--input", DSTC9, "--format", "dstc11", "--out", tmp_path / "o",
                      names=("knowledge.json", "'dstc9'"))


def test_dstc9_data_goes_through_index_eval_and_train(capsys, tiny_dir, tmp_path):
    data = tmp_path / "data"
    convert(capsys, data, "--input", DSTC9, "--test-fraction", "0.5")
    files = {"qa": data / "train.jsonl", "test": data / "test.jsonl", "corpus": data / "corpus.jsonl"}
    index = tmp_path / "index"
    code, _, err = run(capsys, "index", "--corpus", files["corpus"], "--out", index, "--retriever", tiny_dir / "encoder",
                       "--precision", "fp32")
    assert code == 0, err
    code, stdout, err = run(capsys, "eval", "--index", index, "--data", files["test"], "-k", "3",
                            "--generator", tiny_dir / "causal", "--template", DIALOG_TEMPLATE, "--max-new-tokens", "4",
                            "--precision", "fp32", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["examples"] == 3 and {"gold_recall@3", "mrr@3", *DIALOG_METRICS} <= result.keys()
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(row["gold_ids"]) == 1 and "/faq/" in row["gold_ids"][0] for row in rows)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *dialog_argv(files, str(index), tiny_dir, out, "rag-sequence"), "--json")
    assert code == 0, err
    assert_dialog_metrics(json.loads(stdout))
    assert_complete_run(out, 2)


def test_dialog_data_errors(capsys, tmp_path):
    afile = write_jsonl(tmp_path / "a.jsonl", [{}])
    assert_user_error(capsys, "dialog-data", "--input", ORQUAC, "--out", afile, names=("--out",))
    assert_user_error(capsys, "dialog-data", "--input", ORQUAC, "--out", tmp_path / "o", "--test-fraction", "1.5",
                      names=("test_fraction",))
    assert_user_error(capsys, "dialog-data", "--input", afile, "--out", tmp_path / "o", names=("a.jsonl",))
    assert_user_error(capsys, "dialog-data", "--input", tmp_path / "missing.txt", "--format", "orquac",
                      "--out", tmp_path / "o", names=("missing.txt",))


# --- the JSONL history field ------------------------------------------------------------------------


def test_jsonl_history_round_trip(tmp_path):
    examples = [
        Example("d#1", "Hobsons House has 3 stars. Is it clean?", ("Yes, daily.",), ("hotel/1/faq/0",), history=HISTORY),
        Example("d#2", "Any Wi-Fi?", ("Yes", "It has Wi-Fi"), (), history=(("user", "Any Wi-Fi?"),)),
        Example("q1", "What is the capital of France?", ("Paris",), ("p0",)),
    ]
    path = tmp_path / "mixed.jsonl"
    save_examples(path, examples)
    assert load_examples(path) == examples
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["history"] == [list(turn) for turn in HISTORY]
    assert "history" not in records[2]  # a QA example is written as before


@pytest.mark.parametrize("history, field, words", [
    ("User: hi", "history", "list of [speaker, text] pairs"),
    ([["user", "hi"], ["agent"]], "history[1]", "pair of strings"),
    ([["user", "hi"], {"speaker": "agent", "text": "yes"}], "history[1]", "pair of strings"),
    ([["user", 3]], "history[0]", "pair of strings"),
    ([["system", "hi"]], "history[0][0]", "'user' or 'agent'"),
])
def test_jsonl_history_errors_name_file_line_and_field(tmp_path, history, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "q", "answers": ["a"]},
        {"question": "q", "answers": ["a"], "history": history},
    ])
    with pytest.raises(UserError) as error:
        load_examples(path)
    assert f"bad.jsonl, line 2, field '{field}'" in str(error.value) and words in str(error.value)


# --- prompts ----------------------------------------------------------------------------------------


def test_dialog_prompt_renders_the_tagged_history():
    from jointrag.generation.generator import load_template

    template = load_template(str(DIALOG_TEMPLATE))
    example = Example("d#1", "Is it clean?", ("Yes.",), history=HISTORY)
    assert template.prompt(example, [KNOWLEDGE]) == (
        "Knowledge: Hobsons House: The rooms are cleaned daily.\n\n"
        "User: Hi, a hotel in the west?\nAgent: Hobsons House has 3 stars.\nUser: Is it clean?\nAgent:"
    )
    renamed = PromptTemplate("{history}\nBot:", user_tag="Guest", agent_tag="Bot")
    assert renamed.prompt(example, []) == "Guest: Hi, a hotel in the west?\nBot: Hobsons House has 3 stars.\nGuest: Is it clean?\nBot:"
    messages = template.prompt(example, [KNOWLEDGE], chat=True)
    assert messages == (
        ("system", "You are a helpful agent. Answer the user with this knowledge:\nHobsons House: The rooms are cleaned daily."),
        ("user", "Hi, a hotel in the west?"), ("assistant", "Hobsons House has 3 stars."), ("user", "Is it clean?"),
    )


def test_qa_prompts_are_unchanged():
    """A QA example (no history) gets the text the template rendered before dialogs existed, chat or not."""
    example = Example("q1", "What is the capital of France?", ("Paris",))
    passages = [Passage("p0", "Paris", "Paris is the capital of France."), KNOWLEDGE]
    default = PromptTemplate()
    expected = FEW_SHOT_QA.format(question=example.question, passages="Title: Paris\nParis is the capital of France.\n\n"
                                  "Title: Hobsons House\nThe rooms are cleaned daily.")
    assert default.prompt(example, passages) == default.prompt(example, passages, chat=True) == expected
    custom = PromptTemplate("{passages} || {question}", "[{index}] {title}: {text}", " ")
    assert custom.prompt(example, passages[:1]) == "[1] Paris: Paris is the capital of France. || What is the capital of France?"


def test_chat_generator_formats_dialog_messages(tiny_dir):
    from jointrag.generation.generator import load_generator

    generator = load_generator(str(tiny_dir / "causal"))
    example = Example("d#1", "Is it clean?", ("Yes.",), history=HISTORY[1:])
    messages = PromptTemplate(passage_template="{title}: {text}", system_template="K: {passages}").prompt(example, [KNOWLEDGE], chat=True)
    with pytest.raises(ValueError, match="chat"):
        generator.format_prompt(messages)
    generator.tokenizer.chat_template = CHAT_TEMPLATE
    generator.chat = True
    assert generator.format_prompt(messages) == (
        "<s>system: K: Hobsons House: The rooms are cleaned daily.</s><s>assistant: Hobsons House has 3 stars.</s>"
        "<s>user: Is it clean?</s><s>assistant:"
    )
    logp, mask = generator.target_logprobs([[messages, "a text prompt"]], ["Yes."])  # (B=1, K=2, T)
    assert logp.shape[:2] == (1, 2) and mask.all()


# --- training on dialog data through the CLI --------------------------------------------------------


@pytest.fixture(scope="module")
def dialog_files(tmp_path_factory) -> dict:
    """The OR-QuAC fixture converted by `jointrag dialog-data`: 3 train and 3 test turns, 5 passages."""
    out = tmp_path_factory.mktemp("dialog-data")
    assert main(["dialog-data", "--input", str(ORQUAC), "--out", str(out), "--test-fraction", "0.5"]) == 0
    return {"qa": out / "train.jsonl", "test": out / "test.jsonl", "corpus": out / "corpus.jsonl"}


@pytest.fixture(scope="module")
def dialog_index(dialog_files, tiny_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dialog-index") / "index"
    assert main(["index", "--corpus", str(dialog_files["corpus"]), "--out", str(out),
                 "--retriever", str(tiny_dir / "encoder"), "--precision", "fp32"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny causal LM with a chat template."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat-model") / "causal"
    shutil.copytree(tiny_dir / "causal", out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def dialog_settings(dialog_files, *sets) -> list[str]:
    return [f"data.dev={dialog_files['test']}", f"model.template={DIALOG_TEMPLATE}", "method.lm_k=2", "method.lm_tau=0.5", *sets]


def dialog_argv(dialog_files, dialog_index, tiny_dir, out, method, *sets) -> list[str]:
    """`jointrag train` on the converted OR-QuAC turns with the dialog prompt (see `train_argv`)."""
    return train_argv(dialog_files, dialog_index, tiny_dir, out, method, 2, *dialog_settings(dialog_files, *sets))


def dialog_trainer(dialog_files, dialog_index, tiny_dir, tmp_path, *sets):
    """A Trainer built as `jointrag train` builds it on the dialog data."""
    from jointrag.config import load_config
    from jointrag.train import Trainer

    return Trainer(load_config(None, [
        "method.name=rag-sequence", f"model.index={dialog_index}", f"data.train={dialog_files['qa']}",
        f"model.generator={tiny_dir / 'causal'}", f"out={tmp_path / 'run'}", "train.precision=fp32",
        *dialog_settings(dialog_files, *sets),
    ]))


def assert_dialog_metrics(values: dict) -> None:
    for key in DIALOG_METRICS:
        assert 0 <= values[key] <= 100, key


@pytest.mark.parametrize("method", ["rag-sequence", "rag-token", "vrag", "jsa", "ra-dit-lm", "ra-dit-lsr"])
def test_every_method_trains_on_dialog_data(capsys, dialog_files, dialog_index, tiny_dir, tmp_path, method):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *dialog_argv(dialog_files, dialog_index, tiny_dir, out, method), "--json")
    assert code == 0, err
    assert_dialog_metrics(json.loads(stdout))
    train = assert_complete_run(out, 2)
    check_method_lines(method, train)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert all(key in evals[0] for key in DIALOG_METRICS)  # the dev evaluation before training, too


def test_the_system_prompts_hold_the_history(dialog_files, dialog_index, tiny_dir, tmp_path):
    system = dialog_trainer(dialog_files, dialog_index, tiny_dir, tmp_path).system
    batch = load_examples(dialog_files["qa"])[1:3]
    answers = [e.answers[0] for e in batch]
    rows = system.search([e.question for e in batch], 3)
    for example, row, passages in zip(batch, system.prompts(batch, rows), system.passages(rows)):  # (B, K)
        tagged = "\n".join(f"{'User' if s == 'user' else 'Agent'}: {t.strip()}" for s, t in example.history)
        assert row == [f"Knowledge: {p.title}: {p.text}\n\n{tagged}\nAgent:" for p in passages]
    with torch.no_grad():
        selected = system.selected_logprobs(batch, rows, system.candidate_mask(rows), answers, "sum")  # (B, K)
        logp, mask = system.target_logprobs(batch, rows, answers)  # (B, K, T)
    torch.testing.assert_close(selected, (logp * mask).sum(-1), atol=1e-4, rtol=1e-5)


def test_a_chat_generator_trains_on_dialog_messages(capsys, dialog_files, dialog_index, tiny_dir, chat_model_dir, tmp_path):
    chat = ("model.chat=true", f"model.generator={chat_model_dir}")
    code, stdout, err = run(capsys, *dialog_argv(dialog_files, dialog_index, tiny_dir, tmp_path / "run", "jsa", *chat), "--json")
    assert code == 0, err
    assert_dialog_metrics(json.loads(stdout))
    system = dialog_trainer(dialog_files, dialog_index, tiny_dir, tmp_path, *chat).system
    batch = load_examples(dialog_files["qa"])[2:]
    prompt = system.prompts(batch, system.search([e.question for e in batch], 1))[0][0]
    roles = {"user": "user", "agent": "assistant"}
    assert prompt[0][0] == "system" and prompt[1:] == tuple((roles[s], t.strip()) for s, t in batch[0].history)
    assert system.generator.format_prompt(prompt).startswith("<s>system: You are a helpful agent.")


def test_lm_scores_of_dialog_examples_are_reused(capsys, dialog_files, dialog_index, tiny_dir, tmp_path):
    """The score file keeps each example's history, so a later run re-checks and reuses it."""
    scores = tmp_path / "scores.jsonl"
    for name in ("a", "b"):
        argv = dialog_argv(dialog_files, dialog_index, tiny_dir, tmp_path / name, "ra-dit-lsr", f"method.lm_scores={scores}")
        code, _, err = run(capsys, *argv)
        assert code == 0, err
    header, *lines = scores.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["history"] and r["history"][-1][0] == "user" for r in records)
    edited = [json.dumps({**r, "history": r["history"][1:]}) for r in records]  # another history, same query
    scores.write_text("\n".join([header, *edited]) + "\n")
    argv = dialog_argv(dialog_files, dialog_index, tiny_dir, tmp_path / "c", "ra-dit-lsr", f"method.lm_scores={scores}")
    assert_user_error(capsys, *argv, names=(str(scores), "example", "history"))  # refused in the first step


# --- evaluation -------------------------------------------------------------------------------------


def test_eval_on_dialog_data_reports_the_dialog_metrics(capsys, dialog_files, dialog_index, tiny_dir, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "eval", "--index", dialog_index, "--data", dialog_files["test"], "-k", "10",
                            "--generator", tiny_dir / "causal", "--template", DIALOG_TEMPLATE, "--max-new-tokens", "4",
                            "--precision", "fp32", "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert {"f1", "gold_recall@1", "gold_recall@10", "mrr@10", *DIALOG_METRICS} <= result.keys()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(row["history"] and "gold_ids" in row and 0 <= row["rouge_l"] <= 1 for row in rows)
    predictions, references = [r["prediction"] for r in rows], [r["answers"] for r in rows]
    assert result["bleu4"] == round(100 * metrics.corpus_bleu(predictions, references), 2)
    assert result["bleu1"] == round(100 * metrics.corpus_bleu(predictions, references, max_order=1), 2)
    top1 = [[r["passages"][0]["id"]] for r in rows]
    assert result["knowledge_f1"] == round(100 * metrics.knowledge_selection(top1, [r["gold_ids"] for r in rows]).f1, 2)


def test_dialog_metrics_aggregate_over_the_dialog_examples_only():
    """Knowledge selection of the top-1 passage by hand: tp 1, fp 1, fn 2 -> P 1/2, R 1/3, F1 2/5."""
    a, b, c, d = (Passage(i, "", "") for i in "abcd")
    rows = [
        score_example(Example("d#1", "q", ("the cat sat on the mat",), ("a", "b"), history=HISTORY),
                      Retrieved([a, c], [0.9, 0.1]), "the cat sat on a mat", 2),
        score_example(Example("e#1", "q", ("a dog",), ("d",), history=HISTORY), Retrieved([c, d], [0.5, 0.4]), "a dog", 2),
        score_example(Example("q1", "q", ("Paris",), ("a",)), Retrieved([a], [1.0]), "London", 2),
    ]
    result = aggregate(rows, 2)
    assert "history" not in rows[2] and rows[2]["rouge_l"] == 0.0  # ROUGE-L is an answer metric, QA rows have it too
    assert (result["knowledge_precision"], result["knowledge_recall"], result["knowledge_f1"]) == (50.0, 33.33, 40.0)
    dialog_predictions = ["the cat sat on a mat", "a dog"], [["the cat sat on the mat"], ["a dog"]]
    assert result["bleu1"] == round(100 * metrics.corpus_bleu(*dialog_predictions, max_order=1), 2)
    assert result["rouge_l"] == round(100 * (metrics.rouge_l("the cat sat on a mat", ["the cat sat on the mat"]) + 1 + 0) / 3, 2)
    qa_only = aggregate(rows[2:], 2)
    assert set(DIALOG_METRICS) & qa_only.keys() == {"rouge_l"} and math.isclose(qa_only["em"], 0.0)
