"""Tests for jointrag.train.variance and `jointrag variance` on the tiny models: the one-pass statistics
against numpy, RAG's zero draw variance against the sampling estimators' positive one, the output
files, and the user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jointrag.cli import EXIT_USER_ERROR, main
from jointrag.errors import UserError
from jointrag.train.variance import GradientMoments, format_table, labels, run_variance

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUESTIONS = [
    ("q1", "What is the capital of France?", "Paris"),
    ("q2", "Who won Super Bowl 50?", "Denver Broncos"),
    ("q3", "What do plants make from light?", "sugar"),
    ("q4", "What is the capital of Italy?", "Rome"),
    ("q5", "Which river flows through Vienna?", "Danube"),
    ("q6", "What is the capital of Spain?", "Madrid"),
]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test may build or read the default index in the real home."""
    monkeypatch.setenv("JOINTRAG_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory) -> dict:
    """A tiny exact index built through the CLI, a QA file, and the --set flags that use them."""
    from conftest import PASSAGES

    root = tmp_path_factory.mktemp("variance")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in PASSAGES))
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": i, "question": q, "answers": [a]}) + "\n" for i, q, a in QUESTIONS))
    index = root / "index"
    assert main(["index", "--corpus", str(corpus), "--out", str(index), "--retriever", str(tiny_dir / "encoder")]) == 0
    # tau=10 keeps q(z|x,y) of the random tiny towers far from one-hot, so that sampling varies
    overrides = [f"model.index={index}", f"model.generator={tiny_dir / 'causal'}", f"data.dev={qa}", "method.k=3",
                 "method.tau=10", "method.proposals=8", "train.precision=fp32"]
    return {"root": root, "overrides": overrides, "qa": qa}


@pytest.fixture(scope="module")
def report(setup) -> dict:
    return run_variance(overrides=setup["overrides"], batch_size=2, repeats=3, batches=2, out=setup["root"] / "run", progress=False)


def test_moments_match_numpy():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 40)) + 3.0
    moments = GradientMoments()
    for v in vectors:
        moments.add(torch.tensor(v, dtype=torch.float32))
    stats = moments.summary()
    x = vectors.astype(np.float32).astype(np.float64)
    mean = x.mean(0)
    assert stats["n"] == 5
    assert stats["trace_cov"] == pytest.approx(x.var(0, ddof=1).sum(), rel=1e-6)
    assert stats["mean_sq_norm"] == pytest.approx(mean @ mean, rel=1e-6)
    assert stats["relative_variance"] == pytest.approx(x.var(0, ddof=1).sum() / (mean @ mean), rel=1e-6)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosines = [unit[i] @ unit[j] for i in range(5) for j in range(i + 1, 5)]
    assert stats["mean_cosine"] == pytest.approx(np.mean(cosines), rel=1e-6)


