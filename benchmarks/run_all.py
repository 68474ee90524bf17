"""Run every benchmark, one after another, and collect their figures (issue 8).

Run from the repository root (`make bench` runs the same):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py [--quick] [--only retrieval,training,scale,roofline,memory,serve]
                                                             [--real-index DIR --real-queries FILE.jsonl]
                                                             [--out runs/bench]

The benchmarks, each in its own process, all but the roofline with one thread (OMP_NUM_THREADS=1, `--threads 1`):

- retrieval: corpus encoding against sentence-transformers, search overhead against raw faiss
  (`bench_retrieval.py`);
- training: a training step against transformers' RAG classes, JSA against RAG-Sequence
  (`bench_training.py --profile 1`);
- scale: flat, HNSW and IVF-PQ against raw faiss at 100k and 1M vectors (`bench_scale.py`;
  `--real-index` / `--real-queries` pass a real index and its queries on to it);
- roofline: bf16 and fp32 GEMM throughput at the generator's shapes (the machine's limit) and the
  training step of rag-sequence, rag-token and jsa against it (`bench_roofline.py`); the one benchmark
  that uses every core (`--threads` = the CPU count), as its figure is the machine's;
- memory: peak memory of the default training run, `configs/jsa.yaml` for 2 steps (`bench_memory.py`);
- serve: requests/s and p50/p95 latency of `jointrag serve` on the default models under 1, 4 and 16
  concurrent clients, 60 s each (`bench_serve.py`; its server runs one torch thread here like the rest).

`--quick` is a smoke run: bench_scale skips 1M, bench_retrieval encodes 200 passages and searches 20k
synthetic vectors, bench_training times 2 steps without the profile, bench_roofline 1 step of
rag-sequence and jsa, bench_serve 10 s per level. Each benchmark prints its figures and writes its JSON (`OUT/NAME.json`) and
log (`OUT/NAME.log`); this script then writes
`OUT/results.json` (all reports, with each one's command and exit status) and `OUT/results.md` (each
benchmark's Markdown tables). A failed benchmark is recorded and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("retrieval", "training", "scale", "roofline", "memory", "serve")


def commands(args) -> dict[str, list[str]]:
    out = args.out
    quick = args.quick
    scale = ["--out", str(out / "scale.json")] + (["--quick"] if quick else [])
    if args.real_index:
        scale += ["--real-index", str(args.real_index), "--real-queries", str(args.real_queries)]
    return {
        "retrieval": ["bench_retrieval.py", "--threads", "1", "--out", str(out / "retrieval.json")]
        + (["--passages", "200", "--synthetic", "20000", "--repeats", "1", "--search-repeats", "3"] if quick else []),
        "training": ["bench_training.py", "--threads", "1", "--out", str(out / "training.json")]
        + (["--steps", "2", "--warmup", "1", "--no-tight"] if quick else ["--profile", "1"]),
        "scale": ["bench_scale.py", *scale],
        "roofline": ["bench_roofline.py", "--threads", str(os.cpu_count()), "--out", str(out / "roofline.json")]
        + (["--methods", "rag-sequence,jsa", "--steps", "1", "--warmup", "1"] if quick else []),
        "memory": ["bench_memory.py", "--out", str(out / "memory.json")],
        "serve": ["bench_serve.py", "--threads", "1", "--out", str(out / "serve.json")] + (["--seconds", "10"] if quick else []),
    }


def run(name: str, argv: list[str], out: Path) -> dict:
    """Run one benchmark script, echoing and logging its output; its report, or the failure."""
    command = [sys.executable, str(HERE / argv[0]), *argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - started
    report_path = out / f"{name}.json"
    entry = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/" + " ".join(argv), "exit_status": code, "seconds": round(seconds, 1)}
    if code == 0 and report_path.is_file():
        entry["report"] = json.loads(report_path.read_text())
    print(f"=== {name}: exit {code} after {seconds:.0f} s", flush=True)
    return entry


def markdown_of(name: str, report: dict) -> str:
    import bench_memory
    import bench_retrieval
    import bench_roofline
    import bench_scale
    import bench_serve
    import bench_training

    module = {"retrieval": bench_retrieval, "training": bench_training, "scale": bench_scale, "roofline": bench_roofline, "memory": bench_memory,
              "serve": bench_serve}[name]
    return module.markdown(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: no 1M vectors, fewer passages, steps and samples")
    parser.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {', '.join(NAMES)}")
    parser.add_argument("--real-index", type=Path, help="passed to bench_scale: a real index directory (default retriever)")
    parser.add_argument("--real-queries", type=Path, help="passed to bench_scale: JSONL queries for --real-index")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    chosen = [n for n in NAMES if n in args.only.split(",")]
    if unknown := set(args.only.split(",")) - set(NAMES):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if bool(args.real_index) != bool(args.real_queries):
        parser.error("--real-index and --real-queries go together")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])]),
               "quick": args.quick, "benchmarks": {}}
    for name, argv_ in commands(args).items():
        if name in chosen:
            results["benchmarks"][name] = run(name, argv_, args.out)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))

    titles = {"retrieval": "Retrieval: encoding against sentence-transformers, search overhead against raw faiss",
              "training": "Training step against transformers' RAG; JSA against RAG-Sequence",
              "scale": "Search at scale against raw faiss: flat, HNSW, IVF-PQ",
              "roofline": "Roofline: the training step against the machine's bf16 GEMM throughput",
              "memory": "Peak memory of the default training run",
              "serve": "Serving: requests/s and latency of jointrag serve under 1, 4 and 16 clients"}
    lines = [f"# Benchmarks{' (quick)' if args.quick else ''}", "", f"Command: `{results['command']}` ({results['seconds']:.0f} s)", ""]
    for name, entry in results["benchmarks"].items():
        lines += [f"## {titles[name]}", "", f"Command: `{entry['command']}` ({entry['seconds']:.0f} s)", ""]
        if "report" in entry:
            text = markdown_of(name, entry["report"])
            machine = entry["report"].get("machine", {}).get("line")
            lines += ([f"Machine: {machine}", ""] if machine and not text.startswith("Machine:") else []) + [text, ""]
        else:
            lines += [f"FAILED (exit status {entry['exit_status']}); see {args.out / (name + '.log')}", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.md'} ({results['seconds']:.0f} s)")
    return 0 if all(e["exit_status"] == 0 for e in results["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
