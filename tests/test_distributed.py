"""Tests for training under torchrun: 2 CPU processes (gloo) on the tiny models, against 1 process.

`train.batch_size` is per rank, so 2 ranks with batch 2 take the steps of 1 process with batch 4.
The losses agree only where the objective draws no random numbers, so the equivalence runs
RAG-Sequence on a copy of the tiny encoder without dropout. It trains the passage tower with an index
refresh after every step (rank 0 rebuilds, the other rank reopens), at a retriever rate high enough
that a rank searching a stale index would change the next loss. JSA, which samples, checks the state
that crosses ranks instead: its chain cache and the global data position. With `train.fsdp` the
generator is sharded (FSDP2) and the same equivalence holds; its checkpoint is an unsharded run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jointrag import distributed
from jointrag.cli import main
from jointrag.config import load_config
from jointrag.errors import UserError
from jointrag.train.loop import Trainer
from cli_helpers import assert_complete_run, read_metrics, train_argv, train_lines, write_jsonl
from conftest import QA

TORCHRUN = Path(sys.executable).parent / "torchrun"
CONSTANT = "train.schedule=constant"  # a decaying schedule depends on train.steps
REFRESH = ("model.train_passage_tower=true", "model.refresh=0-:1", "train.lr_retriever=0.05")
FSDP = "train.fsdp=true"

pytestmark = pytest.mark.usefixtures("isolated_home")


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory) -> dict:
    """The fixture files, the tiny models with a dropout-free encoder, and an exact index built with it."""
    from conftest import PASSAGES

    root = tmp_path_factory.mktemp("distributed")
    models = root / "models"
    shutil.copytree(tiny_dir, models)
    config = json.loads((models / "encoder" / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (models / "encoder" / "config.json").write_text(json.dumps(config))
    files = {"corpus": write_jsonl(root / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES]),
             "qa": write_jsonl(root / "qa.jsonl", QA)}
    index = root / "index"
    assert main(["index", "--corpus", str(files["corpus"]), "--out", str(index), "--retriever", str(models / "encoder"),
                 "--precision", "fp32"]) == 0
    return {"files": files, "index": str(index), "models": models, "root": root}


def argv(setup, out, method: str, steps: int, *sets) -> list[str]:
    return train_argv(setup["files"], setup["index"], setup["models"], out, method, steps, CONSTANT, *sets)


def torchrun(args: list[str], home: Path) -> str:
    """`torchrun --nproc_per_node=2 -m jointrag ...`; returns its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JOINTRAG_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "jointrag", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def by_step(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in train_lines(out)}


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict:
    """RAG-Sequence with index refresh: 4 steps of 1 process with batch 4, and 2 steps of 2 ranks with batch 2."""
    root = tmp_path_factory.mktemp("runs")
    straight, two = root / "straight", root / "two"
    assert main(argv(setup, straight, "rag-sequence", 4, "train.batch_size=4", *REFRESH)) == 0
    stdout = torchrun(argv(setup, two, "rag-sequence", 2, *REFRESH), root / "home")
    return {"straight": straight, "two": two, "stdout": stdout}


def test_two_ranks_take_the_steps_of_one_process_with_the_global_batch(runs):
    for key in ("loss", "grad_norm"):
        expected, got = by_step(runs["straight"], key), by_step(runs["two"], key)
        assert [got[s] for s in (1, 2)] == pytest.approx([expected[s] for s in (1, 2)], rel=1e-5, abs=1e-6), key
    refreshes = [r["step"] for r in read_metrics(runs["two"]) if "staleness" in r]
    assert refreshes == [1, 2]


def test_only_rank_0_writes(runs):
    assert_complete_run(runs["two"], 2)  # each step logged once, one checkpoint, tensorboard, plots
    assert sum(r["split"] == "eval" for r in read_metrics(runs["two"])) == 1
    assert runs["stdout"].count("wrote ") == 1
    assert not list(runs["two"].parent.glob("*.tmp")) and sorted(p.name for p in runs["two"].iterdir()) == [
        ".jointrag.lock", "checkpoint", "config.yaml", "index", "metrics.jsonl", "plots", "tensorboard"]  # rank 0's lock of --out


def test_a_two_rank_checkpoint_resumes_in_one_process_on_the_same_trajectory(setup, runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["two"], resumed)
    assert main(argv(setup, resumed, "rag-sequence", 4, "train.batch_size=4", *REFRESH) + ["--resume"]) == 0
    expected, got = by_step(runs["straight"], "loss"), by_step(resumed, "loss")
    assert [got[s] for s in (3, 4)] == pytest.approx([expected[s] for s in (3, 4)], rel=1e-5, abs=1e-6)