def test_identical_gradients_have_exactly_zero_variance():
    moments = GradientMoments()
    g = torch.randn(1000) * 1e3 + 0.1
    for _ in range(4):
        moments.add(g)
    stats = moments.summary()
    assert stats["trace_cov"] == 0.0 and stats["relative_variance"] == 0.0
    assert stats["mean_cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        GradientMoments().summary()


def test_draw_variance_is_zero_only_for_the_deterministic_estimators(report):
    methods = report["methods"]
    assert list(methods) == labels() == ["rag-sequence", "rag-token", "vrag-enumerate", "vrag-sample", "jsa"]
    for label in ("rag-sequence", "rag-token", "vrag-enumerate"):
        for tower, stats in methods[label]["draws"].items():
            assert stats["trace_cov"] == 0.0, (label, tower)
            assert stats["n"] == 3 and stats["mean_sq_norm"] > 0
    assert "posterior" not in methods["rag-sequence"]["draws"]
    assert set(methods["jsa"]["draws"]) == {"prior", "posterior"}
    # VRAG-sample: the prior gets only the exact KL gradient; the posterior the REINFORCE one
    assert methods["vrag-sample"]["draws"]["prior"]["trace_cov"] == 0.0
    assert methods["vrag-sample"]["draws"]["posterior"]["trace_cov"] > 0
    assert methods["jsa"]["draws"]["prior"]["trace_cov"] > 0
    assert methods["jsa"]["draws"]["posterior"]["trace_cov"] > 0
    assert methods["jsa"]["draws"]["prior"]["mean_cosine"] < 1


def test_batch_variance_is_positive(report):
    for label, result in report["methods"].items():
        for tower, stats in result["batches"].items():
            assert stats["n"] == 2 and stats["trace_cov"] > 0, (label, tower)
            assert stats["relative_variance"] == pytest.approx(stats["trace_cov"] / stats["mean_sq_norm"])


def test_report_files_and_settings(report, setup):
    out = setup["root"] / "run"
    assert json.loads((out / "variance.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "variance.png").read_bytes().startswith(PNG_SIGNATURE)
    settings = report["settings"]
    assert settings["chain_cache"].startswith("off") and settings["generator_frozen"]
    assert settings["k"] == 3 and settings["proposals"] == 8 and settings["repeats"] == 3
    assert settings["parameters"]["prior"] == settings["parameters"]["posterior"] > 0
    assert len(settings["draw_batch"]) == 2
    assert "acceptance" in report["methods"]["jsa"]["metrics"]["draws"]
    table = format_table(report)
    assert "jsa" in table and "vrag-sample" in table and "chain cache off" in table


def test_cli(capsys, setup, tmp_path):
    argv = ["variance", *[a for o in setup["overrides"] for a in ("--set", o)], "--repeats", "2", "--batches", "2",
            "--batch-size", "1", "--examples", "4", "--out", str(tmp_path / "v")]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "v" / "variance.json").read_text())
    assert printed["settings"]["examples"] == 4 and printed["settings"]["batch_size"] == 1
    assert (tmp_path / "v" / "variance.png").is_file()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("retriever gradient variance") and "wrote " in out


def user_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_user_errors(capsys, setup, tmp_path):
    flags = [a for o in setup["overrides"] for a in ("--set", o)]
    out = ["--out", tmp_path / "v"]
    assert "--repeats must be at least 2" in user_error(capsys, "variance", *flags, "--repeats", "1", *out)
    assert "--batches must be at least 2" in user_error(capsys, "variance", *flags, "--batches", "1", *out)
    assert "too few" in user_error(capsys, "variance", *flags, "--examples", "3", "--batches", "2", *out)
    assert "has only 6 examples" in user_error(capsys, "variance", *flags, "--examples", "8", "--batch-size", "4", "--batches", "2", *out)
    assert "unknown key 'method.nope'" in user_error(capsys, "variance", *flags, "--set", "method.nope=1", *out)
    assert "not a checkpoint" in user_error(capsys, "variance", "--checkpoint", tmp_path, *out)
    assert "exclude each other" in user_error(capsys, "variance", "--checkpoint", tmp_path, "--config", tmp_path / "c.yaml", *out)
    assert "fixes its models" in user_error(capsys, "variance", "--checkpoint", tmp_path, "--set", "model.k=1", *out)
    (tmp_path / "file").write_text("keep")
    assert "not a directory" in user_error(capsys, "variance", *flags, "--out", tmp_path / "file")
    assert not (tmp_path / "v").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["variance", "--batch-size", "0"])
    assert exit_info.value.code == EXIT_USER_ERROR
    with pytest.raises(UserError):
        run_variance(overrides=setup["overrides"], repeats=1, out=tmp_path / "v")


def test_trained_checkpoint(capsys, setup, tmp_path):
    """A RAG-Sequence checkpoint has no posterior tower: the measurement adds one, a copy of its prior."""
    from jointrag.config import load_config
    from jointrag.train import train

    run = tmp_path / "run"
    train(load_config(None, [*setup["overrides"], f"out={run}", "method.name=rag-sequence", "train.steps=1", "train.batch_size=2",
                             f"data.train={setup['qa']}", "eval.limit=1", "eval.max_new_tokens=1", "eval.k=2"]))
    capsys.readouterr()
    code = main(["variance", "--checkpoint", str(run / "checkpoint"), "--set", "method.proposals=4", "--repeats", "2", "--batches", "2",
                 "--batch-size", "1", "--out", str(tmp_path / "v"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["checkpoint"] == str(run / "checkpoint") and report["settings"]["proposals"] == 4
    assert report["settings"]["k"] == 3 and report["settings"]["data"] == str(setup["qa"])  # from the checkpoint's config
    assert report["methods"]["rag-token"]["draws"]["prior"]["trace_cov"] == 0.0
    assert report["methods"]["jsa"]["draws"]["posterior"]["trace_cov"] > 0


def test_scored_once_gives_the_generator_values(tiny_dir):
    from jointrag.generation.generator import load_generator
    from jointrag.train.variance import scored_once

    generator = load_generator(str(tiny_dir / "causal"), precision="fp32").eval()
    prompts, targets = ["Title: Paris\nParis is in France.\nQ: capital?", "Q: who won?"], ["Paris", "Denver Broncos"]
    expected_logp, expected_mask = generator.pair_logprobs(prompts, targets)
    with pytest.raises(ValueError, match="frozen"), scored_once(generator):
        pass
    generator.requires_grad_(False)
    calls = []
    original = generator.flat_logprobs
    generator.flat_logprobs = lambda *a: calls.append(len(a[0])) or original(*a)
    with scored_once(generator) as memo:
        logp, mask = generator.pair_logprobs(prompts, targets)
        again, _ = generator.pair_logprobs([prompts[1], prompts[1], prompts[0]], [targets[1], targets[1], "Rome"])
        assert len(memo) == 3
    del generator.flat_logprobs
    assert calls == [2, 1]  # only the new pair is scored the second time
    assert torch.equal(mask, expected_mask)
    assert torch.allclose(logp, expected_logp, atol=1e-5)
    assert torch.allclose(again[0], expected_logp[1], atol=1e-5) and torch.equal(again[0], again[1])
    assert "pair_logprobs" not in vars(generator)  # the method is restored
