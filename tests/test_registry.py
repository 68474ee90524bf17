"""The method registry: a new method is one file (here, this one) and one registry line; and the data
rules the registry carries (corpus-derived examples only for a method that excludes their source
passage; unique example ids)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from cli_helpers import assert_user_error, run, write_jsonl
from jointrag.maths import sequence_logp
from jointrag.methods import METHODS, Method
from jointrag.methods._base import Stateless
from jointrag.methods.systems import rag_system
from jointrag.types import ObjectiveOutput


@dataclass
class TopPassageNLL(Stateless):
    """A toy method: -log p(y | x, z_1), the generator trained on the prior's top passage only."""

    k: int = 3
    needs_posterior: bool = field(default=False, init=False)
    trains: frozenset = field(default=frozenset({"generator"}), init=False)

    def __call__(self, system, batch) -> ObjectiveOutput:
        rows = system.search([e.question for e in batch], self.k)[:, :1]  # (B, 1)
        token_logp, token_mask = system.target_logprobs(batch, rows, [e.answers[0] for e in batch])  # (B, 1, T)
        loss = -sequence_logp(token_logp, token_mask, "sum").mean()
        return ObjectiveOutput(loss, {"loss": loss.item()})


def train_argv(files, index_dir, tiny_dir, out, method, *sets) -> list[str]:
    argv = ["train", "--method", method, "--index", index_dir, "--data", files["qa"], "--out", out, "--steps", 2,
            "--set", f"data.dev={files['qa']}", "--set", f"model.generator={tiny_dir / 'causal'}", "--set", "train.batch_size=2",
            "--set", "method.k=3", "--set", "eval.limit=2", "--set", "eval.max_new_tokens=2", "--set", "train.precision=fp32",
            "--set", "train.lr_generator=0.01"]
    for setting in sets:
        argv += ["--set", setting]
    return [str(a) for a in argv]


def test_a_new_method_is_one_registry_line(capsys, monkeypatch, files, index_dir, tiny_dir, tmp_path):
    monkeypatch.setitem(METHODS, "toy", Method("toy", "the top passage's NLL", TopPassageNLL, lambda c: {"k": c.method.k}, rag_system))
    out = tmp_path / "toy"
    code, stdout, err = run(capsys, *train_argv(files, index_dir, tiny_dir, out, "toy"), "--json")
    assert code == 0, err
    assert "em" in json.loads(stdout)
    from jointrag.config import load_config
    from jointrag.train import load_trained

    _, trained = load_trained(out / "checkpoint")
    base = rag_system(load_config(str(out / "checkpoint" / "config.yaml")))
    before, after = dict(base.named_parameters()), dict(trained.named_parameters())
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and all(name.startswith("generator.") for name in changed)  # what the toy says it trains
    with pytest.raises(SystemExit):
        run(capsys, "train", "--help")
    assert "toy" in capsys.readouterr().out  # a --method choice


def test_an_unknown_method_names_the_registry(capsys, files, index_dir, tiny_dir, tmp_path):
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, tmp_path / "run", "rag-sequence", "method.name=toy"),
                      names=("method.name", "rag-sequence", "jsa"))


@pytest.mark.parametrize("method", ["rag-sequence", "jsa", "ra-dit-lm"])
def test_corpus_examples_are_refused_where_their_passage_would_be_retrieved(capsys, method, files, index_dir, tiny_dir, tmp_path):
    """A corpus-derived example's answer is cut from a passage; only R-ft excludes that passage from
    its candidates, so any other method would learn to copy it."""
    out = tmp_path / "run"
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, out, method, "method.corpus_ratio=0.5"),
                      names=("method.corpus_ratio", method, "ra-dit-lsr"))
    assert not (out / "checkpoint").exists()


def test_the_ra_dit_pipeline_mixes_corpus_examples_into_r_ft_only(monkeypatch, files, index_dir, tiny_dir, tmp_path):
    from jointrag.config import load_config
    from jointrag.train import pipeline, train

    seen = []

    class Stop(Exception):
        pass

    def record(self, stage):
        seen.append((stage.method.name, stage.method.corpus_ratio))
        if len(seen) == 2:
            raise Stop

    monkeypatch.setattr(pipeline.Stages, "train", record)
    config = load_config(None, [f"model.index={index_dir}", f"data.train={files['qa']}", f"data.dev={files['qa']}",
                                f"data.test={files['qa']}", f"out={tmp_path / 'run'}",
                                "method.name=ra-dit", "method.corpus_ratio=0.3"])
    with pytest.raises(Stop):
        train(config)
    assert seen == [("ra-dit-lm", 0.0), ("ra-dit-lsr", 0.3)]


def test_repeated_example_ids_are_refused(capsys, files, index_dir, tiny_dir, tmp_path):
    """JSA's chain cache and precomputed scores are keyed by example id: a repeated id would mix two examples' state."""
    qa = [json.loads(line) for line in files["qa"].read_text().splitlines()]
    repeated = write_jsonl(tmp_path / "qa.jsonl", qa + [{**qa[1], "question": "another question"}])
    out = tmp_path / "run"
    argv = train_argv(files, index_dir, tiny_dir, out, "jsa")
    argv[argv.index("--data") + 1] = str(repeated)
    assert_user_error(capsys, *argv, names=(str(repeated), qa[1]["id"], "more than once"))
    assert not (out / "checkpoint").exists()
