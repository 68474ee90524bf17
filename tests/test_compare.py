"""Tests for jointrag.evaluation.compare and `jointrag compare`: the sign test and the bootstrap against
numbers worked out by hand, seed groups, alignment by question id, the refusals of runs on other
questions and of bad files, and the command's table, --json and PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jointrag.cli import EXIT_USER_ERROR, main
from jointrag.errors import UserError
from jointrag.evaluation.compare import (
    bootstrap_interval,
    compare,
    compare_pair,
    format_report,
    parse_group,
    read_run,
    sign_test,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows(em: list[float], **fields) -> list[dict]:
    """Prediction rows q0, q1, ... with these EM scores (F1 equal to EM) and any other per-question fields,
    each given as a list over the questions."""
    out = []
    for i, score in enumerate(em):
        row = {"id": f"q{i}", "question": f"question {i}?", "answers": ["a"], "prediction": "a", "em": score, "f1": score}
        row.update({key: values[i] for key, values in fields.items()})
        out.append(row)
    return out


def write(path: Path, records: list) -> Path:
    """A predictions file, or an eval directory (predictions.jsonl and metrics.json) when `path` has no suffix."""
    if not path.suffix:
        path.mkdir(parents=True)
        (path / "metrics.json").write_text("{}")
        path = path / "predictions.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# 8 wins, 1 loss, 1 tie of B against A
EM_A = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
EM_B = [1, 1, 1, 1, 1, 1, 1, 1, 0, 1]


def test_sign_test_matches_the_binomial_by_hand():
    assert sign_test(8, 1) == pytest.approx(2 * (1 + 9) / 2 ** 9) == pytest.approx(0.0390625)
    assert sign_test(1, 8) == pytest.approx(0.0390625)  # two-sided
    assert sign_test(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # 0.625
    assert sign_test(10, 0) == pytest.approx(2 / 2 ** 10)
    assert sign_test(5, 5) == 1.0  # the doubled tail passes 1
    assert sign_test(0, 0) == 1.0  # no question differs
    assert 0 < sign_test(3000, 2000) < 1e-40  # exact integers: no underflow to 0 or overflow at thousands


def test_sign_test_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(0, 1), (2, 7), (12, 12), (30, 18), (61, 40)]:
        assert sign_test(wins, losses) == pytest.approx(stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)


def test_paired_counts_p_and_interval_of_a_hand_made_case():
    result = compare_pair(np.array([EM_A], float), np.array([EM_B], float), resamples=2000)
    assert (result["wins"], result["ties"], result["losses"]) == (8, 1, 1)
    assert result["p"] == pytest.approx(0.0390625)
    assert (result["mean_a"], result["mean_b"], result["diff"]) == pytest.approx((20, 90, 70))
    assert result["std_a"] is None and result["questions"] == 10
    assert result["ci_low"] < 70 < result["ci_high"]
    assert -100 <= result["ci_low"] and result["ci_high"] <= 100 and result["ci_high"] - result["ci_low"] > 10


def test_bootstrap_interval_is_degenerate_when_every_difference_is_equal():
    result = compare_pair(np.full((1, 5), 0.2), np.full((1, 5), 0.5), resamples=500)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((30, 30))
    assert (result["wins"], result["ties"], result["losses"]) == (5, 0, 0)
    assert result["p"] == pytest.approx(2 / 2 ** 5)


def test_bootstrap_percentiles_of_two_questions():
    """Differences [0, 100]: a resample's mean is 0, 50 or 100 with probability 1/4, 1/2, 1/4, so the
    2.5th percentile is 0 and the 97.5th is 100."""
    assert bootstrap_interval(np.array([0.0, 100.0]), resamples=4000, seed=3) == (0.0, 100.0)


def test_bootstrap_width_matches_the_normal_approximation_and_is_reproducible():
    """Mean +- 1.96 sd / sqrt(n) for n = 400 differences of -1, 0 or 1: the interval's width is within 10%."""
    differences = np.random.default_rng(5).integers(-1, 2, size=400).astype(float)
    low, high = bootstrap_interval(differences, resamples=4000, seed=0)
    expected = 2 * 1.96 * differences.std() / math.sqrt(len(differences))
    assert high - low == pytest.approx(expected, rel=0.1)
    assert low < differences.mean() < high
    assert bootstrap_interval(differences, resamples=4000, seed=0) == (low, high)
    assert bootstrap_interval(differences, resamples=4000, seed=1) != (low, high)


