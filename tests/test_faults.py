"""Faults through the real command line (issue 18): `kill -9` at random points of an index build and
of a training run, then the rebuild or `--resume`, must end where the uninterrupted run ends; a second
writer into a run's `--out` is refused while the first holds it, and the lock dies with its holder.

The kill points are drawn from a seeded generator over the uninterrupted command's measured duration,
so each seed kills at a different stage (start-up, corpus, encoding, a step, a checkpoint write) and a
failure reproduces with its seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import read_metrics, train_argv, weights_of
from conftest import QA

pytestmark = [pytest.mark.usefixtures("isolated_home"), pytest.mark.slow]


def command(*argv) -> list[str]:
    return [sys.executable, "-m", "jointrag", *map(str, argv)]


def environment(tmp_path: Path) -> dict:
    return {**os.environ, "JOINTRAG_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - started


def killed_after(argv: list[str], env: dict, delay: float) -> None:
    """Start `argv`, SIGKILL it after `delay` seconds (if it still runs) and reap it."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


def index_files(directory: Path) -> dict[str, bytes]:
    """Every file of an index, the manifest without its build time."""
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("build_seconds")
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def reference_index(files, tiny_dir, tmp_path_factory) -> tuple[list[str], Path, float]:
    """(argv without --out, the uninterrupted build, its duration)."""
    root = tmp_path_factory.mktemp("reference-index")
    argv = command("index", "--corpus", files["corpus"], "--retriever", tiny_dir / "encoder", "--precision", "fp32", "--batch-size", "2")
    seconds = timed([*argv, "--out", root / "index"], environment(root))
    return argv, root / "index", seconds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_index_build_leaves_nothing_or_the_old_index_and_rebuilds_the_same(reference_index, tmp_path, seed):
    argv, reference, seconds = reference_index
    env, out = environment(tmp_path), tmp_path / "index"
    delay = random.Random(seed).uniform(0.2, seconds)
    killed_after([*argv, "--out", out], env, delay)
    assert not out.exists() or index_files(out) == index_files(reference)  # nothing, or the whole index
    timed([*argv, "--out", out], env)
    assert index_files(out) == index_files(reference)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index.tmp-")] == []  # the killed build's temporary is gone
    before = index_files(out)  # a rebuild over it, killed: the old index stays whole
    killed_after([*argv, "--out", out], env, delay)
    assert index_files(out) == before


def train_lines(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if r["split"] == "train"]


@pytest.fixture(scope="module")
def reference_run(files, index_dir, tiny_dir, tmp_path_factory) -> tuple[callable, Path, float]:
    """(argv(out), the uninterrupted 4-step run, its duration); a checkpoint after every step."""
    root = tmp_path_factory.mktemp("reference-run")

    def argv(out: Path) -> list[str]:
        return command(*train_argv(files, index_dir, tiny_dir, out, "jsa", 4, "train.save_every=1", "train.schedule=constant"))

    seconds = timed(argv(root / "run"), environment(root))
    return argv, root / "run", seconds


@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_training_run_resumes_to_the_uninterrupted_weights(reference_run, tmp_path, seed):
    argv, reference, seconds = reference_run
    env, out = environment(tmp_path), tmp_path / "run"
    killed_after(argv(out), env, random.Random(seed).uniform(1.0, seconds))
    resumable = (out / "checkpoint" / "weights.pt").is_file()
    timed(argv(out) + (["--resume"] if resumable else []), env)
    expected, got = weights_of(reference), weights_of(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    assert train_lines(out) == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_a_second_writer_is_refused_until_the_first_dies(files, index_dir, tiny_dir, tmp_path):
    """A process holds the run directory; `jointrag eval` into it is refused with one line naming the
    holder, and leaves the directory as it was; once the holder is killed, the same command runs."""
    out, env = tmp_path / "eval", environment(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom jointrag.io import exclusive\n"
                               f"with exclusive({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "predictions.jsonl").write_text('{"id": "mine"}\n')
        argv = command("eval", "--index", index_dir, "--data", files["qa"], "--retrieval-only", "-k", "2", "--out", out)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"pid {holder.pid}" in done.stderr and str(out) in done.stderr
        assert (out / "predictions.jsonl").read_text() == '{"id": "mine"}\n'
    finally:
        holder.kill()
        holder.wait()
    timed(argv, env)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [row["id"] for row in QA] and all("gold_recall" in row for row in rows)
