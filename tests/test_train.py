"""Tests for training: a tiny CPU run of every method through the CLI, which parameters each method
trains, checkpoint/resume, config errors, passage-tower training with index refresh, evaluating and
asking with a trained checkpoint, and the loop's small helpers (refresh schedule, sampler, union_rows).

All runs use the tiny random models of `conftest.py` and a few steps, so they test plumbing and
invariants, not learning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from jointrag.cli import main
from cli_helpers import (
    assert_complete_run,
    assert_resumes_on_the_same_trajectory,
    assert_user_error,
    check_method_lines,
    read_metrics,
    run,
    train_argv,
    weights_of,
)
from conftest import QA

METHODS = ("rag-sequence", "rag-token", "vrag", "jsa")

pytestmark = pytest.mark.usefixtures("isolated_home")


# --- 1. a tiny run of every method through the CLI ------------------------------------------------

VARIANTS = {
    "rag-sequence": ("rag-sequence", (), "causal"),
    "rag-token": ("rag-token", (), "causal"),
    "vrag": ("vrag", (), "causal"),
    "vrag-sample": ("vrag", ("method.estimator=sample",), "causal"),
    "jsa-no-cache-last": ("jsa", ("method.cache=false", "method.states=last"), "causal"),
    "jsa-seq2seq": ("jsa", (), "seq2seq"),
    "rag-sequence-lora": ("rag-sequence", ("model.lora=true", "model.lora_r=2"), "causal"),
}


@pytest.fixture(scope="module")
def jsa_run(files, index_dir, tiny_dir, tmp_path_factory) -> Path:
    """A finished 2-step JSA run, shared by the tests that read a checkpoint."""
    out = tmp_path_factory.mktemp("jsa-run") / "run"
    assert main(train_argv(files, index_dir, tiny_dir, out, "jsa", 2)) == 0
    return out


def test_jsa_run(jsa_run):
    train = assert_complete_run(jsa_run, 2)
    check_method_lines("jsa", train)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_run(capsys, files, index_dir, tiny_dir, tmp_path, variant):
    method, sets, generator = VARIANTS[variant]
    out = tmp_path / "run"
    argv = train_argv(files, index_dir, tiny_dir, out, method, 2, *sets, generator=generator)
    code, stdout, err = run(capsys, *argv, "--json")
    assert code == 0, err
    final = json.loads(stdout)
    assert {"em", "f1", "examples"} <= final.keys()
    assert (final["data"], final["index"], final["checkpoint"]) == (f"dev: {files['qa']}", index_dir, str(out / "checkpoint"))
    train = assert_complete_run(out, 2)
    check_method_lines(method, train)
    last = [r for r in read_metrics(out) if r["split"] == "eval"][-1]  # the posterior's recall beside the prior's
    posterior = {key for key in last if key.startswith("posterior_")}
    assert posterior == ({"posterior_gold_recall@1", "posterior_gold_recall@3"} if method in ("vrag", "jsa") else set())
    assert all(0 <= last[key] <= 100 for key in posterior)
    weights = weights_of(out)  # the trained parameters only
    assert any(k.startswith("retriever.query_encoder.") for k in weights)
    assert not any(k.startswith("retriever.passage_encoder.") for k in weights)
    assert any(k.startswith("posterior.") for k in weights) == (method in ("vrag", "jsa"))
    if "model.lora=true" in sets:
        generator_keys = [k for k in weights if k.startswith("generator.")]
        assert generator_keys and all("lora_" in k for k in generator_keys)


# --- 2. only what a method trains receives gradients ----------------------------------------------

def one_backward(files, index_dir, tiny_dir, tmp_path, method, *sets):
    """A Trainer built as `jointrag train` builds it; one objective call on two examples, then backward."""
    from jointrag.config import load_config
    from jointrag.train import Trainer

    config = load_config(None, [
        f"method.name={method}", f"model.index={index_dir}", f"data.train={files['qa']}", f"data.dev={files['qa']}",
        f"model.generator={tiny_dir / 'causal'}", f"out={tmp_path / 'run'}", "method.k=3", "method.proposals=5",
        "eval.limit=3", "train.precision=fp32", *sets,
    ])
    trainer = Trainer(config)
    output = trainer.objective(trainer.system, trainer.train_examples[:2])
    assert torch.isfinite(output.loss)
    output.loss.backward()
    return trainer


def grads(system, prefix: str) -> list[tuple[str, torch.Tensor | None]]:
    return [(name, p.grad) for name, p in system.named_parameters() if name.startswith(prefix)]


def reached(system, prefix: str) -> bool:
    """Some parameter under `prefix` has a non-zero gradient."""
    return any(g is not None and g.abs().sum() > 0 for _, g in grads(system, prefix))


def untouched(system, prefix: str) -> bool:
    """No parameter under `prefix` requires or has a gradient."""
    return all(g is None for _, g in grads(system, prefix)) and not any(
        p.requires_grad for name, p in system.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("method", METHODS)
def test_only_what_a_method_trains_gets_gradients(files, index_dir, tiny_dir, tmp_path, method):
    trainer = one_backward(files, index_dir, tiny_dir, tmp_path, method)
    system = trainer.system
    assert {name.split(".")[0] for name, _ in system.named_parameters()} <= {"retriever", "posterior", "generator"}
    assert reached(system, "retriever.query_encoder.")  # RAG: through p(z|x) only
    assert reached(system, "generator.")
    assert untouched(system, "retriever.passage_encoder.")
    if method in ("vrag", "jsa"):
        assert system.posterior is not None and reached(system, "posterior.")
        assert trainer.objective.trains == {"query", "posterior", "generator"}
    else:
        assert system.posterior is None and not grads(system, "posterior.")
        assert trainer.objective.trains == {"query", "generator"}
    # the optimiser holds exactly the parameters that require a gradient, each once
    in_optimizer = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in system.parameters() if p.requires_grad)
    generator_ids = {id(p) for p in system.generator.parameters()}
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert all(id(p) in generator_ids for p in groups["generator"]["params"])
    assert not any(id(p) in generator_ids for p in groups["retriever"]["params"])


@pytest.mark.parametrize("method", ["rag-sequence", "jsa"])
def test_passage_tower_trains_when_asked(files, index_dir, tiny_dir, tmp_path, method):
    system = one_backward(files, index_dir, tiny_dir, tmp_path, method, "model.train_passage_tower=true").system
    assert reached(system, "retriever.passage_encoder.")
    assert reached(system, "retriever.query_encoder.") and reached(system, "generator.")


def test_posterior_recall_searches_with_each_question_and_its_answer(files, index_dir, tiny_dir, tmp_path):
    trainer = one_backward(files, index_dir, tiny_dir, tmp_path, "jsa")
    system, asked = trainer.system, []
    gold = {e.question: system.index.corpus.row_of(e.gold_ids[0]) for e in trainer.dev_examples}

    def search_posterior(questions, answers, k):  # the gold passage, then padding; the prior's search is not
        asked.extend(zip(questions, answers))  # involved: its gold recall on random towers is below 100
        return np.array([[gold[q]] + [-1] * (k - 1) for q in questions])

    system.search_posterior = search_posterior
    k = trainer.config.eval.k
    assert trainer.posterior_recall() == {"posterior_gold_recall@1": 100.0, f"posterior_gold_recall@{k}": 100.0}
    assert asked == [(e.question, e.answers[0]) for e in trainer.dev_examples]


@pytest.mark.parametrize("method", ["rag-token", "vrag"])
def test_lora_trains_only_the_adapter(files, index_dir, tiny_dir, tmp_path, method):
    system = one_backward(files, index_dir, tiny_dir, tmp_path, method, "model.lora=true", "model.lora_r=2").system
    generator = grads(system, "generator.")
    adapter = [(name, g) for name, g in generator if "lora_" in name]
    assert adapter and len(adapter) < len(generator)
    assert all(g is None for name, g in generator if "lora_" not in name)
    assert not any(p.requires_grad for name, p in system.generator.named_parameters() if "lora_" not in name)
    assert all(g is not None for _, g in adapter)
    assert any(g.abs().sum() > 0 for _, g in adapter)  # lora_B (A's gradient is 0 while B is 0)
    assert reached(system, "retriever.query_encoder.") and untouched(system, "retriever.passage_encoder.")


# --- 3. checkpoint and resume ---------------------------------------------------------------------


def test_resume_extends_a_finished_run_on_the_same_trajectory(files, index_dir, tiny_dir, tmp_path):
    """2 steps, then `--resume --steps 4`, equals 4 steps straight. JSA has the most state to carry: the
    chain cache, the sampling RNG, the data position. The schedule is constant because a decaying one
    depends on train.steps (a 2-step run decays faster than the first half of a 4-step run)."""
    assert_resumes_on_the_same_trajectory(
        tmp_path, lambda out, steps: train_argv(files, index_dir, tiny_dir, out, "jsa", steps, "train.schedule=constant"),
        saved=lambda state: state["objective"]["chain_cache"],  # the chain cache is saved
    )


def test_resume_after_an_interruption_on_the_same_trajectory(files, index_dir, tiny_dir, tmp_path):
    """A 4-step run (linear schedule, a checkpoint every 2 steps) interrupted in step 4, then resumed,
    equals 4 steps straight: the optimiser and scheduler states come back too, and the log drops step 3,
    logged after the checkpoint, before the resumed run logs it again."""
    from jointrag.methods.jsa import JSA

    settings = ("train.save_every=2", "train.warmup_steps=1")
    assert_resumes_on_the_same_trajectory(
        tmp_path, lambda out, steps: train_argv(files, index_dir, tiny_dir, out, "jsa", steps, *settings),
        interrupt=(JSA, 4), saved_step=2,
    )


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_in_progress_and_resume_continues_it(files, index_dir, tiny_dir, tmp_path, signal_name):
    """Ctrl-C or a scheduler's SIGTERM in step 3 of 4 (checkpoints every 2 steps): the step finishes, a
    checkpoint of step 3 is written and the run stops (130); resumed, it equals 4 steps straight."""
    import signal

    from jointrag.methods.jsa import JSA

    settings = ("train.save_every=2", "train.warmup_steps=1")
    resumed = assert_resumes_on_the_same_trajectory(
        tmp_path, lambda out, steps: train_argv(files, index_dir, tiny_dir, out, "jsa", steps, *settings),
        interrupt=(JSA, 3), saved_step=3, signal_number=getattr(signal, signal_name),
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    assert [r["step"] for r in read_metrics(resumed) if r["split"] == "train"] == [1, 2, 3, 4]


def test_extending_a_run_resumes_at_the_rate_of_the_new_schedule(jsa_run):
    """`--resume --steps 4` after a finished 2-step run: step 3 runs at the 4-step schedule's rate."""
    from jointrag.config import load_config
    from jointrag.train import Trainer
    from jointrag.train.loop import lr_lambda

    config = load_config(str(jsa_run / "checkpoint" / "config.yaml"), ["train.steps=4"])
    trainer = Trainer(config)
    trainer.resume()  # reads the checkpoint only
    assert trainer.step == 2
    factor = lr_lambda("linear", 0, 4)(2)
    assert factor == 0.5
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    expected = {"generator": factor * config.train.lr_generator, "retriever": factor * config.train.lr_retriever}
    assert rates == pytest.approx(expected)


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "checkpoint").iterdir())}


