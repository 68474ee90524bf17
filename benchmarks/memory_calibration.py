"""Calibrate `jointrag.memory.training_estimate` against the peak RSS of real training steps.

Run from the repository root (about 15 minutes on one core; the largest point, 20 x 512 in fp32, peaks
at 16.5 GiB of RAM):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_calibration.py [--points 8x128:fp32,20x512:bf16 ...]
                                                                       [--out runs/memory_calibration.json]
    .venv/bin/python benchmarks/memory_calibration.py --report runs/memory_calibration.json   # table only

Each point runs in a fresh subprocess: it loads the default generator (SmolLM2-135M-Instruct) with
`jointrag.generation.generator.load_generator`, makes every weight trainable (full fine-tuning), sets
`max_prompt_tokens` so that every prompt is cut to exactly TOKENS tokens, and notes its resident
memory (`baseline`: libraries and weights, what a trainer holds when it runs the memory check). It
then resets the peak (writing 5 to /proc/self/clear_refs, so the load's own peak does not count) and
runs one `Generator.pair_logprobs` forward and backward over ROWS (prompt, answer) pairs under the
precision's autocast, reads the peak (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), then takes an
AdamW step and reads the peak again.

The table shows, per point: the peak over the baseline during forward+backward and over the whole
step; the activations that forward+backward held (its peak minus the baseline and the gradients),
also in bytes per token (prompt and `ANSWER_TOKENS`, as the estimate counts them), layer and hidden
unit, the unit of `jointrag.memory.ACTIVATION_BYTES`; and `jointrag.memory.training_estimate` for
the same model and batch (computed now, so `--report` shows the current formula against saved
measurements): its activations, which must cover the measured ones on their own (with LoRA there
are hardly any gradients or AdamW moments to spare), and its part beyond the loaded weights
(gradients, AdamW state, activations), which must cover the whole step's increase: the last two
columns are estimate over measurement, and must be at least 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_POINTS = [f"{rows}x{tokens}:{precision}" for precision in ("fp32", "bf16") for rows in (8, 20) for tokens in (128, 256, 512)]
MIB = 2**20
# prompt text: one paragraph, repeated past the longest prompt (cut from the left to TOKENS tokens)
PARAGRAPH = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League (NFL) "
    "for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the National "
    "Football Conference (NFC) champion Carolina Panthers 24-10 to earn their third Super Bowl title. The game was "
    "played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, California. "
)
ANSWERS = ["Denver Broncos", "Carolina Panthers", "Levi's Stadium in Santa Clara, California", "24-10", "February 7, 2016"]


def peak_rss() -> int:
    """The process's peak resident memory in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(rows: int, tokens: int, precision: str) -> dict:
    """One point, in this process (call it in a fresh one)."""
    import gc

    import torch

    from jointrag.generation.generator import load_generator
    from jointrag.runtime import autocast

    torch.set_num_threads(1)
    generator = load_generator(precision=precision)
    generator.max_prompt_tokens = tokens
    generator.requires_grad_(True)
    generator.train()
    prompts = [f"{i} {PARAGRAPH * (1 + 3 * tokens // 200)}Question {i}: who won?\nAnswer:" for i in range(rows)]
    targets = [ANSWERS[i % len(ANSWERS)] for i in range(rows)]
    assert all(len(ids) == tokens for ids in generator.prompt_ids(prompts)), "a prompt is shorter than TOKENS"
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-6)
    gc.collect()
    baseline = current_rss()
    reset_peak()
    started = time.perf_counter()
    with autocast(generator.device, precision):
        logp, mask = generator.pair_logprobs(prompts, targets)  # (N, T)
    (-logp.sum() / rows).backward()
    forward_backward = peak_rss()
    optimizer.step()
    step = peak_rss()
    config = generator.model.config
    return {
        "rows": rows, "tokens": tokens, "precision": precision, "target_tokens": int(mask.sum(1).max()),
        "seconds": round(time.perf_counter() - started, 1), "baseline": baseline,
        "peak_forward_backward": forward_backward, "peak_step": step,
        "parameters": sum(p.numel() for p in generator.parameters()),
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
        "vocab": config.vocab_size, "attention": getattr(config, "_attn_implementation", None),
    }


def report(results: list[dict]) -> str:
    from jointrag.memory import ANSWER_TOKENS, training_estimate

    head = ("| rows x tokens | precision | s | baseline MiB | +peak fwd+bwd MiB | +peak step MiB | activations MiB "
            "| bytes/(token·layer·hidden) | estimated activations MiB | estimate beyond weights MiB | activations: estimate / measured "
            "| step: estimate / measured |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        estimate = training_estimate(
            parameters=r["parameters"], trainable=r["parameters"], param_bytes=4, precision=r["precision"], sequences=r["rows"],
            tokens=r["tokens"], hidden=r["hidden"], layers=r["layers"], vocab=r["vocab"], lora=False,
        )
        activations = r["peak_forward_backward"] - r["baseline"] - estimate.parts["gradients"]
        unit = r["rows"] * (r["tokens"] + ANSWER_TOKENS) * r["layers"] * r["hidden"]
        increase, beyond = r["peak_step"] - r["baseline"], estimate.total - estimate.parts["weights"]
        lines.append(
            f"| {r['rows']} x {r['tokens']} | {r['precision']} | {r['seconds']} | {r['baseline'] / MIB:,.0f} "
            f"| {(r['peak_forward_backward'] - r['baseline']) / MIB:,.0f} | {increase / MIB:,.0f} | {activations / MIB:,.0f} "
            f"| {activations / unit:.1f} | {estimate.parts['activations'] / MIB:,.0f} | {beyond / MIB:,.0f} "
            f"| {estimate.parts['activations'] / activations:.2f} | {beyond / increase:.2f} |"
        )
    return "\n".join(lines)


def describe(results: list[dict]) -> str:
    first = results[0]
    return (f"# {first['parameters'] / 1e6:.1f}M parameters, {first['layers']} layers, hidden {first['hidden']}, "
            f"{first['heads']} heads, vocabulary {first['vocab']}, attention {first['attention']}, "
            f"answers of up to {max(r['target_tokens'] for r in results)} tokens\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(DEFAULT_POINTS), help="ROWSxTOKENS:PRECISION,... (default: %(default)s)")
    parser.add_argument("--out", default="runs/memory_calibration.json", help="every measurement as JSON")
    parser.add_argument("--report", metavar="JSON", help="print the table of saved measurements (an earlier --out) and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: measure this point, print it as JSON
    args = parser.parse_args()
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(describe(results))
        print(report(results))
        return 0
    if args.one:
        shape, precision = args.one.split(":")
        rows, tokens = map(int, shape.split("x"))
        print(json.dumps(measure(rows, tokens, precision)))
        return 0
    import torch

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    results = []
    for point in args.points.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", point], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            print(f"{point}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{point}: {results[-1]['seconds']} s, peak {results[-1]['peak_step'] / MIB:,.0f} MiB", file=sys.stderr, flush=True)
    if results:
        print(describe(results))
        print(report(results))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if len(results) == len(args.points.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
