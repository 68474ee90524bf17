"""Roofline: our training step against the machine's own GEMM throughput at the generator's shapes.

Run from the repository root (it loads the real default models unless `--generator` names another):

    .venv/bin/python benchmarks/bench_roofline.py [--config configs/demo.yaml] [--methods rag-sequence,rag-token,jsa]
                                                  [--generator ID_OR_DIR] [--steps 4] [--warmup 2]
                                                  [--threads N] [--out runs/bench/roofline.json]

Part 1 (the limit): bf16 and fp32 `torch.matmul` at every weight shape of the generator's decoder
layers (attention q/k/v/o, MLP gate/up/down), each in the three products of a training step (forward
X W^T, input gradient dY W, weight gradient dY^T X) over `--gemm-rows` tokens. The "mix" figure is
their total FLOPs over their total time, weighted as one layer runs them: the best a step could do
if it were nothing but its matrix products. The single shape the issue quoted (2048x576 @ 576x1536)
is printed too.

Part 2 (our step): each method in its own child process (so peak memory is its own) builds the
trainer from `--config` exactly as `jointrag train` does (method, K, M, batch, precision), with
`method.name` set per method, runs `--warmup` untimed steps and then `--steps` timed ones
(`Trainer.train_step`: retrieval, prompts, forward, backward, clipping, AdamW, master-weight copy).
A forward hook on the generator counts what each step puts through it.

FLOPs (the formula): for every generator forward pass over sequences of real (unpadded) lengths s_i,
    fwd = 2 N sum(s_i) + 4 L d sum(s_i^2)
with N the generator's non-embedding parameters, L its layers, d its hidden size (the second term is
attention's QK^T and AV). A pass with gradients counts 3 fwd (forward, input and weight gradients), a
pass without (JSA's and VRAG's scoring of proposals) 1 fwd. Padding, the vocabulary projection of the
answer positions, the query tower (MiniLM, 22M parameters over questions of ~15 tokens) and the
optimiser are not counted: achieved FLOP/s is useful work per second. Peak memory is the child's
VmHWM (resident high-water mark), models and index included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_retrieval import cpu_model
from bench_scale import memory

METHODS = ("rag-sequence", "rag-token", "jsa")
GOAL_FRACTION = 0.40
GOAL_JSA_RATIO = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="the training recipe whose shapes are timed")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--generator", help="a Hugging Face id or directory instead of the default generator")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first step is slow once)")
    parser.add_argument("--gemm-rows", type=int, default=2048, help="tokens per GEMM (rows of X)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/roofline.json"))
    return parser.parse_args(argv)


def overrides(args, method: str, out: str) -> list[str]:
    extra = [f"model.generator={args.generator}"] if args.generator else []
    return [f"method.name={method}", f"out={out}", "train.eval_every=0", *extra, *args.set]


# --- part 1: the machine's GEMM throughput ------------------------------------------------------------------


def layer_shapes(config) -> dict[str, tuple[int, int, int]]:
    """(input features, output features, count per layer) of a decoder layer's weight matrices."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or d // heads)
    f = config.intermediate_size
    return {"q, o": (d, d, 2), "k, v": (d, kv, 2), "gate, up": (d, f, 2), "down": (f, d, 1)}


def time_matmul(a, b, seconds: float = 0.5) -> float:
    import torch

    for _ in range(3):
        torch.matmul(a, b)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
        torch.matmul(a, b)
        runs += 1
    return elapsed / runs


def bench_gemm(shapes_of_layer: dict, rows: int) -> dict:
    """bf16 and fp32 FLOP/s per shape and product, and their mix as a training step weights them."""
    import torch

    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        shapes, flops, seconds = [], 0.0, 0.0
        for label, (n_in, n_out, count) in shapes_of_layer.items():
            x, w, dy = (torch.randn(*s, dtype=dtype) for s in ((rows, n_in), (n_out, n_in), (rows, n_out)))
            for product, (a, b) in {"forward": (x, w.t()), "input grad": (dy, w), "weight grad": (dy.t(), x)}.items():
                t = time_matmul(a, b)
                f = 2 * rows * n_in * n_out
                shapes.append({"weights": label, "shape": f"{n_out}x{n_in}", "product": product, "tflops": f / t / 1e12})
                flops += count * f
                seconds += count * t
        x, w = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        headline = 2 * 2048 * 576 * 1536 / time_matmul(x, w) / 1e12
        result[name] = {"mix_tflops": flops / seconds / 1e12, "headline_tflops": headline, "shapes": shapes}
    return result


# --- part 2: our training step (child process) --------------------------------------------------------------