def test_a_run_directory_is_not_overwritten(capsys, files, index_dir, tiny_dir, jsa_run):
    before, log = checkpoint_bytes(jsa_run), (jsa_run / "metrics.jsonl").read_text()
    argv = train_argv(files, index_dir, tiny_dir, jsa_run, "jsa", 3)
    assert_user_error(capsys, *argv, names=(str(jsa_run), "--resume"))
    assert checkpoint_bytes(jsa_run) == before
    assert (jsa_run / "metrics.jsonl").read_text() == log


def test_resume_without_a_checkpoint(capsys, files, index_dir, tiny_dir, tmp_path):
    out = tmp_path / "empty"
    argv = train_argv(files, index_dir, tiny_dir, out, "jsa", 2)
    assert_user_error(capsys, *argv, "--resume", names=("--resume", str(out)))
    assert not (out / "checkpoint").exists()


def test_a_fresh_run_starts_a_fresh_log(files, index_dir, tiny_dir, tmp_path):
    """A run killed before its first checkpoint leaves a log (its last line cut short) and TensorBoard
    events; a new run into that directory must not append to them."""
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.killed").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"step": 7, "split": "train", "loss": 9.0}\n{"step": 8, "spl')
    assert main(train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 2)) == 0
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2]
    assert [p.name for p in (out / "tensorboard").iterdir()] != ["events.out.tfevents.killed"]
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_steps_done(capsys, files, index_dir, tiny_dir, tmp_path, monkeypatch):
    """The loss turns NaN in step 3 of a run that logs every 4 steps: one error line naming the step,
    and the log keeps the means of steps 1-2 rather than nothing."""
    from jointrag.methods.rag import RagSequence

    original, calls = RagSequence.__call__, []

    def poisoned(self, system, batch):
        output = original(self, system, batch)
        calls.append(1)
        return output if len(calls) < 3 else type(output)(output.loss * float("nan"), output.metrics)

    monkeypatch.setattr(RagSequence, "__call__", poisoned)
    out = tmp_path / "run"
    argv = train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 4, "train.log_every=4")
    assert_user_error(capsys, *argv, names=("step 3", "nan"))
    rows = [r for r in read_metrics(out) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [2] and np.isfinite(rows[0]["loss"])


# --- 4. configuration errors ----------------------------------------------------------------------


@pytest.fixture
def tiny_train(files, index_dir, tiny_dir, tmp_path) -> list[str]:
    """A complete 1-step tiny run, so that a setting wrongly accepted fails fast instead of training for long."""
    return train_argv(files, index_dir, tiny_dir, tmp_path / "run", "jsa", 1)


def test_unknown_key_in_a_recipe_names_file_line_and_key(capsys, tmp_path, tiny_train):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  name: jsa\n  k: 3\n\ntrain:\n  steps: 2\n  stepz: 3\n")
    message = assert_user_error(capsys, *tiny_train, "--config", recipe, names=(f"{recipe}:7", "train.stepz"))
    assert "steps" in message  # the known keys of the section are listed

    recipe.write_text("model:\n  lora: true\noptimizer:\n  lr: 1\n")
    assert_user_error(capsys, *tiny_train, "--config", recipe, names=(f"{recipe}:4", "optimizer"))


def test_ill_typed_value_in_a_recipe_names_file_line_and_key(capsys, tmp_path, tiny_train):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  k: 3\ntrain:\n  steps: many\n")
    assert_user_error(capsys, *tiny_train, "--config", recipe, names=(f"{recipe}:4", "many", "train.steps"))


@pytest.mark.parametrize("setting, names", [
    ("method.name=foo", ("method.name", "foo", "jsa")),
    ("train.steps=abc", ("train.steps", "abc")),
    ("train.steps=0", ("train.steps", "positive")),
    ("method.estimator=exact", ("method.estimator", "enumerate")),
    ("model.lora=maybe", ("model.lora",)),
    ("train.nope=1", ("train.nope",)),
    ("train.steps", ("train.steps", "KEY=VALUE")),
])
def test_bad_settings_name_the_key(capsys, tiny_train, setting, names):
    assert_user_error(capsys, *tiny_train, "--set", setting, names=names)


def test_help_config_lists_every_key_with_its_help(capsys):
    import dataclasses

    from jointrag.config import RunConfig

    code, out, _ = run(capsys, "train", "--help-config")
    assert code == 0
    keys = []
    for section in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), section.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
        else:
            keys.append(section.name)
    for key in keys:
        assert re.search(rf"^{re.escape(key)} = .*\n    \S", out, re.M), key
    assert "method.proposals = 50\n    JSA: proposals M" in out


