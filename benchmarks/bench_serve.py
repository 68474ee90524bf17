"""Serving benchmark (issue 17): throughput and latency of `jointrag serve` under 1, 4 and 16 clients.

Run from the repository root:

    .venv/bin/python benchmarks/bench_serve.py [--seconds 60] [--clients 1,4,16] [--max-new-tokens 16]
                                               [--threads T] [--index DIR] [--out runs/bench/serve.json]

It starts `jointrag serve` on the default models (the embedded SQuAD index over all-MiniLM-L6-v2, or
`--index`; SmolLM2-135M-Instruct; scripts/setup.sh installs both) in its own process, on a free
127.0.0.1 port, with T torch threads (default: every core), and waits for it to load. Then, for each number of
clients C, C threads each post `/v1/answer` requests (one question of the embedded test split each,
top1 decoding, k = 5, greedy, `--max-new-tokens`) one after another for `--seconds`, each from its own
place in the split, and time every request. A request started before the deadline is waited for and
counted. Per level it reports the requests answered, requests/s (answered / the level's wall time),
p50 and p95 latency, errors (a non-200 reply or a failed connection), and the mean number of questions
the server ran per batch (answered / batches, from its /health). It then stops the server. Nothing
leaves 127.0.0.1.

Prints the machine, the figures and a Markdown table; writes everything to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 900  # seconds: the first start builds the default index (a few minutes on 2 cores)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds each level of clients runs (default 60)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients (default 1,4,16)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit of each request (default 16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server (default: every core)")
    parser.add_argument("--index", help="index directory to serve (default: the embedded SQuAD index, built on first use)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serve.json"))
    return parser.parse_args(argv)


def start_server(threads: int, index: str | None) -> tuple[subprocess.Popen, str, float]:
    """`jointrag serve` on the default models and a free port: (process, base URL, seconds to load)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "jointrag", "serve", "--port", "0", "--json"] + (["--index", index] if index else [])
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    ready = threading.Event()
    url: list[str] = []

    def read() -> None:
        line = process.stdout.readline()
        if line:
            url.append(json.loads(line)["url"])
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    finished = ready.wait(STARTUP_TIMEOUT)
    if not url:
        process.kill()
        process.wait()
        reason = "exited before it was ready" if finished else f"was not ready within {STARTUP_TIMEOUT} s"
        raise SystemExit(f"jointrag serve {reason} (its error is above)")
    return process, url[0], time.perf_counter() - started


def level(url: str, clients: int, seconds: float, questions: list[str], max_new_tokens: int) -> dict:
    """`clients` threads posting questions for `seconds`: the level's figures."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    batches_before = httpx.get(f"{url}health").json()["batches"]["count"]
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        with httpx.Client(timeout=300) as session:
            i = offset
            while time.perf_counter() < deadline:
                body = {"question": questions[i % len(questions)], "max_new_tokens": max_new_tokens}
                i += 1
                started = time.perf_counter()
                try:
                    response = session.post(f"{url}v1/answer", json=body)
                    failed = None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as error:
                    failed = f"{type(error).__name__}: {error}"
                elapsed = time.perf_counter() - started
                with lock:
                    if failed:
                        errors.append(failed)
                    else:
                        latencies.append(elapsed)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c * len(questions) // clients,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    batches = httpx.get(f"{url}health").json()["batches"]["count"] - batches_before
    cuts = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "clients": clients, "seconds": round(wall, 1), "requests": len(latencies), "errors": len(errors),
        "first_error": errors[0] if errors else None, "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(1000 * cuts[18], 1) if latencies else None,
        "mean_batch": round(len(latencies) / batches, 2) if batches else None,
    }


def machine_line(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, server with {threads} torch thread(s), torch {torch.__version__}, Python {platform.python_version()}"


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}", "",
             f"`jointrag serve` on the default models, `/v1/answer` (top1, k = 5, greedy, max {report['max_new_tokens']} new "
             f"tokens), {report['seconds_per_level']:g} s per level; the server loaded in {report['startup_seconds']} s.", "",
             "| clients | requests | requests/s | p50 latency (ms) | p95 latency (ms) | errors | questions per batch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["levels"]:
        lines.append(f"| {row['clients']} | {row['requests']} | {row['requests_per_s']} | {row['p50_ms']} | {row['p95_ms']} | "
                     f"{row['errors']} | {row['mean_batch']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jointrag.data.qa import embedded_examples

    questions = [e.question for e in embedded_examples("test")]
    process, url, startup = start_server(args.threads, args.index)
    try:
        httpx.post(f"{url}v1/answer", json={"question": questions[0], "max_new_tokens": args.max_new_tokens}, timeout=300)  # warm-up
        levels = []
        for clients in (int(c) for c in args.clients.split(",")):
            levels.append(level(url, clients, args.seconds, questions, args.max_new_tokens))
            print(json.dumps(levels[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    report = {"machine": machine_line(args.threads), "startup_seconds": round(startup, 1), "seconds_per_level": args.seconds,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "levels": levels,
              "command": " ".join([".venv/bin/python benchmarks/bench_serve.py", *(argv if argv is not None else sys.argv[1:])])}
    print("\n" + markdown(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(row["errors"] == 0 for row in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
