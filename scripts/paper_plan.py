#!/usr/bin/env python3
"""Memory plan and expected hours of the paper-scale recipes (configs/paper/*.yaml), for docs/paper-scale.md.

    .venv/bin/python scripts/paper_plan.py                     # every recipe, H100 80 GB figures
    .venv/bin/python scripts/paper_plan.py --gpu a100 --search-ms 20 configs/paper/nq-jsa-mistral.yaml

Nothing is downloaded or loaded: each recipe is read with `load_config`, the models' sizes come from
their public configurations (`MODELS`), and the memory is added up with jointrag's own planner
(`jointrag.memory.training_estimate`, the estimate the trainer checks before its first step, and
`jointrag.retrieval.index.index_estimate`, the index build's). Its activation term was calibrated on the
CPU (docs/performance.md: bf16 activations 80 bytes per token, layer and hidden unit, against about 34
for a GPT block with flash attention, Korthikanti et al. 2022), so on a GPU it over-states them: a plan
that fits here fits there. The prompt length it counts is `model.max_prompt_tokens`, an upper bound.

The hours are arithmetic on stated assumptions, not measurements (no GPU was lent to the sessions that
wrote this): FLOPs per step from the parameter counts and the average token counts below, divided by
the GPU's dense bf16 peak times an assumed model FLOPs utilisation, plus the CPU search of each query in
the faiss index (`--search-ms`). Change any of them on the command line.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PASSAGES = 21_015_324  # DPR's psgs_w100.tsv


@dataclass(frozen=True)
class Model:
    """A model's public configuration: parameters, width, depth, vocabulary; `kind` causal, seq2seq or encoder."""

    hub: str
    params: int
    hidden: int
    layers: int
    vocab: int
    kind: str
    lora_params: int = 0  # trainable parameters of a rank-8 LoRA on every linear layer (peft's all-linear)


# Mistral-7B LoRA r = 8: per layer 8 x (in + out) of q 4096x4096, k 4096x1024, v 4096x1024, o 4096x4096,
# gate and up 4096x14336, down 14336x4096 = 655,360; x 32 layers
MODELS = {
    "models/bart-large": Model("facebook/bart-large", 406_291_456, 1024, 12, 50265, "seq2seq"),
    "models/dpr-question": Model("sentence-transformers/facebook-dpr-question_encoder-single-nq-base", 109_482_240, 768, 12, 30522, "encoder"),
    "models/dpr-ctx": Model("sentence-transformers/facebook-dpr-ctx_encoder-single-nq-base", 109_482_240, 768, 12, 30522, "encoder"),
    "models/Mistral-7B-v0.1": Model("mistralai/Mistral-7B-v0.1", 7_241_732_096, 4096, 32, 32000, "causal", lora_params=20_971_520),
    "models/bge-large-en-v1.5": Model("BAAI/bge-large-en-v1.5", 335_141_888, 1024, 24, 30522, "encoder"),
}
# the passage tower that built each index of the recipes (docs/paper-scale.md builds them)
INDEX_ENCODERS = {"indexes/psgs_w100-dpr": "models/dpr-ctx", "indexes/psgs_w100-bge": "models/bge-large-en-v1.5"}
GPUS = {"h100": ("H100 SXM 80 GB", 989e12), "a100": ("A100 80 GB", 312e12)}  # dense bf16 peak FLOP/s


def rows_per_example(config) -> tuple[float, float, int]:
    """(generator rows with gradient, rows without, rows the memory plan counts) per training example.
    RAG: K with gradient. VRAG (enumerate over the union of prior and posterior top-K): about 1.5 K distinct
    (an assumption), 2 K at most. JSA: the distinct proposals scored without gradient, then the distinct
    chain states with it: docs/performance.md measured 6.5 and 6.0 at K = 5 with untrained towers (the
    worst case: they fall as q sharpens), 2 K + 1 at most."""
    k, name = config.method.k, config.method.name
    if name in ("rag-sequence", "rag-token"):
        return k, 0, k
    if name == "vrag":
        return 1.5 * k, 0, 2 * k
    if name == "jsa":
        return 1.2 * k, 1.3 * k, 2 * k + 1
    raise SystemExit(f"paper_plan: no row model for method {name}")


def system(config):
    """(generator, [(tower, trainable)]) of a recipe: the query tower, the posterior tower (VRAG, JSA) and
    the frozen passage tower."""
    generator = MODELS[config.model.generator]
    passage = MODELS[INDEX_ENCODERS[config.model.index]]
    query = MODELS[config.model.retriever] if config.model.retriever else passage
    towers = [(query, True), (passage, False)]
    if config.method.name in ("vrag", "jsa"):
        towers.append((query, True))
    return generator, towers


