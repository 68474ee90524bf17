"""Peak memory of the default training run (issue 8), next to jointrag's own estimate of it.

Run from the repository root (it loads the real default models: SmolLM2-135M and MiniLM):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py [--config configs/jsa.yaml] [--steps 2]
                                                                  [--out runs/bench/memory.json]

It runs `jointrag train --config CONFIG --steps STEPS --out TMP` in a child process, exactly as a user
would, except that the child records the estimate the trainer's memory check makes
(`jointrag.memory.check_training_memory`: weights, gradients, AdamW state and activations of a
training step) and its resident memory at that moment (models and index loaded, no step run yet).
At exit the child reads its peak resident memory (VmHWM in /proc/self/status); the parent
cross-checks it with `getrusage(RUSAGE_CHILDREN).ru_maxrss`. The table compares the measured growth
from the check to the peak with the estimate's part beyond the weights already loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_retrieval import cpu_model

MIB = 2**20

CHILD = r"""
import json, sys
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import jointrag.train.loop as loop

record = {}
check = loop.check_training_memory

def spy(*args, **kwargs):
    estimate = check(*args, **kwargs)
    record.update(what=estimate.what, parts=estimate.parts, total=estimate.total, loaded=estimate.loaded, rss_at_check=status("VmRSS"))
    return estimate

loop.check_training_memory = spy
from jointrag.cli import main

try:
    code = main(sys.argv[2:])
finally:
    record["peak_rss"] = status("VmHWM")
    Path(sys.argv[1]).write_text(json.dumps(record))
sys.exit(code)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/jsa.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory.json"))
    return parser.parse_args(argv)


def markdown(report: dict) -> str:
    r = report["result"]
    beyond = r["total"] - r["loaded"]
    growth = r["peak_rss"] - r["rss_at_check"]
    return "\n".join([
        f"Default training run: `{report['train_command']}` ({report['seconds']:.0f} s, {report['machine']['threads']} thread)",
        f"Estimate: {r['what']}; " + ", ".join(f"{k} {v / MIB:,.0f} MiB" for k, v in r["parts"].items()),
        "",
        "| figure | MiB |",
        "|---|---:|",
        f"| peak RSS of the run (VmHWM) | {r['peak_rss'] / MIB:,.0f} |",
        f"| peak RSS, getrusage of the child (cross-check) | {report['ru_maxrss'] / MIB:,.0f} |",
        f"| RSS at the memory check (models and index loaded) | {r['rss_at_check'] / MIB:,.0f} |",
        f"| measured growth from the check to the peak | {growth / MIB:,.0f} |",
        f"| jointrag's estimate beyond the loaded weights (gradients, AdamW state, activations) | {beyond / MIB:,.0f} |",
        f"| jointrag's estimate, total (with the weights) | {r['total'] / MIB:,.0f} |",
        "",
        f"Estimate beyond the loaded weights / measured growth: {beyond / max(growth, 1):.2f} (≥ 1: the check does not under-estimate)",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "python": platform.python_version()}
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores ({threads} thread)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        record = Path(tmp) / "record.json"
        train = ["train", "--config", args.config, "--steps", str(args.steps), "--out", str(Path(tmp) / "run")]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(record), *train], env=env)
        seconds = time.perf_counter() - started
        if proc.returncode or not record.is_file():
            print(f"the training run failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode or 1
        result = json.loads(record.read_text())
    report = {
        "command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python", "benchmarks/bench_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "train_command": "jointrag " + " ".join(train[:-1] + ["TMP"]),
        "machine": machine, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "result": result, "ru_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\n(JSON written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