def child(args) -> None:
    """Time `--steps` steps of one method; print its report as JSON on the last line."""
    import torch

    from jointrag.config import load_config
    from jointrag.runtime import autocast
    from jointrag.train.loop import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config(args.config, overrides(args, args.child, out)))
        model = trainer.system.generator.model
        config = model.config
        embedding = model.get_input_embeddings().weight.numel()
        n = sum(p.numel() for p in model.parameters()) - embedding
        n -= 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
        layers, d = config.num_hidden_layers, config.hidden_size
        counted = {"flops": 0.0, "tokens": 0, "padded": 0}

        def count(_module, _args, kwargs):
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            lengths = mask.sum(-1).double() if mask is not None else torch.full((ids.shape[0],), float(ids.shape[1]))
            forward = 2 * n * lengths.sum().item() + 4 * layers * d * (lengths**2).sum().item()
            counted["flops"] += forward * (3 if torch.is_grad_enabled() else 1)
            counted["tokens"] += int(lengths.sum().item())
            counted["padded"] += (mask if mask is not None else ids).numel()

        model.register_forward_pre_hook(count, with_kwargs=True)
        with autocast(trainer.system.generator.device, trainer.precision):
            trainer.objective.prepare(trainer.system, trainer.upcoming())
        trainer.system.train()
        rss_ready = memory()["VmRSS"]
        steps = []
        for i in range(args.warmup + args.steps):
            counted.update(flops=0.0, tokens=0, padded=0)
            seconds = trainer.train_step()["sec_per_step"]
            print(f"{args.child}: step {i + 1} {seconds:.2f} s{' (warm-up)' if i < args.warmup else ''}", file=sys.stderr, flush=True)
            if i >= args.warmup:
                steps.append({"seconds": seconds, **counted})
    report = {
        "method": args.child, "generator": trainer.system.generator.name, "precision": trainer.precision,
        "k": trainer.config.method.k, "batch_size": trainer.config.train.batch_size, "grad_accum": trainer.config.train.grad_accum,
        "non_embedding_params": n, "layer_shapes": layer_shapes(config), "steps": steps, "rss_ready": rss_ready, "peak_rss": memory()["VmHWM"],
    }
    print(json.dumps(report))


def run_child(args, method: str) -> dict:
    command = [sys.executable, __file__, "--child", method, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += (["--generator", args.generator] if args.generator else []) + [x for s in args.set for x in ("--set", s)]
    print(f"--- {method}: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{method}: the child failed with exit status {done.returncode}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    median = statistics.median(s["seconds"] for s in report["steps"])
    flops = statistics.median(s["flops"] for s in report["steps"])
    tokens = statistics.median(s["tokens"] for s in report["steps"])
    padded = statistics.median(s["padded"] for s in report["steps"])
    report.update(seconds=median, tflops=flops / median / 1e12, tokens_per_s=tokens / median, padding=1 - tokens / padded)
    return report


# --- report -------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    gemm = report["gemm"]
    limit = gemm["bfloat16"]["mix_tflops"]
    lines = [
        f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads, torch {report['machine']['torch']}; "
        f"recipe {report['config']}, generator {report['generator']}.",
        "",
        "| GEMM at the generator's shapes | bf16 TFLOP/s | fp32 TFLOP/s |",
        "|---|---:|---:|",
        f"| training mix (forward, input and weight gradients, {report['gemm_rows']} rows) | "
        f"{gemm['bfloat16']['mix_tflops']:.3f} | {gemm['float32']['mix_tflops']:.3f} |",
        f"| 2048x576 @ 576x1536 | {gemm['bfloat16']['headline_tflops']:.3f} | {gemm['float32']['headline_tflops']:.3f} |",
        "",
        "| method | precision | K | batch | s/step | generator tokens/step | padding | tokens/s | TFLOP/s | of the bf16 mix | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["methods"]:
        tokens = statistics.median(s["tokens"] for s in m["steps"])
        lines.append(
            f"| {m['method']} | {m['precision']} | {m['k']} | {m['batch_size']}x{m['grad_accum']} | {m['seconds']:.2f} | {tokens:,.0f} "
            f"| {m['padding']:.0%} | {m['tokens_per_s']:,.0f} | {m['tflops']:.3f} | {m['tflops'] / limit:.0%} | {m['peak_rss'] / 2**20:,.0f} |"
        )
    by = {m["method"]: m for m in report["methods"]}
    if "jsa" in by and "rag-sequence" in by:
        lines += ["", f"JSA step / RAG-Sequence step at the same K: {by['jsa']['seconds'] / by['rag-sequence']['seconds']:.2f}x "
                  f"(goal <= {GOAL_JSA_RATIO})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    methods = [run_child(args, method) for method in args.methods.split(",")]
    print("--- GEMM at the generator's shapes", file=sys.stderr, flush=True)
    report = {
        "machine": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
        "config": args.config, "generator": methods[0]["generator"], "gemm_rows": args.gemm_rows,
        "gemm": bench_gemm(methods[0]["layer_shapes"], args.gemm_rows), "methods": methods,
    }
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
