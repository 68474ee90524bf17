"""Paired comparison of evaluated runs on the same questions (`jointrag compare`).

Two systems answering the same questions make correlated errors: most questions are easy or hard
for both. Comparing their two means, each with its own interval, throws that pairing away and calls
real gains noise; comparing per-question differences keeps it. So each comparison here is paired:

- wins / ties / losses: questions on which B scores above, equal to, below A;
- p: the two-sided exact sign test of wins against losses, ties dropped (a binomial(n, 1/2) tail,
  computed exactly with integers; p = 1 when no question differs);
- 95% CI: the percentile interval of the mean difference over a paired bootstrap (questions drawn
  with replacement, 10,000 resamples by default), from a seeded generator so that the same inputs
  give the same interval.

A run is a predictions file, one row per question as `evaluate.score_example` writes it:
`DIR/predictions.jsonl` of `jointrag eval --out DIR`, or a pipeline table's `<row>.jsonl`. Runs are
put in groups, one per method, with several seeds of a method in one group: a group's per-question
score is the mean over its seeds, and the table shows each metric's mean ± standard deviation over
the seeds (sample deviation, ddof = 1). Every group is compared against one reference group.

Runs are aligned by question id, so files listing the same questions in another order compare fine;
runs on different questions (an id missing or extra, or one id asking another question) are refused
at the first mismatch. Scores are percentages like eval's metrics (EM 0-100); differences are in
points, B - A.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, at
from ..io import jsonl_records

PREDICTIONS = "predictions.jsonl"
SCALARS = ("em", "f1", "rouge_l", "mrr")  # per-question fields holding one score
CUTOFFS = ("gold_recall", "answer_recall")  # per-question fields holding {cutoff: score}
ORDER = ("em", "f1", "rouge_l", "gold_recall", "answer_recall", "mrr")  # the order of the table's rows
CONFIDENCE = 0.95
TIE = 1e-12  # seed means of equal scores summed in another order may differ in the last bit
BOOTSTRAP_CHUNK = 4_000_000  # resampled indices held in memory at once: 32 MB


@dataclasses.dataclass(frozen=True)
class Run:
    """One predictions file: its questions in file order, and each metric's per-question score in
    [0, 1], NaN where a question has none (gold recall of a question without gold ids)."""

    path: Path
    ids: tuple[str, ...]
    questions: tuple[str, ...]
    lines: tuple[int, ...]  # the file line of each question, for error messages
    scores: dict[str, np.ndarray]  # metric -> (Q,)


@dataclasses.dataclass(frozen=True)
class Group:
    """A method's runs, one per seed; compared through the per-question mean over its runs."""

    name: str
    runs: tuple[Run, ...]