def test_seed_group_pairs_the_per_question_mean_and_reports_mean_and_std(tmp_path):
    """Seeds with EM 40, 50, 60 (q0-3, q0-4, q0-5 right): mean 50, sample std 10; the per-question seed
    means (1, 1, 1, 1, 2/3, 1/3, 0, 0, 0, 0) against a reference that is always wrong: 6 wins, 4 ties."""
    base = write(tmp_path / "base.jsonl", rows([0] * 10))
    seeds = [write(tmp_path / f"s{s}.jsonl", rows([1] * (4 + s) + [0] * (6 - s))) for s in range(3)]
    report = compare([f"base={base}", "jsa=" + ",".join(map(str, seeds))], metrics=["em"], resamples=1000)
    (row,) = report["comparisons"]
    assert (row["a"], row["b"], row["metric"]) == ("base", "jsa", "em")
    assert row["seeds_b"] == pytest.approx([40, 50, 60])
    assert (row["mean_b"], row["std_b"]) == pytest.approx((50, 10))
    assert (row["mean_a"], row["diff"]) == pytest.approx((0, 50))
    assert (row["wins"], row["ties"], row["losses"]) == (6, 4, 0)
    assert row["p"] == pytest.approx(2 / 2 ** 6)
    assert "50.00 ± 10.00" in format_report(report)


def test_runs_are_aligned_by_id_not_by_line(tmp_path):
    a = write(tmp_path / "a.jsonl", rows(EM_A))
    b_rows = rows(EM_B)
    b = write(tmp_path / "b.jsonl", b_rows[::-1])
    (row,) = compare([str(a), str(b)], metrics=["em"], resamples=100)["comparisons"]
    assert (row["wins"], row["ties"], row["losses"]) == (8, 1, 1)


def test_reference_option_swaps_the_sides(tmp_path):
    a = write(tmp_path / "a.jsonl", rows(EM_A))
    b = write(tmp_path / "b.jsonl", rows(EM_B))
    (row,) = compare([f"A={a}", f"B={b}"], reference="B", metrics=["em"], resamples=100)["comparisons"]
    assert (row["a"], row["b"], row["diff"]) == ("B", "A", pytest.approx(-70))
    assert (row["wins"], row["losses"]) == (1, 8)
    with pytest.raises(UserError, match="reference 'C' is not a group; the groups are A, B"):
        compare([f"A={a}", f"B={b}"], reference="C")


def test_default_metrics_gold_recall_at_shared_cutoffs_and_over_the_questions_with_gold(tmp_path):
    gold_a = [{"1": 0, "5": 1}] * 6 + [None] * 4
    gold_b = [{"1": 1, "10": 1}] * 6 + [None] * 4
    answer = [{"1": 1}] * 10
    records_a = rows(EM_A, answer_recall=answer, gold_recall=gold_a)
    records_b = rows(EM_B, answer_recall=answer, gold_recall=gold_b)
    for row in records_a + records_b:  # questions without gold ids have no gold_recall field
        if row["gold_recall"] is None:
            del row["gold_recall"]
    report = compare([str(write(tmp_path / "a.jsonl", records_a)), str(write(tmp_path / "b.jsonl", records_b))], resamples=100)
    assert report["metrics"] == ["em", "f1", "gold_recall@1"]  # @5 and @10 are not in both; answer recall only without gold
    gold = report["comparisons"][-1]
    assert (gold["questions"], gold["wins"], gold["mean_a"], gold["mean_b"]) == (6, 6, 0, 100)


def test_answer_recall_when_no_gold_and_unknown_metrics_refused(tmp_path):
    answer_a = [{"1": 0, "5": 1}] * 10
    answer_b = [{"1": 1, "5": 1}] * 10
    a = write(tmp_path / "a.jsonl", rows(EM_A, answer_recall=answer_a))
    b = write(tmp_path / "b.jsonl", rows(EM_B, answer_recall=answer_b))
    report = compare([str(a), str(b)], resamples=100)
    assert report["metrics"] == ["em", "f1", "answer_recall@1", "answer_recall@5"]
    assert [c["diff"] for c in report["comparisons"]][2:] == pytest.approx([100, 0])
    with pytest.raises(UserError, match="metric 'gold_recall@5' is not scored in every run"):
        compare([str(a), str(b)], metrics=["gold_recall@5"])


