#!/usr/bin/env python3
"""The results campaign of issue 16: every run, resumable in chunks, with a time estimate.

    .venv/bin/python scripts/campaign.py --dry-run                # the plan, what is done, the estimate
    .venv/bin/python scripts/campaign.py --budget-minutes 165     # run a chunk, then commit results/campaign
    .venv/bin/python scripts/campaign.py --only 'squad/jsa/*'     # only the units whose name matches
    .venv/bin/python scripts/campaign.py --report                 # compare tables and summary of what is done

The plan (`build_plan`; seed 0 of every experiment first, then RA-DIT and BGM, then seeds 1 and 2 of
the four SQuAD methods, last those of DSTC11 and the passage tower):
- squad: the untrained pipeline (`jointrag eval` without a checkpoint) on the test and dev splits;
  RAG-Sequence, RAG-Token, VRAG and JSA-RAG (configs/campaign/*.yaml: one full pass over the 3,642
  training questions, 911 steps of 4), seeds 0, 1, 2, each evaluated on all 672 test and 647 dev
  questions; JSA-RAG with the passage tower trained and the index refreshed (jsa-passage.yaml), 3 seeds;
- dstc11: DSTC11 track 5 converted with `jointrag dialog-data` (a tenth of the training dialogs held
  out as dev), indexed, the untrained pipeline, then RAG-Sequence and JSA-RAG at the same budget;
- squad/ra-dit: the RA-DIT pipeline (LM-ft and R-ft, 911 steps each), then its four models (base,
  LM-ft, R-ft, both) on test with top-1 and ensemble decoding and on dev with top-1;
- squad/bgm: the supervised bridge (300 questions with silver sequences, kept in --results/squad/bgm/
  silver.jsonl), PPO from it (120 steps), then the SL and SL + PPO bridges and the top-5-passages prompt
  on test and dev.

A unit is one `jointrag` command (or a data preparation step). It is done when its output is there: an
evaluation's metrics.json (under --runs, or its copy under --results, which is committed), a
training run's checkpoint at its last step (or all of its evaluations done). A training run stopped
at the deadline saves the step it is in (`jointrag train` on SIGINT) and the next chunk continues it
with `--resume`; one that died continues from its last checkpoint (every 50 steps). After each evaluation its
metrics.json and a trimmed predictions.jsonl (the fields `jointrag compare` reads, the answer, the
passage ids) are copied to --results/<unit>/; after each training run a summary (train.json: s/step,
losses, dev metrics). The estimate per unit uses this campaign's own measured s/step (the median
`sec_per_step` of its runs' metrics.jsonl and of the committed train.json files) and questions/s (its
evaluations' timings.jsonl); until a figure is measured, the one in FALLBACK below (with its source).

`--budget-minutes N` ends the chunk by N minutes: a unit starts only if it is expected to finish in
the time left, except a training run, which starts if it can load and take a few steps (it resumes
in the next chunk); a unit still running at the deadline is interrupted (a training run saves the step
it is in). Units that do not fit are left for the next chunk, and later ones that fit still run.

Precision: every unit runs at one precision, `--precision` (bf16 or fp32), recorded in
--results/campaign.json when the first chunk starts; a later chunk takes it from there and refuses
another (its runs would not pair with the earlier ones: use other --runs and --results). Training runs
get `train.precision`, the untrained pipeline's evaluations and the DSTC11 index `--precision`, and the
trained models' evaluations follow their runs. bf16 runs only where it is fast (a CPU with AVX512-BF16
or AMX, or a GPU with bf16): elsewhere it is emulated, and the campaign refuses to start.

Settings: `--set KEY=VALUE` applies to every training run of the campaign, after its recipe (and
reaches the evaluations through it: data files, index, generator, eval.k, eval.max_new_tokens);
`--set GROUP:KEY=VALUE` to one group's (squad or dstc11), after the group's own settings. With
`--seeds`, `--dialog`, `--retriever` and the estimate's figures, this points the whole campaign at
other models, data and budgets (tests/test_campaign.py runs it on tiny random models).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path("configs/campaign")
SQUAD_METHODS = ("rag-sequence", "rag-token", "vrag", "jsa")
DIALOG_METHODS = ("rag-sequence", "jsa")
DEV_FRACTION = 0.1  # of DSTC11's training dialogs, held out as its dev split
RETRIES = 3  # times a training process that died after saving a new checkpoint is resumed in a new one
STEPS_WORTH_STARTING = 5  # a training run starts in a chunk only if it can load and take this many steps
PRECISIONS = ("bf16", "fp32")  # of every unit; a new campaign's default is the first

# Figures used until this campaign has measured its own: seconds per training step, questions per second
# of an evaluation (after its start-up), start-up seconds of a command (models and index loading).
FALLBACK = {
    "sec_per_step": {
        # docs/performance.md, roofline table: the demo recipe (K = 3, batch 4, bf16, checkpointing), 2 cores
        "squad:rag-sequence": 9.60, "squad:rag-token": 9.46, "squad:jsa": 8.98,
        "squad:vrag": 9.60,             # not measured with the demo recipe; docs/results.md: 0.91x rag-sequence
        "squad:jsa+passage": 10.0,      # a guess: jsa plus the passage tower's forward and backward
        "squad:ra-dit-lm": 9.0,         # 12 prompts a step like rag-sequence at K = 3, no checkpointing
        "squad:ra-dit-lsr": 5.0,        # a guess: 20 prompts a step, forward only, and the query tower
        "squad:bgm-sl": 3.0,            # a guess: the bridge's step; the silver search is counted apart
        "squad:bgm-ppo": 65.0,          # docs/results.md: about 65 s a step at batch 2
        "dstc11:rag-sequence": 12.5, "dstc11:jsa": 11.7,  # a guess: the squad figures x 1.3 (longer prompts)
    },
    "silver_sec_per_question": 20.0,    # docs/results.md: BGM silver search, about 20 s a question
    "questions_per_sec": {
        "squad:top1": 5.8,              # docs/performance.md: zero-shot top-1 answering
        "squad:ensemble": 0.15,         # docs/results.md: about 8 s a question on one thread beside another job
        "squad:bridge": 1.0,            # a guess: the bridge reads 5 passages and writes ids, then the LLM answers
        "squad:top5": 2.0,              # a guess: five passages in the prompt
        "dstc11:top1": 2.0,             # a guess: up to 40 new tokens instead of 16
    },
    "startup": {"train": 60.0, "pipeline": 120.0, "eval": 25.0, "prep": 20.0},
    "passages_per_sec": 50.0,           # docs/performance.md: MiniLM corpus encoding, bf16 (51.8)
    "refresh_seconds": 30.0,            # a guess: re-encoding the 913 passages and the staleness probe
}
# question counts until the data exist: the embedded split and DSTC11's split (docs/results.md, issue 7)
QUESTIONS = {"squad:test": 672, "squad:dev": 647, "dstc11:test": 420, "dstc11:dev": 171, "dstc11:train": 1538,
             "dstc11:corpus": 10882}


# --- the plan ----------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One step of the campaign: a `jointrag` command, or a data preparation step (`prepare`)."""

    name: str                            # e.g. squad/jsa/s0/train; also its path under --runs and --results
    kind: str                            # prep, train, pipeline (RA-DIT's stages and its combined model) or eval
    argv: list[str] = field(default_factory=list)
    needs: tuple[str, ...] = ()
    out: Path | None = None              # its directory under --runs
    config: object = None                # train, pipeline: the run's RunConfig
    key: str = ""                        # train: the s/step figure's key; eval: the questions/s figure's key
    questions: int = 0                   # eval: how many
    data: Path | None = None             # eval: the QA file (None: the embedded split), to count its questions
    marker: Path | None = None           # prep: the file written last
    prepare: object = None               # prep: a Python step run after argv (or instead of it)
    # for the compare tables and the summary (eval units)
    dataset: str = ""
    split: str = ""
    family: str = ""                     # main, ra-dit or bgm: the models compared in one table
    label: str = ""                      # its group in `jointrag compare`: one method (its seeds together)