def predictions_path(path: str | Path) -> Path:
    """The predictions file of `path`: the file itself, or DIR/predictions.jsonl of an eval directory."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS
        if not path.is_file():
            raise UserError(f"{path.parent}: no {PREDICTIONS} in it (expected the --out directory of `jointrag eval` "
                            "or a predictions .jsonl file)")
    elif not path.is_file():
        raise UserError(f"{path}: no such file or directory")
    return path


def _score(value: Any, path: Path, line: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{at(path, line, field)}: expected a score between 0 and 1, got {value!r}")
    return float(value)


def row_scores(row: dict, path: Path, line: int) -> dict[str, float]:
    """The per-question scores of one predictions row: `em`, `f1`, `rouge_l`, `mrr`, and
    `gold_recall@k`, `answer_recall@k` for each cutoff k (a string key in JSON, "5")."""
    scores = {name: _score(row[name], path, line, name) for name in SCALARS if name in row}
    for name in CUTOFFS:
        if name not in row:
            continue
        by_cutoff = row[name]
        if not isinstance(by_cutoff, dict):
            raise UserError(f"{at(path, line, name)}: expected an object of cutoff: score, got {by_cutoff!r}")
        for cutoff, value in by_cutoff.items():
            if not str(cutoff).isdigit():
                raise UserError(f"{at(path, line, name)}: expected integer cutoffs, got {cutoff!r}")
            scores[f"{name}@{int(cutoff)}"] = _score(value, path, line, f"{name}.{cutoff}")
    return scores


def read_run(path: str | Path) -> Run:
    """The run in `path` (a predictions file or an eval directory); a UserError names the file, line
    and field of a row that is not JSON, lacks `id` or `question`, repeats an id or holds a bad score."""
    path = predictions_path(path)
    ids, questions, lines, rows = [], [], [], []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line, record in jsonl_records(path, f, objects=True):
                for field in ("id", "question"):
                    if field not in record:
                        raise UserError(f"{at(path, line, field)}: missing field")
                    if not isinstance(record[field], str):
                        raise UserError(f"{at(path, line, field)}: expected a string, got {record[field]!r}")
                if record["id"] in seen:
                    raise UserError(f"{at(path, line, 'id')}: id {record['id']!r} already on line {seen[record['id']]}")
                seen[record["id"]] = line
                ids.append(record["id"])
                questions.append(record["question"])
                lines.append(line)
                rows.append(row_scores(record, path, line))
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None
    if not rows:
        raise UserError(f"{path}: no predictions in it")
    names = {name for row in rows for name in row}
    scores = {name: np.array([row.get(name, math.nan) for row in rows]) for name in names}
    return Run(path, tuple(ids), tuple(questions), tuple(lines), scores)


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def align(first: Run, run: Run) -> Run:
    """`run` with its questions in `first`'s order; a UserError at the first question they do not share."""
    where = {question_id: i for i, question_id in enumerate(run.ids)}
    first_ids = set(first.ids)
    sizes = f"{len(run.ids)} questions there, {len(first.ids)} in {first.path}; compare needs runs on the same questions"
    missing = next((i for i in first.ids if i not in where), None)
    if missing is not None:
        raise UserError(f"{run.path}: question id {missing!r} of {first.path} is missing ({sizes})")
    extra = next((j for j, i in enumerate(run.ids) if i not in first_ids), None)
    if extra is not None:
        raise UserError(f"{at(run.path, run.lines[extra], 'id')}: question id {run.ids[extra]!r} is not in {first.path} ({sizes})")
    order = np.array([where[i] for i in first.ids])
    for i, j in enumerate(order):
        if run.questions[j] != first.questions[i]:
            raise UserError(f"{at(run.path, run.lines[j], 'question')}: id {first.ids[i]!r} asks {_short(run.questions[j])}, "
                            f"in {first.path} it asks {_short(first.questions[i])}: the runs were evaluated on different data")
    scores = {name: values[order] for name, values in run.scores.items()}
    return Run(run.path, first.ids, first.questions, tuple(run.lines[j] for j in order), scores)


def parse_group(spec: str) -> tuple[str, list[str]]:
    """(name, paths) of `NAME=PATH[,PATH...]`; a spec without `=` (or that is itself an existing
    path) is its own group, named after it."""
    name, sep, paths = spec.partition("=")
    if not sep or Path(spec).exists():
        name, paths = spec.rstrip("/") or spec, spec
    names = [p for p in paths.split(",") if p]
    if not name or not names:
        raise UserError(f"'{spec}': expected PATH or NAME=PATH[,PATH...]")
    return name, names


def load_groups(specs: Sequence[str]) -> list[Group]:
    """The groups `specs` name, every run read and aligned on the first run's questions."""
    parsed = [parse_group(spec) for spec in specs]
    names = [name for name, _ in parsed]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise UserError(f"group name '{repeated}' given twice: name the groups apart, e.g. base=DIR other=DIR")
    groups, first = [], None
    for name, paths in parsed:
        runs = []
        for path in paths:
            run = read_run(path)
            first = first or run
            runs.append(align(first, run))
        groups.append(Group(name, tuple(runs)))
    return groups


def metric_key(name: str) -> tuple[int, int]:
    family, _, cutoff = name.partition("@")
    return ORDER.index(family), int(cutoff or 0)