@pytest.mark.parametrize("schedule", ["0-:0", "every 500", "0-100", "a-b:5"])
def test_an_invalid_refresh_schedule_is_a_user_error(capsys, files, index_dir, tiny_dir, tmp_path, schedule):
    argv = train_argv(files, index_dir, tiny_dir, tmp_path / "run", "rag-sequence", 2, "model.train_passage_tower=true",
                      f"model.refresh={schedule}")
    assert_user_error(capsys, *argv, names=("model.refresh",))
    assert not (tmp_path / "run" / "checkpoint").exists()


# --- 5. passage-tower training with index refresh -------------------------------------------------


@pytest.fixture(scope="module")
def refresh_run(files, index_dir, tiny_dir, tmp_path_factory) -> Path:
    """3 steps training the passage tower too, re-indexing every 2 steps."""
    out = tmp_path_factory.mktemp("refresh-run") / "run"
    settings = ("model.train_passage_tower=true", "model.refresh=0-:2")
    assert main(train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 3, *settings)) == 0
    return out


def test_training_the_passage_tower_refreshes_the_index(refresh_run, index_dir):
    from jointrag.retrieval.index import read_manifest

    assert_complete_run(refresh_run, 3)
    manifest = read_manifest(refresh_run / "index")
    base = read_manifest(index_dir)
    assert manifest["count"] == 8 and manifest["corpus"]["fingerprint"] == base["corpus"]["fingerprint"]
    assert manifest["encoder"]["fingerprint"] != base["encoder"]["fingerprint"]  # a trained tower built it
    refreshes = [r for r in read_metrics(refresh_run) if r["split"] == "train" and "staleness" in r]
    assert [r["step"] for r in refreshes][:1] == [2] and {r["step"] for r in refreshes} <= {2, 3}
    line = refreshes[0]
    assert line["staleness"] == pytest.approx(line["stale_recall@3"] - line["fresh_recall@3"])
    assert all(0 <= line[key] <= 100 for key in ("stale_recall@3", "fresh_recall@3"))
    state = torch.load(refresh_run / "checkpoint" / "trainer.pt", weights_only=False)
    assert Path(state["index"]["directory"]) == (refresh_run / "index").resolve() and state["index"]["refreshes"] >= 1
    weights = weights_of(refresh_run)
    assert any(name.startswith("retriever.passage_encoder.") for name in weights)


