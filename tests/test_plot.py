"""Tests for jointrag.evaluation.plot: the PNGs a run's metrics.jsonl gives, what their figures show (labels,
ticks, smoothing, overlapping series, titles), the errors for bad input, and the `jointrag plot` subcommand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jointrag.cli import EXIT_USER_ERROR, main
from jointrag.errors import UserError
from jointrag.evaluation.plot import figures, moving_average, plot_run, read_metrics, smoothing_window

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
    assert moving_average([], 10) == []
    smoothed = moving_average([1.0, math.nan, 1.0, 3.0], 10)
    assert smoothed[:3] == [1.0, 1.0, 1.0] and 1.0 < smoothed[3] < 3.0
    assert math.isnan(moving_average([math.nan, 2.0], 10)[0])


def test_moving_average_is_the_mean_of_the_last_window():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]


def test_smoothing_window_fits_the_run():
    for points in range(200):
        window = smoothing_window(points)
        assert 0 <= window <= points // 2
    assert smoothing_window(5) == 0 and smoothing_window(40) == 10 and smoothing_window(10_000) == 200


def labels(axes) -> list[str]:
    return [line.get_label() for line in axes.get_lines()]


@pytest.mark.parametrize(("steps", "smoothed"), [(3, None), (40, "moving average (10 points)")])
def test_loss_smoothing_is_labelled_and_never_wider_than_the_run(tmp_path, steps, smoothed):
    run = write_run(tmp_path / "run", training_log(steps))
    (axes,) = figures(run)["loss.png"].axes
    assert labels(axes) == ["loss"] + ([smoothed] if smoothed else [])
    if not smoothed:  # a few points, unsmoothed: drawn plainly, with markers
        assert axes.get_lines()[0].get_marker() == "o" and axes.get_lines()[0].get_alpha() is None


def test_every_axis_has_a_y_label(tmp_path):
    run = write_run(tmp_path / "run", training_log())
    for figure in figures(run).values():
        for axes in figure.axes:
            assert axes.get_ylabel(), axes.get_title()
            assert axes.get_xlabel() == "step"


def test_short_runs_get_integer_step_ticks(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1.0 / s, "grad_norm": 1.0} for s in (1, 2, 3)]
    rows += [{"step": s, "split": "eval", "em": 10.0 * s, "f1": 20.0 * s, "gold_recall@1": 5.0 * s} for s in (0, 3)]
    for name, figure in figures(write_run(tmp_path / "run", rows)).items():
        figure.canvas.draw()
        for axes in figure.axes:
            ticks = axes.get_xticks()
            assert len(ticks) >= 2 and all(tick == int(tick) for tick in ticks), (name, ticks)


def test_identical_series_both_stay_visible(tmp_path):
    rows = [{"step": s, "split": "eval", "gold_recall@1": 40.0 + s, "answer_recall@1": 40.0 + s, "mrr@5": 50.0 + s,
             "gold_recall@5": 40.0 + s} for s in (10, 20, 30)]
    (axes,) = figures(write_run(tmp_path / "run", rows))["recall.png"].axes
    assert labels(axes) == ["gold_recall@1", "answer_recall@1 (identical to gold_recall@1)", "mrr@5",
                            "gold_recall@5 (identical to gold_recall@1)"]
    assert labels(axes) == [text.get_text() for text in axes.get_legend().get_texts()]
    first, second, third, fourth = axes.get_lines()
    for twin, below in ((second, [first]), (fourth, [first, second])):
        for line in below:
            assert (twin.get_linestyle(), twin.get_marker()) != (line.get_linestyle(), line.get_marker()) or \
                twin.get_markerfacecolor() != line.get_markerfacecolor()
            assert twin.get_zorder() > line.get_zorder() and twin.get_markersize() > line.get_markersize()
    assert fourth.get_linestyle() != second.get_linestyle()
    assert len({line.get_marker() for line in (first, second, third)}) == 3  # each series its own marker


def test_titles_name_the_run_and_the_dev_set(tmp_path):
    rows = [{**row, "examples": 30} if row["split"] == "eval" else row for row in training_log(20)]
    run = write_run(tmp_path / "vrag-squad", rows)
    (run / "config.yaml").write_text("eval:\n  limit: 30\n")
    made = figures(run)
    for name in ("eval.png", "recall.png"):
        assert made[name].get_suptitle() == "run vrag-squad\ndev: embedded SQuAD dev split (30 questions)"
    for name in ("loss.png", "train_extra.png"):  # train metrics only
        assert made[name].get_suptitle() == "run vrag-squad"
    assert "examples" not in str([ax.get_legend_handles_labels()[1] for ax in made["eval.png"].axes])  # a count, not a curve


def test_titles_name_a_dev_file_and_its_size(tmp_path):
    dev = tmp_path / "my_dev.jsonl"
    run = write_run(tmp_path / "run", [{**row, "examples": 3} if row["split"] == "eval" else row for row in training_log(10)])
    (run / "config.yaml").write_text(f"data:\n  train: {dev}\n  dev: {dev}\n")
    assert figures(run)["eval.png"].get_suptitle() == "run run\ndev: my_dev.jsonl (3 questions)"
    run = write_run(tmp_path / "older", training_log(10))  # a log from before eval rows held their size: eval.limit
    (run / "config.yaml").write_text(f"data:\n  train: {dev}\n  dev: {dev}\n")
    assert figures(run)["eval.png"].get_suptitle() == "run older\ndev: my_dev.jsonl (up to 100 questions)"


def test_titles_without_a_config(tmp_path):
    run = write_run(tmp_path / "run", training_log(10))
    assert figures(run)["eval.png"].get_suptitle() == "run run\ndev set unknown (no config.yaml)"
    (run / "config.yaml").write_text("eval:\n  nonsense: 1\n")
    assert figures(run)["eval.png"].get_suptitle() == "run run\ndev set unknown (config.yaml unreadable)"


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