def memory(config, batch: int, shards: int = 1) -> dict:
    """Bytes per GPU of training `config` with `batch` examples per micro-batch; `shards` > 1: FSDP shards
    the generator's weights and training state over that many GPUs (the towers stay whole). Weights as
    jointrag holds them: the generator in bf16 (fp32 masters when it trains fully), LoRA adapters and the
    towers in fp32; gradients and AdamW moments in fp32; activations by `training_estimate`."""
    from jointrag.memory import training_estimate

    generator, towers = system(config)
    lora = config.model.lora
    trained_generator = generator.lora_params if lora else generator.params
    tower_params = sum(t.params for t, _ in towers)
    tower_trained = sum(t.params for t, trains in towers if trains)
    grad_rows, _, planned_rows = rows_per_example(config)
    estimate = training_estimate(
        parameters=generator.params + tower_params, trainable=trained_generator + tower_trained, param_bytes=2,
        precision="bf16", sequences=batch * planned_rows, tokens=config.model.max_prompt_tokens, hidden=generator.hidden,
        layers=generator.layers, vocab=generator.vocab, lora=lora, checkpointing=config.train.checkpointing)
    parts = {
        "weights": (generator.params * 2 + (generator.lora_params * 4 if lora else 0)) / shards + tower_params * 4,
        "master weights": 0 if lora else generator.params * 4 / shards,
        "gradients": trained_generator * 4 / shards + tower_trained * 4,
        "AdamW state": trained_generator * 8 / shards + tower_trained * 8,
        "activations": estimate.parts["activations"],
    }
    # what the trainer's own check adds up (model_training_estimate): every weight at the widest dtype held
    # (the fp32 towers'), no masters then, and it compares the part beyond the loaded weights with free memory
    check = training_estimate(  # under FSDP it counts the shard each process holds
        parameters=generator.params / shards + tower_params, trainable=trained_generator / shards + tower_trained, param_bytes=4,
        precision="bf16", sequences=batch * config.method.k, tokens=config.model.max_prompt_tokens, hidden=generator.hidden,
        layers=generator.layers, vocab=generator.vocab, lora=lora, checkpointing=config.train.checkpointing)
    return {"parts": parts, "total": sum(parts.values()), "rows": batch * planned_rows,
            "check_beyond_weights": check.total - check.parts["weights"]}


def step_seconds(config, gpus: int, batch: int, accumulate: int, args) -> float:
    """Seconds per optimiser step with `gpus` GPUs of `batch` examples per micro-batch and `accumulate`
    micro-batches per step."""
    generator, _ = system(config)
    grad_rows, nograd_rows, _ = rows_per_example(config)
    prompt = args.prompt_tokens_mistral if generator.kind == "causal" else args.prompt_tokens_bart
    tokens = prompt + args.answer_tokens
    # forward FLOPs per row: 2 x parameters x tokens; a seq2seq model's encoder (half the parameters) reads
    # the prompt and its decoder (the other half) the answer
    forward = generator.params * tokens if generator.kind == "seq2seq" else 2 * generator.params * tokens
    with_grad = (2 if config.model.lora else 3) + (1 if config.train.checkpointing else 0)  # LoRA: no weight gradients
    per_example = forward * (grad_rows * with_grad + nograd_rows)
    mfu = args.mfu_large if generator.params > 2e9 else args.mfu_small
    compute = batch * accumulate * per_example / (GPUS[args.gpu][1] * mfu)
    searches = 2 if config.method.name in ("vrag", "jsa") else 1  # the prior's, and the posterior's
    return compute + batch * accumulate * searches * args.search_ms / 1000


def layouts(config) -> list[tuple[int, int, int, int, str]]:
    """(GPUs, batch per micro-batch, micro-batches per step, FSDP shards, label) of each plan. The BART
    recipes mean 64 questions a step (8 processes of 8, as the RAG authors' script); the Mistral ones the
    JSA-RAG paper's 4: one GPU takes them at once, eight take 1 each (8 a step, half the steps)."""
    fsdp = config.method.name in ("rag-sequence", "rag-token") or (config.method.name == "vrag" and config.method.estimator == "enumerate")
    b = config.train.batch_size
    if MODELS[config.model.generator].kind == "causal":
        plans = [(1, b, 1, 1, "1"), (8, 1, 1, 1, "8 (DDP)")] + ([(8, 1, 1, 8, "8 (FSDP)")] if fsdp else [])
    else:
        plans = [(1, b, 8, 1, "1"), (8, b, 1, 1, "8 (DDP)")] + ([(8, b, 1, 8, "8 (FSDP)")] if fsdp else [])
    return plans