@dataclass
class Group:
    """A data set the campaign trains on, with the settings its runs share."""

    name: str
    settings: list[str]


class Plan:
    def __init__(self, opts):
        self.opts = opts
        self.runs, self.results = Path(opts.runs), Path(opts.results)
        self.units: list[Unit] = []
        self.global_sets = [f"train.precision={opts.precision}", *(s for s in opts.set if not _scoped(s))]
        self.scoped = [s for s in opts.set if _scoped(s)]

    # settings

    def sets(self, group: Group) -> list[str]:
        """Group settings, then the global --set, then the group's --set GROUP:KEY=VALUE."""
        own = [s.split(":", 1)[1] for s in self.scoped if s.split(":", 1)[0] == group.name]
        return [*group.settings, *self.global_sets, *own]

    def config(self, recipe: Path, sets: list[str]):
        from jointrag.config import load_config

        return load_config(str(recipe), sets)

    def add(self, unit: Unit) -> Unit:
        self.units.append(unit)
        return unit

    # units

    def train(self, group: Group, name: str, recipe: str, seed: int, extra: tuple[str, ...] = (), needs=()) -> Unit:
        out = self.runs / name
        sets = [f"out={out}", f"train.seed={seed}", *extra, *self.sets(group)]
        config = self.config(RECIPES / recipe, sets)
        pipeline = config.method.name == "ra-dit"
        argv = ["train", "--config", str(RECIPES / recipe)] + [a for s in sets for a in ("--set", s)]
        key = f"{group.name}:{config.method.name}" + ("+passage" if config.model.train_passage_tower else "")
        return self.add(Unit(f"{name}/train", "pipeline" if pipeline else "train", argv, tuple(needs), out, config, key))

    def evaluate(self, group: Group, name: str, split: str, config, source: list[str], *, family: str, label: str,
                 decode: str | None = "top1", needs=(), rate: str = "top1") -> Unit:
        """`jointrag eval` with `source` (a checkpoint, or the untrained pipeline's options) on the group's
        `split` (data.test / data.dev of `config`, or the embedded split), with `config`'s evaluation settings."""
        held = getattr(config.data, split)
        data = None if held in (None, "embedded") else Path(held)
        out = self.runs / name
        argv = ["eval", *source, *(["--data", str(data)] if data else ["--split", split]),
                "-k", str(config.eval.k), "--max-new-tokens", str(config.eval.max_new_tokens),
                "--batch-size", str(config.eval.batch_size), *(["--decode", decode] if decode else []),
                "--out", str(out), "--json"]
        count = _embedded_count(split) if data is None else QUESTIONS.get(f"{group.name}:{split}", 100)
        return self.add(Unit(name, "eval", argv, tuple(needs), out, config, f"{group.name}:{rate}", count, data,
                             dataset=group.name, split=split, family=family, label=label))

    def evaluate_run(self, group: Group, trained: Unit, name: str, *, family: str, label: str, decodes=("top1",),
                     checkpoint: Path | None = None, rate: str | None = None) -> None:
        """`trained`'s checkpoint (or `checkpoint`, one of its stages) on the test split with each of `decodes`
        and on the dev split with the first; with decodes (None,) a BGM checkpoint, whose bridge decides."""
        source = ["--checkpoint", str(checkpoint or trained.out / "checkpoint")]
        for split, decode in [("test", d) for d in decodes] + [("dev", decodes[0])]:
            suffix = f"-{decode}" if len(decodes) > 1 or family == "ra-dit" else ""
            self.evaluate(group, f"{name}/{split}{suffix}", split, trained.config, source, family=family,
                          label=f"{label}/{decode}" if suffix else label, decode=decode, needs=(trained.name,),
                          rate=rate or decode)

    def baseline_source(self, config, template: str | None = None) -> list[str]:
        """`jointrag eval` options of the untrained pipeline that `config` trains from."""
        m = config.model
        options = [("--index", m.index), ("--retriever", m.retriever), ("--generator", m.generator),
                   ("--template", template or m.template)]
        return ([a for flag, value in options if value for a in (flag, str(value))] + (["--chat"] if m.chat else [])
                + ["--precision", self.opts.precision])


def _scoped(setting: str) -> bool:
    head = setting.split("=", 1)[0]
    return ":" in head


def _lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


_EMBEDDED: dict[str, int] = {}


def _embedded_count(split: str) -> int:
    if split not in _EMBEDDED:
        from jointrag.data.qa import embedded_examples

        _EMBEDDED[split] = len(embedded_examples(split))
    return _EMBEDDED[split]


