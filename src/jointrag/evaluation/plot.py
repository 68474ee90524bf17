"""Training-curve plots from a run's `metrics.jsonl` (`jointrag plot RUN_DIR`).

The training loop appends one JSON object per logged step: `step`, `split` ("train" or "eval") and
numeric metrics. This module draws them as PNGs in `RUN_DIR/plots/`, which can be looked at where
TensorBoard cannot run (a run directory copied back from a cluster, a CI artefact): the train loss,
EM and F1, the retrieval recalls and MRR, and every other train metric. Each figure is titled with the
run directory's name and, where it shows dev metrics, the dev set, which only the run's config.yaml
records.
"""

from __future__ import annotations

import math
from itertools import cycle
from pathlib import Path

import numpy as np

from ..errors import UserError, at
from ..io import jsonl_records

METRICS = "metrics.jsonl"
SPLITS = ("train", "eval")
NOT_METRICS = ("step", "time")  # the x axis, and the wall-clock timestamp the training loop adds

CONFIG = "config.yaml"  # the run's settings, which say what the dev set was
MIN_WINDOW = 10  # points a moving average spans at least
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # one per dev series of a panel
DASHES = ("--", ":", "-.")  # lines drawn over identical ones
UNITS = {"grad_norm": "gradient norm before clipping", "sec_per_step": "seconds", "staleness": "percentage points"}

Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps ascending, values)
Line = tuple[str, list[int], list[float], dict]  # label, steps, values, keyword arguments of Axes.plot
Panel = tuple[str, str, list[Line]]  # title, y-axis label, lines


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


def smoothing_window(points: int) -> int:
    """Points the moving average of a `points`-long series spans: 2% of them, at least MIN_WINDOW, so
    short and long runs come out about equally smooth. 0 (no moving average) under 2 * MIN_WINDOW
    points: a window would span much of the run, and so few points are read best as they are."""
    return max(MIN_WINDOW, round(0.02 * points)) if points >= 2 * MIN_WINDOW else 0


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start). Non-finite values
    (a NaN loss) are left out of the means, not propagated; a window without a finite value is NaN."""
    x = np.asarray(values, dtype=float)
    finite = np.isfinite(x)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, x, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((sums[end] - sums[start]) / (counts[end] - counts[start])).tolist()


def eval_set(run_dir: Path, questions: int | None) -> str:
    """What the run's dev metrics were computed on, e.g. "dev: embedded SQuAD dev split (100 questions)":
    the set from the run's config.yaml (`data.dev`), the size from the eval rows' `examples` (older
    logs lack it: then `eval.limit`). A run directory copied without its config.yaml, or with one this
    version cannot read, still gets its plots, titled "dev set unknown"."""
    path = run_dir / CONFIG
    if not path.is_file():
        return f"dev set unknown (no {CONFIG})"
    from ..config import EMBEDDED, load_config

    try:
        config = load_config(str(path))
    except UserError:
        return f"dev set unknown ({CONFIG} unreadable)"
    dev, limit = config.data.dev, config.eval.limit
    name = "embedded SQuAD dev split" if dev in (None, EMBEDDED) else Path(dev).name
    if questions is None:
        return f"dev: {name} ({f'up to {limit}' if limit else 'all'} questions)"
    return f"dev: {name} ({questions} questions)"


def _ylabel(key: str) -> str:
    """The y-axis label of a train metric: its unit where the name tells it, else the name."""
    if key.startswith("lr_"):
        return "learning rate"
    if "recall" in key:
        return "%"
    return UNITS.get(key, key)


def _keep_visible(lines: list[Line]) -> list[Line]:
    """A line identical to earlier ones (prior and posterior recall alike, say) would hide them: it is
    labelled "(identical to X)" and drawn above them dashed, with larger hollow markers, so all show."""
    out = []
    for i, (label, steps, values, style) in enumerate(lines):
        twins = [other[0] for other in lines[:i] if other[1:3] == (steps, values)]
        if twins:
            label = f"{label} (identical to {twins[0]})"
            style = {**style, "linestyle": DASHES[(len(twins) - 1) % len(DASHES)], "markerfacecolor": "none",
                     "markersize": 6 + 3 * len(twins), "zorder": 2 + len(twins)}
        out.append((label, steps, values, style))
    return out


def _figure(title: str, panels: list[Panel], columns: int = 1):
    """Panels `(title, y label, lines)` in a grid under `title`. Steps are integers, so the step axes
    get integer ticks (a short run would otherwise show steps like 1.25).

    A bare Figure on the Agg canvas, not pyplot: no global backend state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(7, 4.5) if len(panels) == 1 else (4 * columns, 3 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for i, (name, ylabel, lines) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, i + 1)
        for label, steps, values, style in _keep_visible(lines):
            axes.plot(steps, values, label=label, **style)
        axes.set(title=name, xlabel="step", ylabel=ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(lines) > 1:
            axes.legend()
    return figure


def _points(n: int) -> dict:
    """The style of a raw series: markers where it has too few points to read as a curve (one point
    would not show at all without)."""
    return {"marker": "o"} if n < 2 * MIN_WINDOW else {}


def _marked(evals: Series, keys: list[str]) -> list[Line]:
    """The dev series `keys`, each with its own marker: series that meet at a point stay told apart."""
    return [(key, *evals[key], {"marker": marker}) for key, marker in zip(keys, cycle(MARKERS))]


def figures(run_dir: Path | str) -> dict:
    """The figures of `run_dir/metrics.jsonl` by file name: loss.png, eval.png, recall.png and
    train_extra.png, each only where its metrics were logged. Each is titled with the run directory's
    name; those with dev metrics also name the dev set (`eval_set`)."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir / METRICS)
    train, evals = series["train"], series["eval"]
    run = f"run {run_dir.resolve().name}"
    questions = evals.pop("examples", None)  # a count, not a curve
    on_dev = f"{run}\n{eval_set(run_dir, int(questions[1][-1]) if questions else None)}" if evals else run
    out = {}
    if "loss" in train:
        steps, values = train["loss"]
        window = smoothing_window(len(values))
        lines = [("loss", steps, values, {"alpha": 0.3} if window else _points(len(values)))]
        if window:
            lines.append((f"moving average ({window} points)", steps, moving_average(values, window), {}))
        if "loss" in evals:
            lines.append(("dev loss", *evals["loss"], {"marker": "o"}))
        out["loss.png"] = _figure(on_dev if "loss" in evals else run, [("loss", "loss", lines)])
    quality = _marked(evals, [key for key in ("em", "f1") if key in evals])
    if quality:
        out["eval.png"] = _figure(on_dev, [("exact match and F1", "score (%)", quality)])
    recall = _marked(evals, [key for key in evals if "recall" in key or "mrr" in key])
    if recall:
        out["recall.png"] = _figure(on_dev, [("retrieval", "score (%)", recall)])
    extra = [(key, _ylabel(key), [(key, *train[key], _points(len(train[key][0])))]) for key in train if key != "loss"]
    if extra:
        out["train_extra.png"] = _figure(run, extra, columns=min(3, len(extra)))
    return out


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_run(run_dir: Path | str) -> list[Path]:
    """Write `figures(run_dir)` as PNGs into `run_dir/plots/`; returns the paths written."""
    return [_save(figure, Path(run_dir) / "plots" / name) for name, figure in figures(run_dir).items()]


def plot_panels(path: Path, title: str, panels: list[Panel], columns: int = 1) -> Path:
    """Panels of lines `(title, y label, [(label, steps, values, style)])` over training steps, as a PNG."""
    return _save(_figure(title, panels, columns), path)


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
    return _save(figure, path)