def recipe_examples(config) -> int:
    """Questions per step the recipe's train.steps were counted with."""
    return config.train.batch_size * (1 if MODELS[config.model.generator].kind == "causal" else 8)


def index_plan(encoder_key: str, gpus: int, args) -> dict:
    from jointrag.retrieval.index import FaissIndex, index_estimate

    encoder = MODELS[encoder_key]
    params = FaissIndex.default_params("ivfpq", PASSAGES, encoder.hidden)
    parts = index_estimate("ivfpq", PASSAGES, encoder.hidden, params).parts
    flops = PASSAGES * 2 * encoder.params * args.passage_tokens
    return {"encoder": encoder.hub, "dim": encoder.hidden, "params": params, "embeddings": PASSAGES * encoder.hidden * 4,
            "kept": parts["codes and ids"] + parts["centroids"],
            "build": sum(parts.values()), "encode_hours": flops / (gpus * GPUS[args.gpu][1] * args.mfu_encoder) / 3600}


def gib(size: float) -> str:
    return f"{size / GIB:,.1f}"


def report(paths: list[str], args) -> str:
    from jointrag.config import load_config

    name, _ = GPUS[args.gpu]
    out = [f"GPU: {name}; dense bf16 peak {GPUS[args.gpu][1] / 1e12:,.0f} TFLOP/s; assumed utilisation "
           f"{args.mfu_small:.0%} (models under 2B parameters), {args.mfu_large:.0%} (7B); CPU search "
           f"{args.search_ms:g} ms a query; average prompt {args.prompt_tokens_bart} tokens (BART), "
           f"{args.prompt_tokens_mistral} (Mistral), answer {args.answer_tokens}.", ""]
    out += ["| recipe | GPUs | batch per GPU x accumulation | generator rows per micro-batch | weights | masters | gradients | AdamW | activations | total GiB | of 80 GB | trainer's check beyond weights | s/step | steps | hours |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        config = load_config(path)
        for gpus, batch, accumulate, shards, label in layouts(config):
            m = memory(config, batch, shards)
            p = m["parts"]
            seconds = step_seconds(config, gpus, batch, accumulate, args)
            steps = math.ceil(config.train.steps * recipe_examples(config) / (gpus * batch * accumulate))
            out.append(f"| {Path(path).stem} | {label} | {batch} x {accumulate} | {m['rows']} | {gib(p['weights'])} | "
                       f"{gib(p['master weights'])} | {gib(p['gradients'])} | {gib(p['AdamW state'])} | {gib(p['activations'])} | "
                       f"{gib(m['total'])} | {m['total'] / 80e9:.0%} | {gib(m['check_beyond_weights'])} | {seconds:.2f} | "
                       f"{steps:,} | {steps * seconds / 3600:.1f} |")
    out += ["", "| index | dimension | nlist / m / nprobe | embeddings.npy GiB | kept in RAM per process GiB | build peak GiB | encoding hours, 1 GPU | 8 GPUs |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for index, encoder in INDEX_ENCODERS.items():
        one, eight = index_plan(encoder, 1, args), index_plan(encoder, 8, args)
        q = one["params"]
        out.append(f"| {index} ({one['encoder']}) | {one['dim']} | {q['nlist']} / {q['m']} / {q['nprobe']} | {gib(one['embeddings'])} | "
                   f"{gib(one['kept'])} | {gib(one['build'])} | {one['encode_hours']:.2f} | {eight['encode_hours']:.2f} |")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("recipes", nargs="*", help="recipes (default: configs/paper/*.yaml)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--mfu-small", type=float, default=0.20, help="utilisation for BART-large and BERT-sized models (default 0.20)")
    p.add_argument("--mfu-large", type=float, default=0.35, help="utilisation for the 7B generator (default 0.35)")
    p.add_argument("--mfu-encoder", type=float, default=0.30, help="utilisation while encoding the corpus (default 0.30)")
    p.add_argument("--search-ms", type=float, default=10.0, help="CPU milliseconds per query of IVF-PQ search and re-ranking (default 10)")
    p.add_argument("--prompt-tokens-bart", type=int, default=150, help="average prompt tokens, BART (default 150: a 100-word passage, title, question)")
    p.add_argument("--prompt-tokens-mistral", type=int, default=200, help="average prompt tokens, Mistral (default 200, with the instruction)")
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--passage-tokens", type=int, default=150, help="tokens per passage when encoding the corpus (default 150)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = args.recipes or sorted(glob.glob(str(ROOT / "configs" / "paper" / "*.yaml")))
    print(report(paths, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