def test_a_one_process_jsa_checkpoint_resumes_on_two_ranks_with_the_whole_chain_cache(setup, tmp_path):
    """Step 1 in one process (2 examples), step 2 on 2 ranks (2 examples each): the saved chain cache
    holds all 4 examples, whichever rank trained them, and the data position counts all 6."""
    out = tmp_path / "jsa"
    assert main(argv(setup, out, "jsa", 1)) == 0
    assert len(torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["objective"]["chain_cache"]) == 2
    torchrun(argv(setup, out, "jsa", 2) + ["--resume"], tmp_path / "home")
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 2 and state["sampler"] == {"epoch": 1, "offset": 2}
    cache = state["objective"]["chain_cache"]
    assert sorted(cache) == sorted(q["id"] for q in QA) and all(0 <= row < 8 for row in cache.values())
    assert [r["step"] for r in train_lines(out)] == [1, 2]
    assert len(state["rng"]) == 2


@pytest.fixture(scope="module")
def fsdp(setup, tmp_path_factory) -> Path:
    """The 2-rank run of `runs` with the generator sharded by FSDP, evaluating (every rank) before the
    first step, after each step and at the end."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(argv(setup, root / "run", "rag-sequence", 2, *REFRESH, FSDP, "train.eval_every=1"), root / "home")
    return root / "run"


def test_fsdp_takes_the_steps_of_one_process_and_saves_an_unsharded_checkpoint(runs, fsdp):
    for key in ("loss", "grad_norm"):  # grad_norm: the generator's shards and the towers' whole gradients
        expected, got = by_step(runs["straight"], key), by_step(fsdp, key)
        assert [got[s] for s in (1, 2)] == pytest.approx([expected[s] for s in (1, 2)], rel=1e-5, abs=1e-6), key
    assert_complete_run(fsdp, 2)
    assert [r["step"] for r in read_metrics(fsdp) if r["split"] == "eval"] == [0, 1, 2]
    plain, sharded = (torch.load(run / "checkpoint" / "weights.pt", weights_only=True) for run in (runs["two"], fsdp))
    assert list(sharded) == list(plain) and any(name.startswith("generator.") for name in sharded)
    assert all(type(w) is torch.Tensor and w.shape == plain[name].shape for name, w in sharded.items())
    plain, sharded = (torch.load(run / "checkpoint" / "trainer.pt", weights_only=False)["optimizer"] for run in (runs["two"], fsdp))
    assert plain["param_groups"] == sharded["param_groups"] and plain["state"].keys() == sharded["state"].keys()
    for i, state in sharded["state"].items():
        assert {key: (type(v), v.shape) for key, v in state.items()} == {key: (type(v), v.shape) for key, v in plain["state"][i].items()}


def test_an_fsdp_checkpoint_resumes_in_one_process_where_fsdp_is_a_no_op(setup, runs, fsdp, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    assert main(argv(setup, resumed, "rag-sequence", 4, "train.batch_size=4", *REFRESH, FSDP) + ["--resume"]) == 0
    assert "train.fsdp has no effect in one process" in capsys.readouterr().err
    expected, got = by_step(runs["straight"], "loss"), by_step(resumed, "loss")
    assert [got[s] for s in (3, 4)] == pytest.approx([expected[s] for s in (3, 4)], rel=1e-5, abs=1e-6)


def test_a_checkpoint_resumes_on_two_ranks_with_fsdp(setup, runs, fsdp, tmp_path):
    """The FSDP run's checkpoint (whole tensors) is cut into shards again and continues the trajectory."""
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    torchrun(argv(setup, resumed, "rag-sequence", 4, *REFRESH, FSDP) + ["--resume"], tmp_path / "home")
    expected, got = by_step(runs["straight"], "loss"), by_step(resumed, "loss")
    assert [got[s] for s in (3, 4)] == pytest.approx([expected[s] for s in (3, 4)], rel=1e-5, abs=1e-6)


def test_fsdp_refuses_methods_that_run_the_generator_a_varying_number_of_times(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for sets in (["method.name=jsa"], ["method.name=vrag", "method.estimator=sample"]):
        with pytest.raises(UserError, match="train.fsdp: every rank must run the sharded generator equally often"):
            Trainer(load_config(None, sets + [FSDP]))
