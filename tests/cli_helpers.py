"""Helpers shared by the command-line tests: write JSONL fixtures, run `jointrag` in-process, check
that a user error is reported as one line with exit status 2, and run and check `jointrag train` on
the tiny models: its command line, a finished run directory, and resuming a run (`--resume`)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from jointrag.cli import EXIT_USER_ERROR, main


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, *argv, names: tuple[str, ...] = ()) -> str:
    """Exit status 2 and one `jointrag: error:` line, the last on stderr, without a traceback."""
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # tqdm bars may precede it
    assert lines and lines[-1].startswith("jointrag: error: "), err
    assert sum("jointrag: error" in line for line in lines) == 1
    for name in names:
        assert name in lines[-1], lines[-1]
    return lines[-1]


# --- `jointrag train` on the tiny models -----------------------------------------------------------


def train_argv(files, index_dir, tiny_dir, out, method="jsa", steps=2, *sets, generator="causal") -> list[str]:
    """`jointrag train` on the tiny models: batch 2, k 3, 5 proposals, 3 dev questions, 3 new tokens."""
    argv = ["train", "--method", method, "--index", index_dir, "--data", files["qa"], "--out", out, "--steps", steps]
    defaults = [f"data.dev={files['qa']}", f"model.generator={tiny_dir / generator}", "train.batch_size=2",
                "method.k=3", "method.proposals=5", "eval.limit=3", "eval.max_new_tokens=3", "eval.k=3",
                "train.precision=fp32"]
    for setting in defaults + list(sets):
        argv += ["--set", setting]
    return [str(a) for a in argv]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_lines(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r["split"] == "train" and "loss" in r]


def weights_of(out: Path) -> dict:
    return torch.load(Path(out) / "checkpoint" / "weights.pt", weights_only=True)


def assert_complete_run(out: Path, steps: int) -> list[dict]:
    """The run directory of a finished run; returns its train lines."""
    out = Path(out)
    for name in ("weights.pt", "trainer.pt", "config.yaml"):
        assert (out / "checkpoint" / name).is_file(), name
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    assert (out / "plots" / "loss.png").is_file()
    records = read_metrics(out)
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and evals[-1]["step"] == steps
    assert {"em", "f1"} <= evals[-1].keys() and all(0 <= evals[-1][k] <= 100 for k in ("em", "f1"))
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["step"] == steps
    return train


def check_method_lines(method: str, train: list[dict]) -> None:
    if method == "jsa":
        assert all(0.0 <= r["acceptance"] <= 1.0 for r in train)
        assert all(r["distinct_states"] >= 1 and r["pool"] >= 3 for r in train)
    if method == "vrag":
        assert all(r["kl"] >= 0.0 and math.isfinite(r["elbo"]) for r in train)


# --- resuming a run ---------------------------------------------------------------------------------


def losses_by_step(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_lines(out)}


def assert_same_trajectory(straight: Path, resumed: Path) -> None:
    """A 4-step run and a 4-step run resumed after step 2 or 3 end with the same weights, and log the
    same losses for steps 3 and 4."""
    a, b = weights_of(straight), weights_of(resumed)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)
    expected, got = losses_by_step(straight), losses_by_step(resumed)
    assert [r["step"] for r in train_lines(resumed)] == [1, 2, 3, 4]  # each step logged once
    evals = [r["step"] for r in read_metrics(resumed) if r["split"] == "eval"]
    assert evals == sorted(set(evals))
    assert len(list((resumed / "tensorboard").iterdir())) == 1  # one event file, rebuilt from the kept rows
    assert [got[s] for s in (3, 4)] == pytest.approx([expected[s] for s in (3, 4)], rel=1e-6, abs=1e-7)
    assert torch.load(resumed / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 4


def assert_resumes_on_the_same_trajectory(
    root: Path,
    argv: Callable[[Path, int], list[str]],
    *,
    interrupt: tuple[type, int] | None = None,
    saved_step: int = 2,
    saved: Callable[[dict], object] | None = None,
    signal_number: int | None = None,
) -> Path:
    """Train 4 steps straight in `root/straight`, and 4 steps in two parts in `root/resumed`, then
    `assert_same_trajectory`; returns the resumed run directory.

    `argv(out, steps)` is the `jointrag train` command line of a run. The first part is a 2-step run,
    which `--resume` with 4 steps then extends; or, with `interrupt=(objective class, n)`, a 4-step run
    interrupted (exit status 130) by a KeyboardInterrupt raised in the n-th call of that objective, or
    with `signal_number` by that signal sent to this process in that call. Either leaves the checkpoint
    of step `saved_step`; `saved(trainer state)` must be true of it.
    """
    straight, resumed = root / "straight", root / "resumed"
    assert main(argv(straight, 4)) == 0
    if interrupt is None:
        assert main(argv(resumed, 2)) == 0
    else:
        objective, stop_at = interrupt
        calls, original = [], objective.__call__

        def interrupted(self, system, batch):
            calls.append(1)
            if len(calls) == stop_at:
                if signal_number is None:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal_number)
            return original(self, system, batch)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(objective, "__call__", interrupted)
            assert main(argv(resumed, 4)) == 130
    state = torch.load(resumed / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == saved_step
    assert saved is None or saved(state)
    assert main(argv(resumed, 4) + ["--resume"]) == 0
    assert_same_trajectory(straight, resumed)
    return resumed


def resume_finished_pipeline(out: Path):
    """`train(config, resume=True)` of the finished multi-stage run `out`, with training forbidden: every
    stage must be found finished and skipped. Returns what `train` returns (the comparison table)."""
    from jointrag.config import load_config
    from jointrag.train import loop, train

    def no_training(self, resume=False):
        raise AssertionError("a finished stage was trained again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop.Trainer, "run", no_training)
        return train(load_config(str(Path(out) / "config.yaml")), resume=True)