@pytest.mark.parametrize("change, names", [
    (lambda r: r[:7], ("b.jsonl", "'q7'", "missing", "7 questions")),
    (lambda r: r + [{**r[0], "id": "extra"}], ("b.jsonl, line 11, field 'id'", "'extra'", "not in")),
    (lambda r: [{**row, "question": "other?"} if row["id"] == "q4" else row for row in r], ("b.jsonl, line 5", "'q4'", "other?")),
])
def test_runs_on_other_questions_are_refused_at_the_first_mismatch(tmp_path, change, names):
    a = write(tmp_path / "a.jsonl", rows(EM_A))
    b = write(tmp_path / "b.jsonl", change(rows(EM_B)))
    with pytest.raises(UserError) as error:
        compare([str(a), str(b)])
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("line, names", [
    ("{not json", ("line 3", "invalid JSON")),
    ('{"question": "q?", "em": 1}', ("line 3", "field 'id'", "missing")),
    ('{"id": "q1", "question": "question 1?", "em": 1}', ("line 3", "already on line 2")),
    ('{"id": "x", "question": "x?", "em": 45}', ("line 3", "field 'em'", "between 0 and 1")),
    ('{"id": "x", "question": "x?", "gold_recall": {"5": "yes"}}', ("line 3", "field 'gold_recall.5'")),
    ('[1, 2]', ("line 3", "expected a JSON object")),
])
def test_bad_rows_are_refused_naming_file_line_and_field(tmp_path, line, names):
    path = write(tmp_path / "bad.jsonl", rows([1, 0]) + [line])
    with pytest.raises(UserError) as error:
        read_run(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message
    for name in names:
        assert name in message, message


def test_group_specs_and_missing_inputs(tmp_path):
    assert parse_group("jsa=a,b,c") == ("jsa", ["a", "b", "c"])
    assert parse_group("runs/eval0/") == ("runs/eval0", ["runs/eval0/"])
    with pytest.raises(UserError, match="no predictions.jsonl"):
        read_run(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        read_run(tmp_path / "absent.jsonl")
    a = write(tmp_path / "a.jsonl", rows(EM_A))
    with pytest.raises(UserError, match="two or more groups"):
        compare([f"x={a},{a}"])
    with pytest.raises(UserError, match="given twice"):
        compare([f"x={a}", f"x={a}"])


def test_cli_json_table_and_png(tmp_path, capsys):
    base = write(tmp_path / "eval0", rows(EM_A))  # an eval --out directory
    seeds = [write(tmp_path / f"jsa_s{s}.jsonl", rows(EM_B)) for s in range(2)]
    png = tmp_path / "plots" / "compare.png"
    argv = ["compare", f"base={base.parent}", "jsa=" + ",".join(map(str, seeds)), "--resamples", "500", "--plot", str(png)]
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == PNG_SIGNATURE and report["plot"] == str(png)
    assert report["reference"] == "base" and report["questions"] == 10 and report["resamples"] == 500
    assert report["groups"][1] == {"name": "jsa", "runs": [str(s) for s in seeds]}
    em = next(c for c in report["comparisons"] if c["metric"] == "em")
    assert (em["wins"], em["ties"], em["losses"], em["diff"], em["std_b"]) == (8, 1, 1, pytest.approx(70), 0)
    assert em["p"] == pytest.approx(0.0390625)

    assert main(argv) == 0
    out = capsys.readouterr().out
    table = next(line for line in out.splitlines() if line.startswith("jsa vs base") and " em " in line)
    interval = [f"[{em['ci_low']:+.2f},", f"{em['ci_high']:+.2f}]"]  # the same seed as the --json run
    assert table.split()[4:] == ["10", "20.00", "90.00", "±", "0.00", "+70.00", "8/1/1", "0.0391", *interval]
    assert f"wrote {png}" in out


def test_cli_user_error_is_one_line(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", rows(EM_A))
    b = write(tmp_path / "b.jsonl", rows(EM_B)[:9])
    assert main(["compare", str(a), str(b)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("jointrag: error: ") and "'q9'" in err and "\n" not in err