def build_plan(opts) -> list[Unit]:
    """The campaign's units in the order they run: seed 0 of every experiment first (so that each has a
    result early), RA-DIT and BGM (one seed), then the other seeds of the four SQuAD methods (the seeds the
    issue asks for), then those of DSTC11 and of the passage tower."""
    choose_precision(opts)
    plan = Plan(opts)
    runs = plan.runs
    seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]

    squad = Group("squad", [])
    base = plan.config(RECIPES / "rag-sequence.yaml", plan.sets(squad))  # the evaluation settings of the main table
    for split in ("test", "dev"):
        plan.evaluate(squad, f"squad/untrained/{split}", split, base, plan.baseline_source(base), family="main", label="untrained")

    # DSTC11 track 5: convert (a tenth of the training dialogs held out as dev), index; the SQuAD budget
    data, index = runs / "dstc11" / "data", runs / "dstc11" / "index"
    converted = data / "converted"
    prep = [Unit("dstc11/prep/data", "prep", ["dialog-data", "--input", str(opts.dialog), "--format", opts.dialog_format,
                                              "--out", str(converted), "--json"],
                 marker=data / "dev.jsonl", prepare=lambda: split_dev(converted, data)),
            Unit("dstc11/prep/index", "prep", ["index", "--corpus", str(converted / "corpus.jsonl"), "--out", str(index),
                                               *(["--retriever", opts.retriever] if opts.retriever else []),
                                               "--precision", opts.precision, "--json"],
                 needs=("dstc11/prep/data",), marker=index / "manifest.json", key="dstc11:index")]
    dialog = Group("dstc11", [f"data.train={data / 'train.jsonl'}", f"data.dev={data / 'dev.jsonl'}",
                              f"data.test={converted / 'test.jsonl'}", f"model.index={index}",
                              "model.template=configs/templates/dialog.yaml", "eval.max_new_tokens=40", "eval.k=10"])
    ready = tuple(u.name for u in prep)

    def squad_methods(seed: int) -> None:
        for method in SQUAD_METHODS:
            trained = plan.train(squad, f"squad/{method}/s{seed}", f"{method}.yaml", seed)
            plan.evaluate_run(squad, trained, f"squad/{method}/s{seed}", family="main", label=method)

    def dialog_and_passage_tower(seed: int) -> None:
        if seed == seeds[0]:
            for unit in prep:
                plan.add(unit)
            dialog_base = plan.config(RECIPES / "rag-sequence.yaml", plan.sets(dialog))
            for split in ("test", "dev"):
                plan.evaluate(dialog, f"dstc11/untrained/{split}", split, dialog_base, plan.baseline_source(dialog_base),
                              family="main", label="untrained", needs=ready)
        for method in DIALOG_METHODS:
            trained = plan.train(dialog, f"dstc11/{method}/s{seed}", f"{method}.yaml", seed, needs=ready)
            plan.evaluate_run(dialog, trained, f"dstc11/{method}/s{seed}", family="main", label=method)
        # the passage tower trained, with index refresh (JSA; compare it with jsa, seed by seed)
        trained = plan.train(squad, f"squad/jsa-passage/s{seed}", "jsa-passage.yaml", seed)
        plan.evaluate_run(squad, trained, f"squad/jsa-passage/s{seed}", family="main", label="jsa-passage")

    squad_methods(seeds[0])
    dialog_and_passage_tower(seeds[0])

    # RA-DIT: both stages and the combined model (the pipeline), then its four models, top-1 and ensemble
    radit = plan.train(squad, "squad/ra-dit", "ra-dit.yaml", seeds[0])
    source = plan.baseline_source(radit.config, radit.config.model.template)
    for split, decode in (("test", "top1"), ("test", "ensemble"), ("dev", "top1")):
        plan.evaluate(squad, f"squad/ra-dit/base/{split}-{decode}", split, radit.config, source, family="ra-dit",
                      label=f"ra-dit-base/{decode}", decode=decode, rate=decode)
    for model, checkpoint in (("lm-ft", "lm-ft/checkpoint"), ("r-ft", "r-ft/checkpoint"), ("lm-ft+r-ft", "checkpoint")):
        plan.evaluate_run(squad, radit, f"squad/ra-dit/{model}", family="ra-dit", label=f"ra-dit-{model}",
                          decodes=("top1", "ensemble"), checkpoint=radit.out / checkpoint)

    # BGM: the supervised bridge, PPO from it, then both bridges and the top-5-passages prompt. The silver
    # sequences (most of stage 1's time, a small JSONL) go under --results, which is committed, so a search
    # interrupted at a chunk's end goes on in the next chunk even on a machine that kept no --runs.
    silver = f"bgm.silver={plan.results / 'squad' / 'bgm' / 'silver.jsonl'}"
    sl = plan.train(squad, "squad/bgm/sl", "bgm-sl.yaml", seeds[0], (silver,))
    ppo = plan.train(squad, "squad/bgm/ppo", "bgm-ppo.yaml", seeds[0], (silver, f"bgm.reference={sl.out / 'checkpoint'}"),
                     needs=(sl.name,))
    for split in ("test", "dev"):
        plan.evaluate(squad, f"squad/bgm/top5/{split}", split, sl.config, [*plan.baseline_source(sl.config), "--contexts", "5"],
                      family="bgm", label="bgm-top5-passages", rate="top5")
    for trained, model in ((sl, "sl"), (ppo, "sl+ppo")):
        plan.evaluate_run(squad, trained, f"squad/bgm/{model}", family="bgm", label=f"bgm-{model}", decodes=(None,),
                          rate="bridge")

    for seed in seeds[1:]:
        squad_methods(seed)
    for seed in seeds[1:]:
        dialog_and_passage_tower(seed)
    return order(plan.units)


def order(units: list[Unit]) -> list[Unit]:
    """`units` with every unit after the units it needs, otherwise in the given order."""
    placed, names = [], set()
    pending = list(units)
    while pending:
        for unit in pending:
            if all(n in names for n in unit.needs):
                placed.append(unit)
                names.add(unit.name)
                pending.remove(unit)
                break
        else:
            missing = {n for u in pending for n in u.needs} - names - {u.name for u in pending}
            raise SystemExit(f"campaign: the plan needs units it does not have: {', '.join(sorted(missing))}")
    return placed


def split_dev(converted: Path, data: Path) -> None:
    """data/train.jsonl and data/dev.jsonl: the converted training dialogs, a tenth of them (by dialog)
    held out as dev; the test split and the corpus stay in `converted`."""
    from jointrag.data.dialog import split_by_dialog
    from jointrag.data.qa import load_examples, save_examples

    train, dev = split_by_dialog(load_examples(converted / "train.jsonl"), DEV_FRACTION, seed=0)
    save_examples(data / "train.jsonl", train)
    save_examples(data / "dev.jsonl", dev)  # the marker: written last


# --- precision: one for the whole campaign -----------------------------------------------------------