def test_a_checkpoint_with_a_trained_passage_tower_evaluates(capsys, refresh_run, files, tmp_path):
    from jointrag.retrieval.index import read_manifest
    from jointrag.train import load_trained

    _, system = load_trained(refresh_run / "checkpoint")
    assert system.index.directory.resolve() == (refresh_run / "index").resolve()
    assert system.retriever.identity()["fingerprint"] == read_manifest(refresh_run / "index")["encoder"]["fingerprint"]
    code, out, err = run(capsys, "eval", "--checkpoint", refresh_run / "checkpoint", "--data", files["qa"], "-k", "3",
                         "--max-new-tokens", "3", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    assert json.loads(out)["index"] == str(refresh_run / "index")


def test_resume_a_passage_tower_run_between_refreshes(files, index_dir, tiny_dir, tmp_path):
    """The checkpoint of step 3 holds the index of step 2 (refresh every 2 steps), built by an older passage
    tower than the one saved; resuming from it must still continue the straight run's trajectory."""
    from jointrag.methods.rag import RagSequence

    settings = ("model.train_passage_tower=true", "model.refresh=0-:2", "train.save_every=3")
    assert_resumes_on_the_same_trajectory(
        tmp_path, lambda out, steps: train_argv(files, index_dir, tiny_dir, out, "rag-sequence", steps, *settings),
        interrupt=(RagSequence, 4), saved_step=3,
    )


# --- 6. eval and ask with a trained checkpoint ----------------------------------------------------


def test_load_trained_applies_the_trained_weights(jsa_run, tiny_dir):
    from transformers import LlamaForCausalLM

    from jointrag.train import load_trained

    config, system = load_trained(jsa_run / "checkpoint")
    assert config.method.name == "jsa" and config.train.steps == 2
    assert not system.training and not any(p.requires_grad for p in system.parameters())
    saved, params = weights_of(jsa_run), dict(system.named_parameters())
    assert {name.split(".")[0] for name in saved} == {"retriever", "posterior", "generator"}
    for name, value in saved.items():
        assert torch.equal(params[name], value), name
    base = LlamaForCausalLM.from_pretrained(tiny_dir / "causal").state_dict()
    prefix = "generator.model."
    trained = {name.removeprefix(prefix): value for name, value in saved.items() if name.startswith(prefix)}
    assert trained.keys() <= base.keys()
    assert any(not torch.equal(value, base[name]) for name, value in trained.items())  # training moved the generator


@pytest.mark.parametrize("decode", [None, "rag-token", "rag-sequence-thorough"])
def test_eval_with_a_checkpoint(capsys, jsa_run, files, index_dir, tmp_path, decode):
    argv = ["eval", "--checkpoint", jsa_run / "checkpoint", "--data", files["qa"], "-k", "3", "--max-new-tokens", "3",
            "--batch-size", "2", "--out", tmp_path / "eval", "--json"] + (["--decode", decode] if decode else [])
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["checkpoint"] == str(jsa_run / "checkpoint")
    assert metrics["decode"] == (decode or "top1")  # the checkpoint's eval.decode by default
    assert metrics["index"] == index_dir and metrics["examples"] == len(QA)
    assert all(0 <= metrics[key] <= 100 for key in ("em", "f1", "answer_recall@3"))
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(QA) and all(isinstance(json.loads(p)["prediction"], str) for p in predictions)


def test_retrieval_only_eval_of_a_checkpoint_does_not_load_the_generator(capsys, jsa_run, index_dir, files, tmp_path, monkeypatch):
    """`eval --checkpoint --retrieval-only` searches with the trained query tower, as the whole loaded
    checkpoint does, without loading (de-quantising) the generator."""
    from jointrag.methods import systems
    from jointrag.retrieval.resolve import resolve_index
    from jointrag.train import load_trained, load_trained_index

    questions = [row["question"] for row in QA]
    expected = load_trained(jsa_run / "checkpoint")[1].index.search(questions, 3)
    untrained = resolve_index(index_dir).search(questions, 3)[0]

    def no_generator(*args, **kwargs):
        raise AssertionError("the generator was loaded")

    monkeypatch.setattr(systems, "load_generator", no_generator)
    index = load_trained_index(jsa_run / "checkpoint")[1]
    scores, rows = index.search(questions, 3)
    np.testing.assert_array_equal(rows, expected[1])
    np.testing.assert_allclose(scores, expected[0], rtol=1e-5)
    assert not np.allclose(scores, untrained)  # the trained query tower, not the base one
    code, out, err = run(capsys, "eval", "--checkpoint", jsa_run / "checkpoint", "--data", files["qa"], "-k", "3",
                         "--retrieval-only", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    assert "em" not in json.loads(out) and "gold_recall@3" in json.loads(out)


def test_ask_with_a_checkpoint(capsys, jsa_run):
    code, out, err = run(capsys, "ask", "--checkpoint", jsa_run / "checkpoint", "--decode", "rag-sequence-fast", "-k", "3",
                         "--max-new-tokens", "3", "What is the capital of France?", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert isinstance(result["answer"], str)
    assert [p["used"] for p in result["passages"]] == [True, True, True]  # a RAG decoder mixes all k passages


def test_a_run_directory_is_not_a_checkpoint(capsys, jsa_run, files, tmp_path):
    assert_user_error(capsys, "eval", "--checkpoint", jsa_run, "--data", files["qa"], "--out", tmp_path / "eval",
                      names=("weights.pt", "checkpoint"))


# --- 7. the loop's helpers ------------------------------------------------------------------------


def test_parse_refresh():
    from jointrag.train.loop import parse_refresh

    assert parse_refresh("0-1000:500,1000-:2000") == [(0, 1000, 500), (1000, None, 2000)]
    assert parse_refresh("0-:2") == [(0, None, 2)]
    for bad in ("", "0-1000", "0:500", "0-1000:0", "0-1000:-5", "x-1:2", "0-1000:500,", "0-1000:500;1000-:2000"):
        with pytest.raises(Exception) as error:
            parse_refresh(bad)
        assert type(error.value).__name__ == "UserError" and "model.refresh" in str(error.value), bad


def test_refresh_due_at_the_boundaries():
    from jointrag.train.loop import parse_refresh, refresh_due

    spans = parse_refresh("0-1000:500,1000-:2000")
    due = [step for step in range(0, 7001) if refresh_due(spans, step)]
    assert due == [500, 1000, 3000, 5000, 7000]  # never at step 0; the end of a span is exclusive
    late = parse_refresh("10-20:5")
    assert [s for s in range(40) if refresh_due(late, s)] == [10, 15]
    assert not any(refresh_due([], s) for s in range(10))


def examples(n: int):
    from jointrag.types import Example

    return [Example(f"e{i}", f"question {i}", (f"answer {i}",)) for i in range(n)]


def test_sampler_visits_every_example_once_per_epoch():
    from jointrag.train.loop import Sampler

    data = examples(5)
    sampler = Sampler(data, seed=3)
    drawn = [e.id for _ in range(5) for e in sampler.next(2)]  # 10 draws: two epochs, batches straddle them
    assert sorted(drawn[:5]) == sorted(drawn[5:]) == sorted(e.id for e in data)
    assert drawn[:5] != drawn[5:]  # a fresh permutation each epoch
    assert sampler.state_dict() == {"epoch": 2, "offset": 0}
    big = Sampler(data, seed=3).next(7)  # a batch larger than the data set
    assert len(big) == 7 and {e.id for e in big[:5]} == {e.id for e in data}
    assert [e.id for e in Sampler(data, seed=3).next(5)] == drawn[:5]  # seeded
    assert [e.id for e in Sampler(data, seed=4).next(5)] != drawn[:5]


def test_sampler_state_round_trips():
    from jointrag.train.loop import Sampler

    data = examples(7)
    first = Sampler(data, seed=0)
    for _ in range(4):
        first.next(3)
    state = first.state_dict()
    second = Sampler(data, seed=0)
    second.load_state_dict(json.loads(json.dumps(state)))
    assert second.state_dict() == state
    assert [[e.id for e in first.next(3)] for _ in range(6)] == [[e.id for e in second.next(3)] for _ in range(6)]


def test_union_rows_orders_deduplicates_and_pads():
    from jointrag.system import union_rows

    cached = np.array([[4], [-1], [-1]])
    prior = np.array([[1, 4, 2], [3, 3, -1], [-1, -1, -1]])
    posterior = np.array([[2, 5, 1], [0, -1, -1], [-1, -1, -1]])
    rows = union_rows(cached, prior, posterior)
    assert rows.dtype == np.int64
    assert rows.tolist() == [[4, 1, 2, 5], [3, 0, -1, -1], [-1, -1, -1, -1]]
    assert union_rows(np.array([[-1, -1]])).tolist() == [[-1]]  # at least one column
    assert union_rows(np.array([[7, 7, 7]])).tolist() == [[7]]
