"""Training-curve plots from a run's `metrics.jsonl` (`jointrag plot RUN_DIR`).

The training loop appends one JSON object per logged step: `step`, `split` ("train" or "eval") and
numeric metrics. This module draws them as PNGs in `RUN_DIR/plots/`, which can be looked at where
TensorBoard cannot run (a run directory copied back from a cluster, a CI artefact): the train loss,
EM and F1, the retrieval recalls and MRR, and every other train metric.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError, at
from ..io import jsonl_records

METRICS = "metrics.jsonl"
SPLITS = ("train", "eval")
NOT_METRICS = ("step", "time")  # the x axis, and the wall-clock timestamp the training loop adds

Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps ascending, values)


def read_metrics(path: Path) -> dict[str, Series]:
    """Each split's numeric metrics as (steps, values).

    A resumed run logs the steps after its last checkpoint again, so the last value logged for a step
    wins. `time` and values that are not numbers (a method name, a null) are not metrics: skipped.
    """
    if not path.is_file():
        raise UserError(f"{at(path)}: {'not a file' if path.exists() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{at(path)}: cannot read: {e}") from e
    points: dict[str, dict[str, dict[int, float]]] = {split: {} for split in SPLITS}
    for line_no, record in jsonl_records(path, text, objects=True):
        for field in ("step", "split"):
            if field not in record:
                raise UserError(f"{at(path, line_no, field)}: missing field")
        step, split = record["step"], record["split"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{at(path, line_no, 'step')}: expected an integer, got {step!r}")
        if split not in SPLITS:
            raise UserError(f"{at(path, line_no, 'split')}: expected 'train' or 'eval', got {split!r}")
        for key, value in record.items():
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                points[split].setdefault(key, {})[step] = float(value)
    return {
        split: {key: (sorted(by_step), [by_step[s] for s in sorted(by_step)]) for key, by_step in metrics.items()}
        for split, metrics in points.items()
    }


def moving_average(values: list[float]) -> list[float]:
    """Exponential moving average over a span of 2% of the points (at least 10), so short and long
    runs come out about equally smooth. Non-finite values (a NaN loss) are skipped, not propagated."""
    span = max(10.0, 0.02 * len(values))
    weight = 1 - 2 / (span + 1)
    average, out = math.nan, []
    for value in values:
        if math.isfinite(value):
            average = value if math.isnan(average) else weight * average + (1 - weight) * value
        out.append(average)
    return out


def _save(path: Path, panels: list[tuple[str, list[tuple]]], columns: int = 1) -> Path:
    """Draw panels `(title, [(label, steps, values, style), ...])` in a grid and write a PNG.

    A bare Figure on the Agg canvas, not pyplot: no global backend state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(7, 4) if len(panels) == 1 else (4 * columns, 3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for i, (title, lines) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, i + 1)
        for label, steps, values, style in lines:
            axes.plot(steps, values, label=label, **style)
        axes.set(title=title, xlabel="step")
        axes.grid(alpha=0.3)
        if len(lines) > 1:
            axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_run(run_dir: Path | str) -> list[Path]:
    """Write loss.png, eval.png, recall.png and train_extra.png into `run_dir/plots/`, each only
    where its metrics were logged; returns the paths written."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir / METRICS)
    train, evals = series["train"], series["eval"]
    out = run_dir / "plots"
    written = []
    if "loss" in train:
        steps, values = train["loss"]
        lines = [("loss", steps, values, {"alpha": 0.3}), ("moving average", steps, moving_average(values), {})]
        if "loss" in evals:
            lines.append(("eval loss", *evals["loss"], {"marker": "o"}))
        written.append(_save(out / "loss.png", [("loss", lines)]))
    quality = [(key, *evals[key], {"marker": "o"}) for key in ("em", "f1") if key in evals]
    if quality:
        written.append(_save(out / "eval.png", [("exact match and F1", quality)]))
    recall = [(key, *evals[key], {"marker": "o"}) for key in evals if "recall" in key or "mrr" in key]
    if recall:
        written.append(_save(out / "recall.png", [("retrieval", recall)]))
    extra = [(key, [(key, *train[key], {})]) for key in train if key != "loss"]
    if extra:
        written.append(_save(out / "train_extra.png", extra, columns=min(3, len(extra))))
    return written


def plot_bars(path: Path, title: str, groups: dict[str, dict[str, float]]) -> Path:
    """Grouped bars: one group per metric, one bar per row of `groups` ({row: {metric: value}})."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(next(iter(groups.values())))
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(groups)
    for i, (row, values) in enumerate(groups.items()):
        bars = axes.bar([m + i * width for m in range(len(metrics))], [values[key] for key in metrics], width, label=row)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks([m + width * (len(groups) - 1) / 2 for m in range(len(metrics))], metrics)
    axes.set(title=title, ylabel="%")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
