"""Tests for jointrag.evaluation.plot: the PNGs a run's metrics.jsonl gives, the errors for bad input, and the
`jointrag plot` subcommand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jointrag.cli import EXIT_USER_ERROR, main
from jointrag.errors import UserError
from jointrag.evaluation.plot import moving_average, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, lines) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return run_dir


def training_log(steps: int = 40) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "split": "train", "loss": 3 / step + 0.1 * math.sin(step), "lr_generator": 1e-4, "lr_retriever": 1e-5, "grad_norm": 1.0 + step % 3, "kl": 0.5 / step})
        if step % 10 == 0:
            rows.append({"step": step, "split": "eval", "em": step / 100, "f1": step / 80, "gold_recall@1": 0.2, "gold_recall@5": 0.5, "answer_recall@1": 0.3, "mrr@5": 0.4})
    return rows


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def test_writes_every_plot(tmp_path):
    run = write_run(tmp_path / "run", training_log())
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "eval.png", "recall.png", "train_extra.png"]
    for path in paths:
        assert path.parent == run / "plots"
        assert_png(path)


def test_skips_plots_without_data(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "split": "train", "loss": 1.5}])
    assert [p.name for p in plot_run(run)] == ["loss.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png"]
    assert plot_run(write_run(tmp_path / "empty", [])) == []


def test_read_metrics_keeps_the_last_value_of_a_step_and_only_numbers(tmp_path):
    run = write_run(tmp_path / "run", [
        {"step": 1, "split": "train", "time": 1.7e9, "loss": 3.0, "method": "vrag"},
        {"step": 2, "split": "train", "loss": 2.0, "skipped": True},
        "",
        {"step": 2, "split": "train", "loss": 2.5},  # resumed from step 1
        {"step": 2, "split": "eval", "em": 0.5, "f1": None},
    ])
    series = read_metrics(run / "metrics.jsonl")
    assert series["train"] == {"loss": ([1, 2], [3.0, 2.5])}
    assert series["eval"] == {"em": ([2], [0.5])}


def test_moving_average_skips_nan():
    assert moving_average([]) == []
    smoothed = moving_average([1.0, math.nan, 1.0, 3.0])
    assert smoothed[:3] == [1.0, 1.0, 1.0] and 1.0 < smoothed[3] < 3.0


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file") as error:
        plot_run(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in str(error.value)


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        ('{"step": 3, "split": "train", "loss":', ("line 2: invalid JSON: Expecting value",)),
        ("[1, 2]", ("line 2: expected a JSON object, got list",)),
        ('{"split": "train", "loss": 1.0}', ("line 2", "'step'", "missing")),
        ('{"step": "3", "split": "train"}', ("line 2", "'step'", "integer")),
        ('{"step": 3, "split": "test"}', ("line 2", "'split'", "'train' or 'eval'")),
    ],
)
def test_malformed_line(tmp_path, bad, names):
    run = write_run(tmp_path / "run", [{"step": 1, "split": "train", "loss": 1.0}, bad])
    with pytest.raises(UserError) as error:
        plot_run(run)
    message = str(error.value)
    assert message.startswith(str(run / "metrics.jsonl"))
    for name in names:
        assert name in message, message


def test_cli(capsys, tmp_path):
    run = write_run(tmp_path / "run", training_log(20))
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "plots" / name) for name in ("loss.png", "eval.png", "recall.png", "train_extra.png")]
    for path in printed:
        assert_png(Path(path))
    assert main(["plot", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == printed


def test_cli_errors(capsys, tmp_path):
    assert main(["plot", str(tmp_path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("jointrag: error: ") and str(tmp_path / "metrics.jsonl") in err and "Traceback" not in err
    write_run(tmp_path, ["not json"])
    assert main(["plot", str(tmp_path)]) == EXIT_USER_ERROR
    assert "line 1" in capsys.readouterr().err
