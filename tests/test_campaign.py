"""The results campaign driver (`scripts/campaign.py`) end to end on the tiny random models: every unit of
its plan (SQuAD methods, passage tower, RA-DIT, BGM, the DSTC9 fixture standing in for DSTC11) with 2
steps, 2 seeds and the 4 fixture questions, run in this process; then what makes it usable in chunks:
`--dry-run`, done units skipped, an interrupted training run resumed, `--only`, `--budget-minutes`, and
the compare tables and summary of `--report`.

The runs test plumbing, not learning. The whole file takes a few minutes on 2 CPU cores, hence `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DSTC9 = Path(__file__).parent / "fixtures" / "dialog" / "dstc9" / "val"

pytestmark = [pytest.mark.usefixtures("isolated_home"), pytest.mark.slow]


def load_driver():
    spec = importlib.util.spec_from_file_location("campaign_driver", ROOT / "scripts" / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def driver():
    return load_driver()


@pytest.fixture
def tiny(tmp_path, files, index_dir, tiny_dir):
    """`run(*argv)`: the driver's main on the tiny models and data, its runs and results in tmp_path;
    returns (exit status, the jointrag commands it ran)."""
    module = load_driver()
    sets = {
        "train.steps": 2, "train.batch_size": 2, "train.save_every": 1,
        "method.proposals": 5, "eval.limit": 2, "eval.max_new_tokens": 3, "model.max_prompt_tokens": 256,
        "model.generator": tiny_dir / "causal", "bgm.bridge": tiny_dir / "causal", "bgm.max_len": 2,
        "squad:model.index": index_dir, "squad:data.train": files["qa"], "squad:data.dev": files["qa"],
        "squad:data.test": files["qa"], "dstc11:eval.k": 3,
    }
    base = ["--runs", tmp_path / "runs", "--results", tmp_path / "results", "--in-process", "--seeds", "0,1", "--precision", "fp32",
            "--dialog", DSTC9, "--dialog-format", "dstc9", "--retriever", tiny_dir / "encoder",
            "--sec-per-step", "0.01", "--questions-per-second", "1000", "--startup-seconds", "0.01"]
    for key, value in sets.items():
        base += ["--set", f"{key}={value}"]
    calls: list[list[str]] = []
    real = module.run_jointrag

    def recorded(argv, opts, deadline):
        calls.append(list(argv))
        return real(argv, opts, deadline)

    module.run_jointrag = recorded

    def run(*argv):
        calls.clear()
        code = module.main([str(a) for a in (*base, *argv)])
        return code, list(calls)

    run.module, run.root = module, tmp_path
    return run


def unit_names(calls: list[list[str]]) -> list[str]:
    """The --out of each command (the unit's directory), for train and eval."""
    return [argv[argv.index("--out") + 1] if "--out" in argv else
            next(s.removeprefix("out=") for s in argv if s.startswith("out=")) for argv in calls]


def test_the_whole_campaign_on_tiny_models_then_nothing_to_do(tiny, capsys):
    code, calls = tiny("--dry-run")
    assert code == 0 and calls == []
    out = capsys.readouterr().out
    assert "squad/jsa/s1/train" in out and "dstc11/prep/index" in out and "squad/ra-dit/lm-ft+r-ft/test-ensemble" in out
    assert "units done; " in out and "of work" in out and "by experiment:" in out

    code, calls = tiny()
    out = capsys.readouterr().out
    assert code == 0, out
    results = tiny.root / "results"
    # every evaluation's copy, with the fields compare reads
    evaluations = [p.parent for p in results.rglob("metrics.json")]
    assert len(evaluations) == 4 * 2 * 2 + 2 + 2 * 2 * 2 + 2 + 2 * 2 + 4 * 3 + 3 * 2  # main, untrained, dstc11, passage, ra-dit, bgm
    row = json.loads((results / "squad" / "jsa" / "s1" / "test" / "predictions.jsonl").read_text().splitlines()[0])
    assert {"id", "question", "answers", "prediction", "em", "f1", "gold_recall", "passages"} <= set(row)
    assert all(isinstance(p, str) for p in row["passages"])
    dialog = json.loads((results / "dstc11" / "jsa" / "s0" / "test" / "predictions.jsonl").read_text().splitlines()[0])
    assert "history" not in dialog and "gold_ids" not in dialog and dialog["passages"]
    # the training summaries and the timings the estimate reads
    summary = json.loads((results / "squad" / "jsa-passage" / "s0" / "train.json").read_text())
    assert summary["stages"][0]["steps"] == 2 and summary["stages"][0]["key"] == "squad:jsa+passage"
    assert summary["stages"][0]["staleness"], "the passage tower's run refreshes its index at the end"
    assert {"step", "staleness"} <= summary["stages"][0]["staleness"][-1].keys()
    assert any(key.startswith("posterior_gold_recall@") for key in summary["stages"][0]["dev"][-1])
    radit = json.loads((results / "squad" / "ra-dit" / "train.json").read_text())
    assert [s["key"] for s in radit["stages"]] == ["squad:ra-dit-lm", "squad:ra-dit-lsr"]
    timings = [json.loads(line) for line in (results / "timings.jsonl").read_text().splitlines()]
    assert len(timings) == len(calls) - 0 and {t["kind"] for t in timings} == {"prep", "train", "pipeline", "eval"}
    # one precision for every unit, recorded: the training runs, the untrained pipeline and the DSTC11 index
    assert json.loads((results / "campaign.json").read_text()) == {"precision": "fp32"}
    assert {t["precision"] for t in timings} == {"fp32"} and summary["precision"] == "fp32"
    for argv in calls:
        if argv[0] == "train":
            assert "train.precision=fp32" in argv, argv
        elif argv[0] == "index" or (argv[0] == "eval" and "--checkpoint" not in argv):
            assert argv[argv.index("--precision") + 1] == "fp32", argv
    # BGM's PPO stage starts from the supervised bridge and shares its silver file
    ppo = next(argv for argv in calls if any("bgm-ppo" in a for a in argv) or "squad/bgm/ppo" in " ".join(argv))
    assert any(a.startswith("bgm.reference=") and a.endswith("sl/checkpoint") for a in ppo)
    assert (results / "squad" / "bgm" / "silver.jsonl").is_file()  # committed: a new machine goes on from it
    # the compare tables: every method against rag-sequence and against the untrained pipeline
    tables = {p.name for p in (results / "compare").glob("*.txt")}
    for name in ("squad-test-main-vs-rag-sequence", "squad-test-main-vs-untrained", "squad-dev-main-vs-untrained",
                 "squad-test-ra-dit-vs-rag-sequence", "squad-test-bgm-vs-untrained", "dstc11-test-main-vs-rag-sequence"):
        assert f"{name}.txt" in tables and (results / "compare" / f"{name}.json").is_file()
    report = json.loads((results / "compare" / "squad-test-main-vs-rag-sequence.json").read_text())
    groups = {g["name"]: len(g["runs"]) for g in report["groups"]}
    assert groups == {"rag-sequence": 2, "untrained": 1, "rag-token": 2, "vrag": 2, "jsa": 2, "jsa-passage": 2}
    assert report["reference"] == "rag-sequence" and {c["metric"] for c in report["comparisons"]} >= {"em", "f1"}
    text = (results / "compare" / "squad-test-main-vs-rag-sequence.txt").read_text()
    assert text.startswith("$ jointrag compare --reference rag-sequence ") and "W/T/L" in text
    summary_text = (results / "summary.md").read_text()
    assert "| jsa | 2 |" in summary_text and "## Training runs" in summary_text
    assert "Paired, squad test (main models), each model against rag-sequence" in summary_text
    assert "\n    jointrag compare --reference rag-sequence rag-sequence=" in summary_text
    assert (results / "curves" / "squad.png").stat().st_size > 0 and (results / "curves" / "dstc11.png").is_file()

    # everything done: a rerun runs nothing, and the dry run says so
    code, calls = tiny()
    assert code == 0 and calls == []
    code, _ = tiny("--dry-run")
    assert "0 left" in capsys.readouterr().out

    # a unit done without its copy (a crash between the two, or run by hand) is copied, not rerun
    import shutil

    shutil.rmtree(results / "squad" / "untrained" / "test")
    code, calls = tiny()
    assert code == 0 and calls == [] and (results / "squad" / "untrained" / "test" / "predictions.jsonl").is_file()

    # committed results are enough: with the run directories gone nothing reruns

    shutil.rmtree(tiny.root / "runs" / "squad")
    code, calls = tiny()
    assert code == 0 and calls == [], unit_names(calls)


def test_resume_only_and_done_units(tiny, capsys):
    # a training run stopped after its first step (its checkpoint at step 1) ...
    code, calls = tiny("--only", "squad/rag-sequence/s0/train", "--set", "train.steps=1")
    assert code == 0 and len(calls) == 1 and "--resume" not in calls[0]
    run = tiny.root / "runs" / "squad" / "rag-sequence" / "s0"
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tiny("--dry-run", "--only", "squad/rag-sequence/s0")
    out = capsys.readouterr().out
    assert "partial" in out and "step 1/2" in out and "1 steps x 0.0 s" in out

    # ... continues from it with --resume, then its evaluations run; nothing else does
    code, calls = tiny("--only", "squad/rag-sequence/s0")
    assert code == 0
    assert calls[0][0] == "train" and calls[0][-1] == "--resume"
    assert [argv[0] for argv in calls] == ["train", "eval", "eval"]
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in after if r["split"] == "train" and "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and train[0] == [r for r in first if r["split"] == "train"][0]
    assert "resumes at step 1/2" in capsys.readouterr().out

    # rerunning the same selection skips the done units; a glob selects by pattern
    code, calls = tiny("--only", "squad/rag-sequence/s0")
    assert code == 0 and calls == []
    code, calls = tiny("--only", "squad/untrained/*")
    assert [argv[0] for argv in calls] == ["eval", "eval"]
    assert all("--checkpoint" not in argv for argv in calls)
    # an evaluation whose training is not done waits for it
    code, calls = tiny("--only", "squad/jsa/s0/test")
    assert code == 0 and calls == []
    assert "waiting for units not done: squad/jsa/s0/test" in capsys.readouterr().out


def test_budget(tiny, capsys, monkeypatch):
    """Each unit 'takes' a minute of a fake clock: a budget of 2.5 minutes starts three units (two
    evaluations and a training run), the fourth waits; a budget of 0 starts none."""
    module = tiny.module
    now = [0.0]
    real = module.run_jointrag

    def one_minute(argv, opts, deadline):
        now[0] += 60
        return real(argv, opts, deadline)

    monkeypatch.setattr(module, "clock", lambda: now[0])
    monkeypatch.setattr(module, "run_jointrag", one_minute)
    code, _ = tiny("--budget-minutes", "0", "--only", "squad/untrained", "--only", "squad/rag-sequence/s0")
    assert code == 0 and not (tiny.root / "runs" / "squad").exists()
    assert "the budget of 0 min is spent" in capsys.readouterr().out

    code, _ = tiny("--budget-minutes", "2.5", "--only", "squad/untrained", "--only", "squad/rag-sequence/s0")
    assert code == 0
    out = capsys.readouterr().out
    done = sorted(str(p.parent.relative_to(tiny.root / "results")) for p in (tiny.root / "results").rglob("metrics.json"))
    assert done == ["squad/untrained/dev", "squad/untrained/test"], out
    assert (tiny.root / "results" / "squad" / "rag-sequence" / "s0" / "train.json").is_file()
    assert "the budget of 2.5 min is spent" in out

    # a unit that does not fit the time left waits for the next chunk; a later one that fits still runs
    now[0] = 0.0
    code, calls = tiny("--budget-minutes", "1.5", "--sec-per-step", "1000", "--only", "squad/rag-token/s0/train",
                       "--only", "dstc11/prep/data")
    out = capsys.readouterr().out
    assert code == 0 and [argv[0] for argv in calls] == ["dialog-data"], out
    assert "1 units left for the next chunk: squad/rag-token/s0/train (needs ~33m, 1m left)" in out


def test_a_training_process_that_dies_after_a_checkpoint_is_resumed(tiny, capsys, monkeypatch):
    """A process killed after saving a checkpoint (e.g. for memory) continues in a new one; one that dies
    without progress fails the unit, and the units that need it wait."""
    module = tiny.module
    real = module.run_jointrag
    calls = []

    def dies_once(argv, opts, deadline):
        calls.append(list(argv))
        if len(calls) == 1:  # the first process saves step 1 of 2, then dies as the OOM killer would leave it
            real([a if a != "train.steps=2" else "train.steps=1" for a in argv], opts, deadline)
            return -9
        return real(argv, opts, deadline)

    monkeypatch.setattr(module, "run_jointrag", dies_once)
    code, _ = tiny("--only", "squad/vrag/s0/train")
    out = capsys.readouterr().out
    assert code == 0 and "exited with status -9 after reaching 1 steps: resuming it in a new process (1 of 3)" in out
    assert "--resume" not in calls[0] and calls[1][-1] == "--resume"
    assert module.checkpoint_step(tiny.root / "runs" / "squad" / "vrag" / "s0") == 2

    monkeypatch.setattr(module, "run_jointrag", lambda argv, opts, deadline: calls.append(argv) or 1)
    calls.clear()
    code, _ = tiny("--only", "squad/rag-token/s0")
    out = capsys.readouterr().out
    assert code == 1 and len(calls) == 1 and "FAILED: squad/rag-token/s0/train (exit status 1)" in out
    assert "2 units waiting for units not done: squad/rag-token/s0/test, squad/rag-token/s0/dev" in out


def test_settings_reach_the_runs_and_their_evaluations(driver, tmp_path, capsys):
    """--set and --set GROUP:KEY=VALUE: a bad key fails the plan at once, naming it; the dialog group's data
    and evaluation settings reach its commands; a dry run prints the chunk a budget would run."""
    code = driver.main(["--dry-run", "--runs", str(tmp_path / "r"), "--results", str(tmp_path / "s"),
                        "--set", "train.stepz=3"])
    assert code == 2 and "train.stepz" in capsys.readouterr().err

    opts = driver.parse_args(["--runs", str(tmp_path / "r"), "--results", str(tmp_path / "s"), "--set", "train.steps=7",
                              "--set", "dstc11:eval.k=4", "--seeds", "3"])
    plan = {u.name: u for u in driver.build_plan(opts)}
    assert plan["squad/jsa/s3/train"].config.train.steps == 7 and plan["squad/jsa/s3/train"].config.train.seed == 3
    test = plan["dstc11/jsa/s3/test"].argv
    assert test[test.index("-k") + 1] == "4" and test[test.index("--max-new-tokens") + 1] == "40"
    assert test[test.index("--data") + 1].endswith("dstc11/data/converted/test.jsonl")
    assert plan["squad/jsa/s3/test"].argv[plan["squad/jsa/s3/test"].argv.index("--split") + 1] == "test"
    assert plan["squad/ra-dit/base/test-ensemble"].argv[-5:-3] == ["--decode", "ensemble"] or "ensemble" in plan["squad/ra-dit/base/test-ensemble"].argv
    assert "--template" in plan["squad/ra-dit/base/test-top1"].argv
    assert "--decode" not in plan["squad/bgm/sl+ppo/test"].argv  # the bridge chooses the passages
    assert plan["squad/bgm/ppo/train"].needs == ("squad/bgm/sl/train",)

    code = driver.main(["--dry-run", "--runs", str(tmp_path / "r"), "--results", str(tmp_path / "s"), "--budget-minutes", "165"])
    out = capsys.readouterr().out
    assert code == 0 and "this chunk (165 min) would run, by the estimate: squad/untrained/test" in out
    assert "(fallback)" in out


def test_one_precision_for_the_whole_campaign(driver, tmp_path, capsys, monkeypatch):
    """The precision --results/campaign.json records is the campaign's: another is refused, naming the
    record, as is --set train.precision (it would miss the evaluations); bf16 where it is emulated refuses
    to run, and a dry run says so."""
    import jointrag.runtime

    base = ["--runs", str(tmp_path / "r"), "--results", str(tmp_path / "s")]
    assert driver.main([*base, "--dry-run", "--set", "squad:train.precision=fp32"]) == 2
    assert "with --precision, not --set train.precision" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    record = tmp_path / "s" / "campaign.json"
    record.write_text('{"precision": "bf16"}')
    assert driver.main([*base, "--dry-run", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "the units in" in err and "ran at bf16" in err and str(record) in err

    monkeypatch.setattr(jointrag.runtime, "bf16_supported", lambda device: False)
    assert driver.main([*base, "--dry-run"]) == 0
    assert "note: this campaign runs at bf16" in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(driver, "run_jointrag", lambda argv, opts, deadline: calls.append(argv) or 1)
    assert driver.main([*base, "--only", "squad/untrained/test"]) == 2 and calls == []
    assert "does not run fast" in capsys.readouterr().err
    monkeypatch.setattr(jointrag.runtime, "bf16_supported", lambda device: True)
    assert driver.main([*base, "--only", "squad/untrained/test"]) == 1  # it ran (the fake command failed)
    assert calls and calls[0][calls[0].index("--precision") + 1] == "bf16"

    record.write_text('{"precision": "fp16"}')
    assert driver.main([*base, "--dry-run"]) == 2 and "field 'precision' is 'fp16'" in capsys.readouterr().err


def test_a_child_process_stopped_at_the_deadline_resumes_in_the_next_chunk(tmp_path, files, index_dir, tiny_dir):
    """The real mode: each unit a `python -m jointrag` child, interrupted when the budget is spent; the
    training run keeps its last checkpoint and the next chunk resumes it."""
    import subprocess
    import torch

    def chunk(*argv, timeout=300):
        command = [sys.executable, str(ROOT / "scripts" / "campaign.py"), "--runs", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "results"), "--only", "squad/rag-sequence/s0/train",
                   "--sec-per-step", "0.01", "--startup-seconds", "1", "--precision", "fp32"]
        for setting in ("train.batch_size=2", "train.save_every=2", "eval.limit=2",
                        "eval.max_new_tokens=3", "model.max_prompt_tokens=256", f"model.generator={tiny_dir / 'causal'}",
                        f"squad:model.index={index_dir}", f"squad:data.train={files['qa']}", f"squad:data.dev={files['qa']}",
                        f"squad:data.test={files['qa']}"):
            command += ["--set", setting]
        return subprocess.run(command + list(argv), capture_output=True, text=True, timeout=timeout)

    done = chunk("--set", "train.steps=100000", "--budget-minutes", "0.3")
    assert done.returncode == 0, done.stderr
    assert "stopped at the deadline" in done.stdout, done.stdout
    state = tmp_path / "runs" / "squad" / "rag-sequence" / "s0" / "checkpoint" / "trainer.pt"
    step = torch.load(state, weights_only=True, mmap=True)["step"]
    assert 1 <= step < 100000  # the step it was in at the deadline, not only a save_every multiple
    done = chunk("--set", f"train.steps={step + 2}")
    assert done.returncode == 0, done.stderr
    assert f"resumes at step {step}/{step + 2}" in done.stdout
    assert torch.load(state, weights_only=True, mmap=True)["step"] == step + 2


def test_the_docs_tables_replace_only_the_text_between_the_markers(driver, tmp_path):
    docs = tmp_path / "results.md"
    docs.write_text(f"before\n{driver.BLOCK[0]}\nold table\n{driver.BLOCK[1]}\nafter\n")
    assert driver.update_docs(["### squad, test split", "new table"], docs)
    assert docs.read_text() == f"before\n{driver.BLOCK[0]}\n\n### squad, test split\nnew table\n\n{driver.BLOCK[1]}\nafter\n"
    docs.write_text("no markers\n")
    assert not driver.update_docs(["new table"], docs) and docs.read_text() == "no markers\n"


def test_unmeasured_figures_are_scaled_as_the_measured_steps(driver, tmp_path):
    """On a machine whose measured steps take twice FALLBACK's, every unmeasured figure of the estimate
    (steps of other methods, evaluation rates, BGM's silver search) is taken as twice as slow, and says so."""
    runs = tmp_path / "runs"
    opts = driver.parse_args(["--runs", str(runs), "--results", str(tmp_path / "results")])
    run = runs / "squad" / "rag-sequence" / "s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method:\n  name: rag-sequence\n")
    seconds = 2 * driver.FALLBACK["sec_per_step"]["squad:rag-sequence"]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "sec_per_step": seconds}) + "\n"
                                               for s in range(3)))
    state = driver.State(driver.build_plan(opts), opts)
    assert state.step_seconds("squad:rag-sequence") == (seconds, "measured")
    jsa, source = state.step_seconds("squad:jsa")
    assert jsa == pytest.approx(2 * driver.FALLBACK["sec_per_step"]["squad:jsa"]) and source == "fallback x2.00, as the measured steps"
    rate, source = state.rate("squad:top5")
    assert rate == pytest.approx(driver.FALLBACK["questions_per_sec"]["squad:top5"] / 2) and "x2.00" in source
    _, how = state.estimate(state.by_name["squad/bgm/sl/train"])
    assert f"x {2 * driver.FALLBACK['silver_sec_per_question']:.1f} s (fallback x2.00" in how