def choose_precision(opts) -> None:
    """Set opts.precision: --precision, else the one --results/campaign.json records, else bf16, and
    opts.recorded: whether that file exists. A UserError for a --precision other than the recorded one, or
    for `--set train.precision`, which would reach the training runs only."""
    from jointrag.errors import UserError

    if any(s.split("=", 1)[0].split(":", 1)[-1] == "train.precision" for s in opts.set):  # [GROUP:]KEY=VALUE
        raise UserError("set the campaign's precision with --precision, not --set train.precision: the untrained "
                        "pipeline's evaluations and the DSTC11 index follow --precision too")
    record = Path(opts.results) / "campaign.json"
    recorded = None
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))["precision"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{record}: not a campaign record with a 'precision' field ({error})") from None
        if recorded not in PRECISIONS:
            raise UserError(f"{record}: field 'precision' is {recorded!r}, not one of {', '.join(PRECISIONS)}")
    if opts.precision is not None and recorded is not None and opts.precision != recorded:
        raise UserError(f"--precision {opts.precision}: the units in {opts.results} ran at {recorded} ({record}), and runs "
                        f"at {opts.precision} would not pair with them; give another --results and --runs to start a "
                        f"campaign at {opts.precision}")
    opts.precision, opts.recorded = opts.precision or recorded or PRECISIONS[0], recorded is not None


def slow_precision(precision: str) -> str | None:
    """Why this machine should not run units at `precision` (bf16 emulated, many times slower), or None."""
    if precision != "bf16":
        return None
    from jointrag.runtime import default_device, resolve_precision

    device = default_device()
    if resolve_precision("auto", device) == "bf16":
        return None
    return (f"this campaign runs at bf16 (--precision), which this machine's {device.type} does not run fast (bf16 "
            "matrix math needs AVX512-BF16 or AMX on a CPU, or a GPU with bf16): run it on such a machine, or start "
            "another campaign with --precision fp32 and other --runs and --results")


# --- state: what is done, how far a training run got -----------------------------------------------


def checkpoint_step(run: Path) -> int | None:
    """The step of RUN/checkpoint, or None without one (the trainer state read memory-mapped: cheap)."""
    state = run / "checkpoint" / "trainer.pt"
    if not state.is_file():
        return None
    import torch

    try:
        return int(torch.load(state, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # a damaged file: the run resumes or restarts, and jointrag says what is wrong
        return 0


class State:
    """What is done, and the measured figures of the estimate."""

    def __init__(self, plan: list[Unit], opts):
        self.plan, self.opts = plan, opts
        self.by_name = {u.name: u for u in plan}
        self.runs, self.results = Path(opts.runs), Path(opts.results)
        self.dependents: dict[str, list[Unit]] = {}
        for unit in plan:
            for need in unit.needs:
                self.dependents.setdefault(need, []).append(unit)
        self.failed: set[str] = set()
        self.measure()

    # done markers

    def result_dir(self, unit: Unit) -> Path:
        return self.results / unit.name

    def done(self, unit: Unit) -> bool:
        if unit.kind == "eval":
            return (self.result_dir(unit) / "metrics.json").is_file() or (unit.out / "metrics.json").is_file()
        if unit.kind == "prep":
            return unit.marker.is_file()
        if unit.kind == "pipeline":
            return (unit.out / "ablation" / unit.config.eval.decode / "table.json").is_file()
        step = checkpoint_step(unit.out)
        return step is not None and step >= unit.config.train.steps

    def needed(self, unit: Unit) -> bool:
        """A training run (or data preparation) whose dependents are all done, e.g. evaluations committed
        from another machine, need not run again."""
        dependents = self.dependents.get(unit.name, [])
        return unit.kind == "eval" or not dependents or not all(self.done(d) or not self.needed(d) for d in dependents)

    def status(self, unit: Unit) -> tuple[str, str]:
        """(state, detail): done, todo, partial (a training run with a checkpoint) or blocked (needs undone)."""
        if self.done(unit):
            return "done", ""
        if unit.kind != "eval" and not self.needed(unit):
            return "done", "all that needs it is done"
        if unit.kind == "train" and (step := checkpoint_step(unit.out)) is not None:
            return "partial", f"step {step}/{unit.config.train.steps}"
        if unit.kind == "pipeline" and (unit.out / "config.yaml").is_file():
            return "partial", ", ".join(f"{stage} step {checkpoint_step(unit.out / stage) or 0}/{unit.config.train.steps}"
                                        for stage in ("lm-ft", "r-ft"))
        waiting = [n for n in unit.needs if not self.done(self.by_name[n])]
        if waiting:
            return "blocked", "needs " + ", ".join(waiting)
        return "todo", ""

    # measured figures

    def measure(self) -> None:
        """s/step of each training key (median over runs of each run's median `sec_per_step`), from the
        runs' metrics.jsonl and the committed train.json; questions/s of each evaluation key from the
        committed timings.jsonl."""
        per_key: dict[str, list[float]] = {}
        for log in sorted(self.runs.glob("**/metrics.jsonl")):
            key = run_key(self.runs, log.parent)
            values = [r["sec_per_step"] for r in read_jsonl(log) if r.get("split") == "train" and "sec_per_step" in r]
            if key and values:
                per_key.setdefault(key, []).append(statistics.median(values))
        for summary in sorted(self.results.glob("**/train.json")):
            for stage in json.loads(summary.read_text()).get("stages", []):
                if stage.get("sec_per_step") and not (self.runs / stage["run"] / "metrics.jsonl").is_file():
                    per_key.setdefault(stage["key"], []).append(stage["sec_per_step"])
        self.sec_per_step = {key: statistics.median(values) for key, values in per_key.items()}
        # FALLBACK's figures come from one machine: scale the unmeasured ones by how this campaign's
        # measured steps compare with FALLBACK's (about 2 on a CPU without AMX)
        ratios = [seconds / FALLBACK["sec_per_step"][key] for key, seconds in self.sec_per_step.items()
                  if key in FALLBACK["sec_per_step"]]
        self.step_scale = statistics.median(ratios) if ratios else 1.0
        seconds: dict[str, list[tuple[float, int]]] = {}
        for row in read_jsonl(self.results / "timings.jsonl"):
            if row.get("kind") == "eval" and row.get("questions"):
                seconds.setdefault(row["key"], []).append((row["seconds"], row["questions"]))
        startup = self.startup("eval")
        self.questions_per_sec = {key: sum(q for _, q in rows) / max(1e-9, sum(max(s - startup, 1e-3) for s, _ in rows))
                                  for key, rows in seconds.items()}

    def startup(self, kind: str) -> float:
        return self.opts.startup_seconds if self.opts.startup_seconds is not None else FALLBACK["startup"][kind]

    def step_seconds(self, key: str) -> tuple[float, str]:
        """(s/step, where the figure comes from) for a training key."""
        if self.opts.sec_per_step is not None:
            return self.opts.sec_per_step, "--sec-per-step"
        if key in self.sec_per_step:
            return self.sec_per_step[key], "measured"
        method = key.split(":", 1)[1]
        fallback = FALLBACK["sec_per_step"]
        return self.fallback_seconds(fallback.get(key, fallback.get(f"squad:{method}", 10.0)))

    def fallback_seconds(self, seconds: float) -> tuple[float, str]:
        """A FALLBACK duration on this machine: scaled by how the measured steps compare with FALLBACK's."""
        if self.step_scale == 1.0:
            return seconds, "fallback"
        return seconds * self.step_scale, f"fallback x{self.step_scale:.2f}, as the measured steps"

    def rate(self, key: str) -> tuple[float, str]:
        if self.opts.questions_per_second is not None:
            return self.opts.questions_per_second, "--questions-per-second"
        if key in self.questions_per_sec:
            return self.questions_per_sec[key], "measured"
        seconds, source = self.fallback_seconds(1 / FALLBACK["questions_per_sec"].get(key, 2.0))
        return 1 / seconds, source

    # the estimate of a unit's remaining time

    def estimate(self, unit: Unit) -> tuple[float, str]:
        """(seconds left, how: the figures it used)."""
        if unit.kind == "eval":
            qps, source = self.rate(unit.key)
            questions = _lines(unit.data) if unit.data is not None and unit.data.is_file() else unit.questions
            return self.startup("eval") + questions / qps, f"{questions} q at {qps:.2f} q/s ({source})"
        if unit.kind == "prep":
            if unit.key == "dstc11:index":
                corpus = Path(unit.argv[unit.argv.index("--corpus") + 1])
                count = _lines(corpus) if corpus.is_file() else QUESTIONS["dstc11:corpus"]
                if self.opts.questions_per_second:
                    seconds, source = 1 / self.opts.questions_per_second, "--questions-per-second"
                else:
                    seconds, source = self.fallback_seconds(1 / FALLBACK["passages_per_sec"])
                return self.startup("prep") + count * seconds, f"{count} passages at {1 / seconds:.1f}/s ({source})"
            return self.startup("prep"), "start-up"
        c = unit.config
        if unit.kind == "pipeline":
            group = unit.key.split(":", 1)[0]
            total, parts = self.startup("pipeline"), []
            for stage, method in (("lm-ft", "ra-dit-lm"), ("r-ft", "ra-dit-lsr")):
                left = c.train.steps - (checkpoint_step(unit.out / stage) or 0)
                sps, source = self.step_seconds(f"{group}:{method}")
                total += left * sps + self.dev_seconds(unit, evaluations=1)
                parts.append(f"{stage}: {left} steps x {sps:.1f} s ({source})")
            return total, "; ".join(parts)
        left = c.train.steps - (checkpoint_step(unit.out) or 0)
        sps, source = self.step_seconds(unit.key)
        total = self.startup("train") + left * sps
        evaluations = (left // c.train.eval_every if c.train.eval_every else 0) + 1
        total += self.dev_seconds(unit, evaluations)
        how = f"{left} steps x {sps:.1f} s ({source})"
        if c.model.train_passage_tower:
            refreshes = sum(1 for step in range(c.train.steps - left + 1, c.train.steps + 1) if refresh_due(c.model.refresh, step)) + 1
            total += refreshes * (self.opts.startup_seconds if self.opts.startup_seconds is not None
                                  else self.fallback_seconds(FALLBACK["refresh_seconds"])[0])
            how += f", {refreshes} index refreshes"
        if c.method.name == "bgm-sl":
            found = len(read_jsonl(Path(c.bgm.silver))) if c.bgm.silver else 0
            questions = max(0, left * c.train.batch_size * c.train.grad_accum - found)
            per, source = ((self.opts.sec_per_step, "--sec-per-step") if self.opts.sec_per_step is not None
                           else self.fallback_seconds(FALLBACK["silver_sec_per_question"]))
            total += questions * per
            how += f", silver search for {questions} questions x {per:.1f} s ({source})"
        return total, how

    def dev_seconds(self, unit: Unit, evaluations: int) -> float:
        c = unit.config
        qps, _ = self.rate(f"{unit.key.split(':', 1)[0]}:top1")
        return evaluations * (c.eval.limit or 100) / qps

    def checkpoint_seconds(self, unit: Unit) -> float:
        """Seconds a training unit needs to be worth starting: its start-up and STEPS_WORTH_STARTING steps
        (or its end). Interrupted at the deadline, it saves the step it is in."""
        sps, _ = self.step_seconds(unit.key if unit.kind == "train" else f"{unit.key.split(':', 1)[0]}:ra-dit-lm")
        return self.startup(unit.kind) + min(STEPS_WORTH_STARTING, unit.config.train.steps) * sps


def refresh_due(schedule: str, step: int) -> bool:
    from jointrag.train.loop import parse_refresh, refresh_due as due

    return due(parse_refresh(schedule), step)


def run_key(runs: Path, run: Path) -> str | None:
    """The s/step key of a run directory: its group (first path part under --runs), method and passage tower."""
    import yaml

    config = run / "config.yaml"
    if not config.is_file():
        return None
    saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    try:
        group = run.resolve().relative_to(runs.resolve()).parts[0]
        method = saved["method"]["name"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return f"{group}:{method}" + ("+passage" if saved.get("model", {}).get("train_passage_tower") else "")


def read_jsonl(path: Path) -> list[dict]:
    from jointrag.io import whole_rows

    return whole_rows(path)


# --- running units -----------------------------------------------------------------------------------


def clock() -> float:
    return time.monotonic()


def run_jointrag(argv: list[str], opts, deadline: float | None) -> int:
    """Run `jointrag ARGV`: in this process (--in-process, for tests), or as a child whose output goes to
    this terminal, interrupted (SIGINT, then SIGTERM) if it is still running at `deadline`."""
    if opts.in_process:
        from jointrag.cli import main

        return main(list(argv))
    child = subprocess.Popen([sys.executable, "-m", "jointrag", *argv], start_new_session=True)
    try:
        try:
            return child.wait(timeout=None if deadline is None else max(0.0, deadline - clock()))
        except subprocess.TimeoutExpired:
            say(f"the budget is spent: interrupting {child.pid}")
            return stop(child)
    except KeyboardInterrupt:
        say("interrupted: stopping the running unit (a training run saves the step it is in)")
        stop(child)
        raise


def stop(child: subprocess.Popen) -> int:
    for sig, grace in ((signal.SIGINT, 120), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            return child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return child.wait()


def say(message: str) -> None:
    print(f"campaign: {message}", flush=True)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Runner:
    def __init__(self, plan: list[Unit], state: State, opts):
        self.plan, self.state, self.opts = plan, state, opts
        self.started = clock()
        self.deadline = None if opts.budget_minutes is None else self.started + 60 * opts.budget_minutes

    def selected(self, unit: Unit) -> bool:
        if not self.opts.only:
            return True
        for pattern in self.opts.only:
            if any(c in pattern for c in "*?[") and fnmatch.fnmatch(unit.name, pattern):
                return True
            if pattern in unit.name:
                return True
        return False

    def fits(self, unit: Unit, estimate: float) -> tuple[bool, str]:
        """Whether `unit` may start in the time left of the budget."""
        if self.deadline is None:
            return True, ""
        left = self.deadline - clock()
        if left <= 0:
            return False, "the budget is spent"
        if estimate <= left:
            return True, ""
        if unit.kind in ("train", "pipeline") and self.state.checkpoint_seconds(unit) <= left:
            return True, "it will stop at the deadline, saving the step it is in, and resume in the next chunk"
        return False, f"needs ~{duration(estimate)}, {duration(left)} left"

    def sync(self) -> None:
        """Copy the results of units done outside this driver, or before a crash between a unit's end and
        its copy (a done evaluation without its copy under --results, a finished run without train.json)."""
        for unit in self.plan:
            if unit.kind == "eval" and (unit.out / "metrics.json").is_file() and not (self.state.result_dir(unit) / "metrics.json").is_file():
                copy_eval(unit.out, self.state.result_dir(unit))
            elif unit.kind in ("train", "pipeline") and not (self.state.results / f"{unit.name}.json").is_file() \
                    and (unit.out / "metrics.jsonl").is_file() and self.state.done(unit):
                summarise_training(unit, self.state)

    def run(self) -> int:
        self.sync()
        waiting, deferred, spent = [], [], False
        for unit in [u for u in self.plan if self.selected(u)]:
            if not spent and self.deadline is not None and self.deadline - clock() <= 0:
                say(f"the budget of {self.opts.budget_minutes:g} min is spent")
                spent = True
            state, detail = self.state.status(unit)
            if state == "done":
                continue
            if state == "blocked":
                waiting.append(unit.name)
                continue
            if spent:
                deferred.append(unit.name)
                continue
            estimate, how = self.state.estimate(unit)
            ok, why = self.fits(unit, estimate)
            if not ok:
                deferred.append(f"{unit.name} ({why})")
                continue
            self.execute(unit, state, detail, estimate, how, why)
        for what, names in (("left for the next chunk", deferred), ("waiting for units not done", waiting)):
            if names:
                say(f"{len(names)} units {what}: " + ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
        return 1 if self.state.failed else 0

    def execute(self, unit: Unit, state: str, detail: str, estimate: float, how: str, note: str) -> None:
        done = sum(self.state.done(u) for u in self.plan)
        elapsed = duration(clock() - self.started)
        say(f"[{done}/{len(self.plan)} done, {elapsed} into this chunk] {unit.kind} {unit.name}"
            f"{' (resumes at ' + detail + ')' if state == 'partial' else ''}: ~{duration(estimate)} ({how})"
            f"{'; ' + note if note else ''}")
        started = clock()
        code, retries = 0, 0
        while unit.argv:
            before = self.progress(unit)
            resume = before is not None
            code = run_jointrag(unit.argv + (["--resume"] if resume else []), self.opts, self.deadline)
            stopped = self.deadline is not None and clock() >= self.deadline
            after = self.progress(unit)
            # a training process that died after a new checkpoint (e.g. killed for memory: its resident memory
            # grows over a long run, docs/performance.md) continues in a fresh process, up to RETRIES times
            if code == 0 or stopped or unit.kind == "eval" or retries >= RETRIES or (after or 0) <= (before or 0):
                break
            retries += 1
            say(f"{unit.name} exited with status {code} after reaching {after} steps: resuming it in a new process "
                f"({retries} of {RETRIES})")
        if code == 0 and unit.prepare is not None:
            unit.prepare()
        seconds = clock() - started
        if code != 0:
            if self.deadline is not None and clock() >= self.deadline:
                say(f"{unit.name} stopped at the deadline after {duration(seconds)}" +
                    (" (it resumes from the step it saved)" if unit.kind in ("train", "pipeline") else ""))
            else:
                say(f"FAILED: {unit.name} (exit status {code}) after {duration(seconds)}; its dependents wait")
                self.state.failed.add(unit.name)
            return
        self.record(unit, seconds)
        say(f"done: {unit.name} in {duration(seconds)} (estimate was {duration(estimate)})")

    def progress(self, unit: Unit) -> int | None:
        """A training unit's saved steps (a pipeline's: both stages'), None before its first checkpoint (a
        pipeline: before its directory exists, since `--resume` then continues its stages)."""
        if unit.kind == "train":
            return checkpoint_step(unit.out)
        if unit.kind == "pipeline":
            return sum(checkpoint_step(unit.out / stage) or 0 for stage in ("lm-ft", "r-ft")) if unit.out.exists() else None
        return None

    def record(self, unit: Unit, seconds: float) -> None:
        """Copy an evaluation's results, summarise a training run, and log the unit's time."""
        results = self.state.results
        results.mkdir(parents=True, exist_ok=True)
        if unit.kind == "eval":
            copy_eval(unit.out, self.state.result_dir(unit))
        elif unit.kind in ("train", "pipeline"):
            summarise_training(unit, self.state)
        row = {"unit": unit.name, "kind": unit.kind, "key": unit.key, "seconds": round(seconds, 1),
               "questions": unit.questions if unit.kind == "eval" else None, "time": round(time.time()),
               "precision": self.opts.precision}
        if unit.kind == "eval" and unit.data is not None and unit.data.is_file():
            row["questions"] = _lines(unit.data)
        with open(results / "timings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.state.measure()


# --- results: copies, training summaries, compare tables, summary ----------------------------------

KEPT = ("id", "question", "answers", "prediction", "em", "f1", "rouge_l", "mrr", "gold_recall", "answer_recall")


def _rounded(value):
    """Scores to 4 decimals (a mean over 672 questions moves by less than 1e-4 points)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def copy_eval(out: Path, target: Path) -> None:
    """metrics.json, and predictions.jsonl with the fields `jointrag compare` reads (scores to 4 decimals),
    the answers, the prediction and the ids of the passages retrieved (or passed by the bridge), about 420
    bytes a SQuAD question: the passages' titles and scores, gold ids and dialog histories stay in --runs."""
    target.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in read_jsonl(out / "predictions.jsonl"):
        kept = {k: _rounded(row[k]) for k in KEPT if k in row}
        kept["passages"] = [p["id"] if isinstance(p, dict) else p for p in row.get("passages", [])]
        rows.append(kept)
    with open(target / "predictions.jsonl.tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
    os.replace(target / "predictions.jsonl.tmp", target / "predictions.jsonl")
    (target / "metrics.json").write_text((out / "metrics.json").read_text(encoding="utf-8"), encoding="utf-8")


def summarise_training(unit: Unit, state: State) -> None:
    """--results/<run>/train.json: per run (a pipeline: per stage) its method, steps, median s/step, mean
    loss over the first and last 50 steps, and its dev evaluations."""
    runs = [unit.out / stage for stage in ("lm-ft", "r-ft")] if unit.kind == "pipeline" else [unit.out]
    stages = []
    for run in runs:
        rows = read_jsonl(run / "metrics.jsonl")
        train = [r for r in rows if r.get("split") == "train" and "loss" in r]
        seconds = [r["sec_per_step"] for r in train if "sec_per_step" in r]
        stages.append({
            "run": str(run.relative_to(state.runs)) if run.is_relative_to(state.runs) else str(run),
            "key": run_key(state.runs, run), "steps": max((r["step"] for r in train), default=0),
            "sec_per_step": round(statistics.median(seconds), 3) if seconds else None,
            "train_seconds": round(sum(seconds)),  # the steps kept (a resumed run drops those after its checkpoint)
            "loss_first_50": round(statistics.mean(r["loss"] for r in train[:50]), 4) if train else None,
            "loss_last_50": round(statistics.mean(r["loss"] for r in train[-50:]), 4) if train else None,
            "dev": [{k: v for k, v in r.items() if k not in ("split", "time")} for r in rows if r.get("split") == "eval"],
            "staleness": [{k: v for k, v in r.items() if k == "step" or "recall" in k or k == "staleness"}
                          for r in rows if "staleness" in r],
        })
    target = state.results / f"{unit.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    recipe = unit.argv[unit.argv.index("--config") + 1]
    settings = [a for previous, a in zip(unit.argv, unit.argv[1:]) if previous == "--set"]
    target.write_text(json.dumps({"unit": unit.name, "recipe": recipe, "settings": settings,
                                  "precision": state.opts.precision, "stages": stages}, indent=1) + "\n",
                      encoding="utf-8")


def eval_groups(plan: list[Unit], state: State) -> dict[tuple[str, str], dict[str, list[Unit]]]:
    """{(dataset, split): {label: its done evaluation units}} in plan order."""
    groups: dict[tuple[str, str], dict[str, list[Unit]]] = {}
    for unit in plan:
        if unit.kind == "eval" and state.done(unit):
            groups.setdefault((unit.dataset, unit.split), {}).setdefault(unit.label, []).append(unit)
    return groups


def prediction_file(unit: Unit, state: State) -> Path:
    copied = state.result_dir(unit) / "predictions.jsonl"
    return copied if copied.is_file() else unit.out / "predictions.jsonl"


def report(plan: list[Unit], state: State) -> None:
    """Compare every method against RAG-Sequence and against the untrained pipeline, per data set, split
    and family (the models of one table: main, ra-dit, bgm), into --results/compare/; then summary.md."""
    from jointrag.errors import UserError
    from jointrag.evaluation.compare import compare, format_report

    target = state.results / "compare"
    written, paired = [], []
    for (dataset, split), labels in eval_groups(plan, state).items():
        families: dict[str, list[str]] = {}
        for label, units in labels.items():
            families.setdefault(units[0].family, []).append(label)
        for family, members in families.items():
            for reference in ("rag-sequence", "untrained"):
                others = ["rag-sequence", "untrained"] if family != "main" else []
                names = list(dict.fromkeys(m for m in [reference, *others, *members] if m in labels))
                if reference not in labels or len(names) < 2:
                    continue
                specs = [f"{name}=" + ",".join(str(prediction_file(u, state)) for u in labels[name]) for name in names]
                try:
                    result = compare(specs, reference=reference)
                except UserError as error:
                    say(f"compare {dataset} {split} {family} vs {reference}: {error}")
                    continue
                stem = target / f"{dataset}-{split}-{family}-vs-{reference}"
                target.mkdir(parents=True, exist_ok=True)
                stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
                command = "jointrag compare --reference " + reference + " " + " ".join(specs)
                stem.with_suffix(".txt").write_text(f"$ {command}\n\n{format_report(result)}\n", encoding="utf-8")
                written.append(stem.with_suffix(".txt"))
                paired.append((dataset, split, family, command, result))
    summary = write_summary(plan, state, paired)
    plots = plot_curves(plan, state)
    say(f"report: {len(written)} compare tables in {target}, summary in {summary}"
        + (f", curves in {', '.join(str(p) for p in plots)}" if plots else ""))


def plot_curves(plan: list[Unit], state: State) -> list[Path]:
    """--results/curves/<dataset>.png from the committed train.json files: per method, the dev gold
    recall@k of the prior (solid) and of the posterior q(z|x,y) (dashed, VRAG and JSA) over training,
    one colour per seed; the dev EM of every method; and where the passage tower trains, the index
    staleness at each refresh (gold recall@k with the stale index minus with the fresh one)."""
    from jointrag.evaluation.plot import plot_panels

    by_dataset: dict[str, dict[str, list[tuple[str, list[dict], list[dict]]]]] = {}
    for unit in plan:
        summary = state.results / f"{unit.name}.json"
        if unit.kind != "train" or not summary.is_file():
            continue
        stage = json.loads(summary.read_text(encoding="utf-8"))["stages"][0]
        dataset, method, seed = unit.name.split("/")[:3]
        by_dataset.setdefault(dataset, {}).setdefault(method, []).append((seed, stage["dev"], stage.get("staleness", [])))
    written = []
    for dataset, methods in by_dataset.items():
        k = next((key.split("@")[1] for runs in methods.values() for _, dev, _ in runs for row in dev
                  for key in row if key.startswith("gold_recall@") and key != "gold_recall@1"), "1")
        panels = []
        for method, runs in methods.items():
            lines = []
            for colour, (seed, dev, _) in zip(("C0", "C1", "C2", "C3", "C4"), runs):
                for key, who, dash in ((f"gold_recall@{k}", "prior", "-"), (f"posterior_gold_recall@{k}", "posterior", "--")):
                    points = [(r["step"], r[key]) for r in dev if key in r]
                    if points:
                        lines.append((f"{who} {seed}", [s for s, _ in points], [v for _, v in points],
                                      {"color": colour, "linestyle": dash, "marker": "o", "markersize": 3}))
            panels.append((f"{method}: gold recall@{k}", "%", lines))
        panels.append(("dev EM", "%", [(f"{method} {seed}", [r["step"] for r in dev if "em" in r],
                                        [r["em"] for r in dev if "em" in r], {"marker": "o", "markersize": 3})
                                       for method, runs in methods.items() for seed, dev, _ in runs]))
        stale = [(f"{method} {seed}", [r["step"] for r in rows], [r["staleness"] for r in rows], {"marker": "o"})
                 for method, runs in methods.items() for seed, _, rows in runs if rows]
        if stale:
            panels.append((f"index staleness (recall@{k} stale - fresh)", "percentage points", stale))
        questions = next((r["examples"] for runs in methods.values() for _, dev, _ in runs for r in dev if "examples" in r), "?")
        written.append(plot_panels(state.results / "curves" / f"{dataset}.png", f"campaign {dataset}: curves over "
                                   f"training ({questions} dev questions)", panels, columns=min(3, len(panels))))
    return written


SUMMARY_METRICS = ("em", "f1", "rouge_l", "gold_recall@1", "gold_recall@5", "bleu4", "knowledge_f1", "passages")


PAIRED_METRICS = ("em", "f1", "gold_recall")  # the summary's paired rows; compare/*.txt hold every metric
DOCS = ROOT / "docs" / "results.md"
BLOCK = ("<!-- campaign tables: written by scripts/campaign.py --report -->", "<!-- end of campaign tables -->")


def paired_table(result: dict) -> list[str]:
    """One row per compared model and metric (EM, F1, gold recall at the largest cutoff) of a compare report."""
    cutoffs = [m for m in result["metrics"] if m.startswith("gold_recall@")]
    metrics = [m for m in result["metrics"] if m in PAIRED_METRICS[:2]] + cutoffs[-1:]
    lines = [f"| model vs {result['reference']} | metric | {result['reference']} | model | diff | W/T/L | p | 95% CI |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["comparisons"]:
        if c["metric"] in metrics:
            lines.append(f"| {c['b']} | {c['metric']} | {_spread(c['mean_a'], c['std_a'])} | {_spread(c['mean_b'], c['std_b'])} "
                         f"| {c['diff']:+.2f} | {c['wins']}/{c['ties']}/{c['losses']} | {c['p']:.3g} "
                         f"| [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] |")
    return lines


def _spread(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def training_table(plan: list[Unit], state: State) -> list[str]:
    """Per training run done: its steps, median s/step, hours in its steps and the loss it went from and to."""
    rows = []
    for unit in plan:
        summary = state.results / f"{unit.name}.json"
        if unit.kind in ("train", "pipeline") and summary.is_file():
            for stage in json.loads(summary.read_text(encoding="utf-8"))["stages"]:
                hours = stage.get("train_seconds", 0) / 3600
                rows.append(f"| {stage['run']} | {stage['steps']} | {stage['sec_per_step']} | {hours:.1f} "
                            f"| {stage['loss_first_50']} | {stage['loss_last_50']} |")
    if not rows:
        return []
    return ["| run | steps | s/step (median) | hours in steps | loss, first 50 steps | loss, last 50 steps |",
            "|---|---:|---:|---:|---:|---:|", *rows, ""]


def update_docs(body: list[str], docs: Path = DOCS) -> bool:
    """Replace the text between docs/results.md's campaign markers with `body`; False without them."""
    if not docs.is_file():
        return False
    text = docs.read_text(encoding="utf-8")
    start, end = text.find(BLOCK[0]), text.find(BLOCK[1])
    if start < 0 or end < start:
        return False
    head, tail = text[: start + len(BLOCK[0])], text[end:]
    docs.write_text(head + "\n\n" + "\n".join(body).strip() + "\n\n" + tail, encoding="utf-8")
    return True


def write_summary(plan: list[Unit], state: State, paired: list = ()) -> Path:
    """summary.md: per data set and split the means ± std over seeds, then the paired comparisons (EM,
    F1, gold recall) against RAG-Sequence and the untrained pipeline with their commands, the training
    runs' time, and the campaign's status. The same tables go into docs/results.md between its markers
    when the results are this repository's (not a test's)."""
    head = ["# Results campaign (issue 16): summary", "",
            "Written by `scripts/campaign.py --report`; means ± standard deviation over the seeds done, percentages.",
            "Every metric of every paired comparison: `compare/*.txt`.", ""]
    lines = []
    for (dataset, split), labels in eval_groups(plan, state).items():
        rows = []
        for label, units in labels.items():
            metrics = [json.loads((state.result_dir(u) / "metrics.json").read_text()) if (state.result_dir(u) / "metrics.json").is_file()
                       else json.loads((u.out / "metrics.json").read_text()) for u in units]
            rows.append((label, metrics))
        keys = [k for k in SUMMARY_METRICS if any(k in m for _, ms in rows for m in ms)]
        lines += [f"## {dataset}, {split} split", "", "| model | runs | questions | " + " | ".join(keys) + " |",
                  "|---|---:|---:|" + "---:|" * len(keys)]
        for label, metrics in rows:
            cells = []
            for key in keys:
                values = [m[key] for m in metrics if key in m]
                if not values:
                    cells.append("")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.2f}")
                else:
                    cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
            lines.append(f"| {label} | {len(metrics)} | {metrics[0].get('examples', '')} | " + " | ".join(cells) + " |")
        lines.append("")
        for _, _, family, command, result in [p for p in paired if p[:2] == (dataset, split)]:
            lines += [f"Paired, {dataset} {split} ({family} models), each model against {result['reference']} "
                      "(sign test p, paired bootstrap interval of the difference in points):", "",
                      *paired_table(result), "", f"    {command}", ""]
    training = training_table(plan, state)
    if training:
        lines += ["## Training runs", "", *training]
    done = [u for u in plan if state.status(u)[0] == "done"]
    left = [u for u in plan if u not in done]
    lines += ["## Status", "", f"{len(done)} of {len(plan)} units done; {len(left)} left, "
              f"about {duration(sum(state.estimate(u)[0] for u in left))} of work by the current estimate "
              "(`scripts/campaign.py --dry-run` lists them).", ""]
    path = state.results / "summary.md"
    state.results.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + lines), encoding="utf-8")
    if state.results.resolve() == (ROOT / "results" / "campaign").resolve() and update_docs(
            [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in lines]):
        say(f"updated the campaign tables in {DOCS.relative_to(ROOT)}")
    return path


# --- the plan and its estimate, printed --------------------------------------------------------------


def print_plan(plan: list[Unit], state: State, runner: Runner) -> None:
    width = max(len(u.name) for u in plan)
    total, rows = 0.0, []
    for unit in plan:
        if not runner.selected(unit):
            continue
        status, detail = state.status(unit)
        estimate, how = (0.0, "") if status == "done" else state.estimate(unit)
        total += estimate
        rows.append((unit, status, detail, estimate, how))
    print(f"{'unit':<{width}}  {'status':<8}  {'estimate':>8}  details")
    for unit, status, detail, estimate, how in rows:
        text = "; ".join(part for part in (detail, how) if part)
        print(f"{unit.name:<{width}}  {status:<8}  {duration(estimate) if status != 'done' else '':>8}  {text}")
    left = [r for r in rows if r[1] != "done"]
    chunk = runner.opts.budget_minutes or 165
    print(f"\n{len(rows) - len(left)} of {len(rows)} units done; {len(left)} left: about {duration(total)} of work "
          f"({total / 3600:.1f} h: at least {math.ceil(total / (chunk * 60)) if total else 0} chunks of {chunk:g} minutes)")
    experiments: dict[str, float] = {}
    for unit, _, _, estimate, _ in left:
        experiment = "/".join(unit.name.split("/")[:2])
        experiments[experiment] = experiments.get(experiment, 0.0) + estimate
    if experiments:
        print("by experiment: " + ", ".join(f"{name} {duration(seconds)}" for name, seconds in experiments.items()))
    if runner.deadline is not None:
        chunk = simulate_chunk(left, state, 60 * runner.opts.budget_minutes)
        print(f"this chunk ({runner.opts.budget_minutes:g} min) would run, by the estimate: "
              + (", ".join(chunk) if chunk else "nothing"))


def simulate_chunk(left, state: State, budget: float) -> list[str]:
    """The units a chunk of `budget` seconds would start, by the estimates (no unit actually runs)."""
    spent, started, done = 0.0, [], {u.name for u in state.plan if state.done(u)}
    for unit, status, detail, estimate, _ in left:
        if spent >= budget or any(n not in done for n in unit.needs):
            continue
        if spent + estimate <= budget:
            spent += estimate
            started.append(unit.name)
            done.add(unit.name)
        elif unit.kind in ("train", "pipeline") and spent + state.checkpoint_seconds(unit) <= budget:
            started.append(f"{unit.name} (part, to resume)")
            spent = budget
    return started


# --- command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="campaign.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dry-run", action="store_true", help="print the plan, what is done and the estimate; run nothing")
    p.add_argument("--report", action="store_true", help="only write the compare tables and the summary of what is done")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="units whose name matches (a glob such as 'squad/jsa/*', else a substring); repeatable")
    p.add_argument("--budget-minutes", type=float, help="end this chunk within N minutes (see above)")
    p.add_argument("--precision", choices=PRECISIONS, help="of every unit (default: the one --results/campaign.json "
                                                            "records, else bf16; see above)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the repeated runs (default 0,1,2; RA-DIT and BGM take the first)")
    p.add_argument("--set", action="append", default=[], metavar="[GROUP:]KEY=VALUE",
                   help="a training setting for every run, or for one group's (squad, dstc11)")
    p.add_argument("--dialog", default=str(ROOT.parent / "shared" / "data" / "dstc11-track5-val"),
                   help="the dialog set to convert (default: ../shared/data/dstc11-track5-val)")
    p.add_argument("--dialog-format", default="dstc11", help="its format for `jointrag dialog-data` (default dstc11)")
    p.add_argument("--retriever", help="passage encoder of the DSTC11 index (default: all-MiniLM-L6-v2)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "campaign"), help="run directories (default runs/campaign, not committed)")
    p.add_argument("--results", default=str(ROOT / "results" / "campaign"),
                   help="copies of the results to commit (default results/campaign)")
    p.add_argument("--sec-per-step", type=float, help="estimate: seconds per training step of every run, and per BGM "
                                                      "silver-search question (default: measured, else FALLBACK)")
    p.add_argument("--questions-per-second", type=float, help="estimate: evaluation speed (default: measured)")
    p.add_argument("--startup-seconds", type=float, help="estimate: start-up of every command and each index refresh "
                                                         "(default 20-120 s by kind, 30 s a refresh)")
    p.add_argument("--in-process", action="store_true", help="run jointrag in this process (tests); no deadline interruption")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for name in ("runs", "results"):  # under the repository: relative, as the recipes' paths are
        path = Path(getattr(opts, name)).absolute()
        setattr(opts, name, str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    previous = Path.cwd()
    os.chdir(ROOT)  # the recipes name templates relative to the repository root
    try:
        from jointrag.errors import UserError

        try:
            plan = build_plan(opts)
        except UserError as error:
            print(f"campaign: error: {error}", file=sys.stderr)
            return 2
        state = State(plan, opts)
        runner = Runner(plan, state, opts)
        if opts.report:
            report(plan, state)
            return 0
        print_plan(plan, state, runner)
        refusal = slow_precision(opts.precision)
        if opts.dry_run:
            if refusal:
                say(f"note: {refusal}")
            return 0
        if refusal:
            print(f"campaign: error: {refusal}", file=sys.stderr)
            return 2
        if not opts.recorded:
            Path(opts.results).mkdir(parents=True, exist_ok=True)
            (Path(opts.results) / "campaign.json").write_text(json.dumps({"precision": opts.precision}) + "\n", encoding="utf-8")
        try:
            code = runner.run()
        except KeyboardInterrupt:
            say("interrupted; what is done so far is reported below")
            code = 130
        report(plan, state)
        left = [u for u in plan if runner.selected(u) and state.status(u)[0] != "done"]
        say(f"{'finished' if not left else f'{len(left)} selected units left'}; commit {state.results} "
            f"({sum(f.stat().st_size for f in state.results.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
        return code
    finally:
        os.chdir(previous)


if __name__ == "__main__":
    sys.exit(main())