def shared_metrics(groups: Sequence[Group]) -> list[str]:
    """The metrics every run scores, on at least one question that every run scores, in table order."""
    runs = [run for group in groups for run in group.runs]
    names = set.intersection(*(set(run.scores) for run in runs))
    jointly = [name for name in names if np.all([~np.isnan(run.scores[name]) for run in runs], axis=0).any()]
    return sorted(jointly, key=metric_key)


def default_metrics(available: Sequence[str]) -> list[str]:
    """EM, F1, ROUGE-L and gold recall at each cutoff where scored; answer recall where no gold is known."""
    gold = any(name.startswith("gold_recall@") for name in available)
    wanted = ("em", "f1", "rouge_l", "gold_recall") if gold else ("em", "f1", "rouge_l", "answer_recall")
    return [name for name in available if name.partition("@")[0] in wanted]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: p = min(1, 2 P(X <= min(wins, losses))), X ~ binomial(wins + losses, 1/2).

    Summed exactly in integers (no float underflow at thousands of questions): C(n, i+1) = C(n, i) (n-i) / (i+1).
    """
    n = wins + losses
    tail, term = 0, 1
    for i in range(min(wins, losses) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2 ** n)


def bootstrap_interval(differences: np.ndarray, resamples: int = 10_000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean of `differences` (Q,) over `resamples` paired bootstrap samples.

    Indices are drawn in chunks whose size depends on Q alone, so a seed gives the same interval on
    every machine, and memory stays bounded at any Q x resamples.
    """
    rng = np.random.default_rng(seed)
    count = len(differences)
    chunk = max(1, BOOTSTRAP_CHUNK // count)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        drawn = rng.integers(0, count, size=(stop - start, count))  # (R, Q)
        means[start:stop] = differences[drawn].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def seed_summary(scores: np.ndarray) -> tuple[float, float | None, list[float]]:
    """(mean, std, per-seed means) in percent of `scores` (S seeds, Q questions); std is the sample
    deviation over seeds, None for one seed."""
    per_seed = 100 * scores.mean(axis=1)  # (S,)
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    return float(per_seed.mean()), std, [float(v) for v in per_seed]


def compare_pair(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """Paired statistics of B against A, each (S seeds, Q questions) of scores in [0, 1]: the
    per-question seed means are compared; every number but the counts and p is in percent."""
    mean_a, std_a, seeds_a = seed_summary(a)
    mean_b, std_b, seeds_b = seed_summary(b)
    differences = 100 * (b.mean(axis=0) - a.mean(axis=0))  # (Q,)
    wins, losses = int((differences > 100 * TIE).sum()), int((differences < -100 * TIE).sum())
    low, high = bootstrap_interval(differences, resamples, seed)
    return {
        "questions": len(differences), "mean_a": mean_a, "std_a": std_a, "seeds_a": seeds_a,
        "mean_b": mean_b, "std_b": std_b, "seeds_b": seeds_b, "diff": float(differences.mean()),
        "wins": wins, "ties": len(differences) - wins - losses, "losses": losses,
        "p": sign_test(wins, losses), "ci_low": low, "ci_high": high,
    }


def compare_groups(groups: Sequence[Group], reference: str | None = None, metrics: Sequence[str] | None = None,
                   resamples: int = 10_000, seed: int = 0) -> dict:
    """Every group against the reference (default: the first) on each metric, over the questions
    that every run scores on that metric; a report of plain values (`--json` prints it)."""
    if len(groups) < 2:
        raise UserError("compare needs two or more groups of runs, e.g. base=runs/eval0 jsa=runs/jsa_s0,runs/jsa_s1")
    names = [group.name for group in groups]
    reference = names[0] if reference is None else reference
    if reference not in names:
        raise UserError(f"reference '{reference}' is not a group; the groups are {', '.join(names)}")
    available = shared_metrics(groups)
    if metrics is None:
        metrics = default_metrics(available)
    for name in metrics:
        if name not in available:
            raise UserError(f"metric '{name}' is not scored in every run; shared: {', '.join(available) or 'none'}")
    if not metrics:
        raise UserError(f"no metric is scored in every run (shared: {', '.join(available) or 'none'})")
    comparisons = []
    for other in [name for name in names if name != reference]:
        for name in metrics:
            stacked = {g.name: np.stack([run.scores[name] for run in g.runs]) for g in groups}  # (S, Q) each
            scored = np.all([~np.isnan(s).any(axis=0) for s in stacked.values()], axis=0)  # (Q,) scored in every run
            pair = compare_pair(stacked[reference][:, scored], stacked[other][:, scored], resamples, seed)
            comparisons.append({"a": reference, "b": other, "metric": name, **pair})
    return {
        "reference": reference,
        "questions": len(groups[0].runs[0].ids),
        "groups": [{"name": g.name, "runs": [str(run.path) for run in g.runs]} for g in groups],
        "metrics": list(metrics), "resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
        "comparisons": comparisons,
    }


def compare(specs: Sequence[str], reference: str | None = None, metrics: Sequence[str] | None = None,
            resamples: int = 10_000, seed: int = 0) -> dict:
    """`compare_groups` of the groups `specs` name (`NAME=PATH[,PATH...]` or `PATH`)."""
    return compare_groups(load_groups(specs), reference, metrics, resamples, seed)


def _mean(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_report(report: dict) -> str:
    """The report as a terminal table: one row per compared pair and metric."""
    header = ["B vs A", "metric", "n", "A", "B", "diff", "W/T/L", "p", f"{100 * report['confidence']:.0f}% CI"]
    rows = [[f"{c['b']} vs {c['a']}", c["metric"], str(c["questions"]), _mean(c["mean_a"], c["std_a"]),
             _mean(c["mean_b"], c["std_b"]), f"{c['diff']:+.2f}", f"{c['wins']}/{c['ties']}/{c['losses']}",
             f"{c['p']:.3g}", f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"] for c in report["comparisons"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = 2  # the pair and the metric are text; the numbers align right
    lines = ["  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    groups = [f"{g['name']}: " + (g["runs"][0] if len(g["runs"]) == 1 else f"{len(g['runs'])} seeds, {', '.join(g['runs'])}")
              for g in report["groups"]]
    notes = [f"A: the reference '{report['reference']}'; scores in %, mean ± std over seeds; diff = B - A in points over n paired questions",
             f"W/T/L: questions B wins/ties/loses; p: two-sided exact sign test; "
             f"CI: paired bootstrap, {report['resamples']} resamples, seed {report['seed']}"]
    return "\n".join([*groups, "", *lines, "", *notes])


def plot_report(report: dict, path: str | Path) -> Path:
    """A PNG of each metric's difference B - A with its bootstrap interval, one marker per compared
    group. A bare Figure on the Agg canvas, as in `plot`: no display and no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    metrics = report["metrics"]
    others = [g["name"] for g in report["groups"] if g["name"] != report["reference"]]
    figure = Figure(figsize=(7, 1.2 + 0.45 * len(metrics) * max(1, len(others) / 2)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    step = 0.6 / len(others)
    for j, other in enumerate(others):
        rows = [c for c in report["comparisons"] if c["b"] == other]
        ys = [metrics.index(c["metric"]) + (j - (len(others) - 1) / 2) * step for c in rows]
        diffs = [c["diff"] for c in rows]
        errors = [[c["diff"] - c["ci_low"] for c in rows], [c["ci_high"] - c["diff"] for c in rows]]
        axes.errorbar(diffs, ys, xerr=errors, fmt="o", capsize=3, label=other)
    axes.axvline(0, color="grey", linewidth=1)
    axes.set_yticks(range(len(metrics)), metrics)
    axes.invert_yaxis()  # the first metric on top, as in the table
    axes.set(xlabel=f"difference in points, B - A, with {100 * report['confidence']:.0f}% paired bootstrap interval",
             ylabel="metric", title=f"{', '.join(others)} vs {report['reference']}")
    axes.grid(alpha=0.3, axis="x")
    if len(others) > 1:
        axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
