"""How noisy is each method's retriever gradient? (`jointrag variance`)

JSA-RAG (Cao et al. 2025, arXiv 2508.18168) argues that top-K marginalisation (RAG) gives a biased
but deterministic gradient, that VRAG's score-function (REINFORCE) estimator has a high variance,
and that JSA's estimator, built on Metropolis independence sampling with q as proposal, has a low
one. This module measures the claim on one model state: the base models of a config, or a trained
checkpoint. Every method runs on the same weights: the posterior tower is added once
(`RAGSystem.add_posterior`, a copy of the prior query tower unless the checkpoint trained one).

Two sources of noise, measured separately for the gradient w.r.t. the prior query tower and, for
VRAG and JSA, w.r.t. the posterior query tower:

- draws: the objective R times on one fixed mini-batch. Only the method's own sampling differs
  between repetitions (dropout is off, `system.eval()`), so RAG-Sequence, RAG-Token and VRAG with
  the exact (enumerate) estimator have zero variance here, and so has VRAG-sample's prior gradient
  (it comes from the exact KL term only).
- batches: the gradient on each of N disjoint mini-batches: the data noise of SGD, plus the
  method's own sampling noise.

For n gradient vectors g_1..g_n (one tower, flattened) the statistics are, with ḡ their mean:
trace of the covariance tr(C) = Σ_i ||g_i - ḡ||² / (n - 1) (the sum over coordinates of the
unbiased variance of one estimate), the squared norm of the mean ||ḡ||², their ratio tr(C)/||ḡ||²
(relative variance, a noise-to-signal ratio; ||ḡ||² itself carries tr(C)/n of noise), and the mean
cosine similarity over pairs of estimates. They are computed in one pass, relative to the first
vector, so identical estimates give exactly zero variance (`GradientMoments`).

The generator is frozen (the retriever gradients do not depend on it and it then needs no
backward pass), and JSA's chain cache is off: every draw starts its chain from its first proposal,
accepted unconditionally (the reference code's behaviour), so repetitions are independent. A frozen
generator in eval mode gives each (prompt, answer) pair one log-likelihood, so it scores each pair
once (`scored_once`), shared by all draws and all methods: the run costs about one generator pass
per distinct pair instead of one per pair per gradient, and the draws differ only by the methods'
sampling, not by how the pairs happened to be batched and padded.
Shapes: B examples per batch, R draws, N batches, P parameters of one tower.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import RunConfig, load_config
from ..data.qa import embedded_examples, load_examples
from ..errors import UserError
from ..generation.generator import Prompt
from ..io import write_json
from ..methods import METHODS, Objective
from ..methods.systems import rag_system
from ..runtime import autocast, resolve_precision
from ..system import RAGSystem
from ..types import Example
from .build import answerable
from .loop import load_trained

TOWERS = ("prior", "posterior")
PHASES = ("draws", "batches")
CHAIN_CACHE = "off: each draw starts its MIS chain from its first proposal, accepted unconditionally"


def dot(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    """a·b of two float32 vectors, accumulated in float64 a chunk at a time (no full-size copy)."""
    return sum(float(a[i : i + chunk].double() @ b[i : i + chunk].double()) for i in range(0, a.numel(), chunk))


class GradientMoments:
    """One-pass statistics of gradient vectors (P,): trace of covariance, mean, pairwise cosine.

    Sums are kept relative to the first vector, so that n identical vectors give a trace of exactly
    0 and a small spread is not lost against a large mean; vectors are float32 (a 22M-parameter
    tower costs 3 of them), dot products are accumulated in float64. The mean pairwise cosine comes
    from the sum of unit vectors U: Σ_{i<j} cos(g_i, g_j) = (||U||² - n) / 2.
    """

    def __init__(self) -> None:
        self.n = 0
        self.first: torch.Tensor | None = None  # g_1, (P,)
        self.shift_sum: torch.Tensor | None = None  # Σ (g_i - g_1), (P,)
        self.shift_sq = 0.0  # Σ ||g_i - g_1||²
        self.unit_sum: torch.Tensor | None = None  # Σ g_i / ||g_i||, (P,)
        self.units = 0  # vectors with a nonzero norm
        self.norms: list[float] = []

    def add(self, gradient: torch.Tensor) -> None:
        g = gradient.detach().reshape(-1).float().cpu()
        if self.first is None:
            self.first = g.clone()
            self.shift_sum = torch.zeros_like(g)
            self.unit_sum = torch.zeros_like(g)
        elif g.numel() != self.first.numel():
            raise ValueError(f"gradient of {g.numel()} values, expected {self.first.numel()}")
        shift = g - self.first
        self.shift_sum += shift
        self.shift_sq += dot(shift, shift)
        del shift
        norm = dot(g, g) ** 0.5
        if norm > 0:
            self.unit_sum.add_(g, alpha=1 / norm)
            self.units += 1
        self.norms.append(norm)
        self.n += 1

    def summary(self) -> dict:
        """trace_cov, mean_sq_norm, relative_variance (None when the mean is 0), mean_cosine, mean_norm, n."""
        if self.n < 2:
            raise ValueError("a variance needs at least two gradients")
        n = self.n
        trace = max(0.0, (self.shift_sq - dot(self.shift_sum, self.shift_sum) / n) / (n - 1))
        # ||g_1 + S/n||² without forming the mean
        mean_sq = dot(self.first, self.first) + 2 * dot(self.first, self.shift_sum) / n + dot(self.shift_sum, self.shift_sum) / n**2
        pairs = self.units * (self.units - 1) / 2
        cosine = (dot(self.unit_sum, self.unit_sum) - self.units) / 2 / pairs if pairs else None
        return {
            "n": n,
            "trace_cov": trace,
            "mean_sq_norm": max(0.0, mean_sq),
            "relative_variance": trace / mean_sq if mean_sq > 0 else None,
            "mean_cosine": None if cosine is None else min(1.0, max(-1.0, cosine)),
            "mean_norm": sum(self.norms) / n,
        }


def labels() -> list[str]:
    """The rows of the comparison, in table order: every method's `Method.variance` rows."""
    return [label for m in METHODS.values() for label, _ in m.variance]


def variance_objectives(config: RunConfig) -> dict[str, Objective]:
    """Each compared row's objective with the run's options (k, tau, M, ...) and the row's settings
    (VRAG's estimator; JSA without chain cache)."""
    objectives = {}
    for m in METHODS.values():
        for label, settings in m.variance:
            variant = copy.deepcopy(config)
            variant.method.name = m.name
            for dotted, value in settings.items():
                section, key = dotted.split(".")
                setattr(getattr(variant, section), key, value)
            objectives[label] = m.build(variant)
    return objectives


def prepare(system: RAGSystem) -> dict[str, list[torch.nn.Parameter]]:
    """Add the posterior tower if missing, turn dropout off, freeze all but the two query towers.

    Returns each tower's parameters, in a fixed order, for flattening the gradients.
    """
    system.add_posterior()
    system.eval()
    system.requires_grad_(False)
    towers = {"prior": list(system.retriever.query_encoder.parameters()), "posterior": list(system.posterior.parameters())}
    for parameters in towers.values():
        for p in parameters:
            p.requires_grad_(True)
    return towers


@contextlib.contextmanager
def scored_once(generator):
    """Within the block, `generator.pair_logprobs` scores each distinct (prompt, target) once.

    Only for a frozen generator: the memo holds values, not autograd graphs. Every scoring path of
    `RAGSystem` (`target_logprobs`, `selected_logprobs`) goes through `pair_logprobs`.
    """
    if any(p.requires_grad for p in generator.parameters()):
        raise ValueError("scored_once needs a frozen generator")
    original = generator.pair_logprobs
    memo: dict[tuple[Prompt, str], torch.Tensor] = {}  # (prompt, target) -> log-probs of its T_i target tokens

    def pair_logprobs(prompts: Sequence[Prompt], targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = list(zip(prompts, targets))
        missing = list(dict.fromkeys(key for key in keys if key not in memo))
        if missing:
            logp, mask = original([p for p, _ in missing], [t for _, t in missing])  # (n, T)
            for key, row, row_mask in zip(missing, logp, mask):
                memo[key] = row[row_mask].detach()
        width = max(memo[key].numel() for key in keys)
        logp = torch.zeros(len(keys), width, device=generator.device)
        mask = torch.zeros(len(keys), width, dtype=torch.bool, device=generator.device)
        for i, key in enumerate(keys):
            values = memo[key]
            logp[i, : values.numel()] = values
            mask[i, : values.numel()] = True
        return logp, mask  # (N, T), padding holds 0 as in Generator.pair_logprobs

    generator.pair_logprobs = pair_logprobs
    try:
        yield memo
    finally:
        del generator.pair_logprobs  # the class's method again


def flat_gradient(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients of `parameters` as one float32 vector (P,); unused parameters count as 0."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu() for p in parameters])


def gradient(
    system: RAGSystem, objective: Objective, batch: Sequence[Example], towers: dict[str, list[torch.nn.Parameter]], precision: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """One estimate of the retriever gradient on `batch`: {tower: (P,)} and the objective's metrics."""
    for parameters in towers.values():
        for p in parameters:
            p.grad = None
    with autocast(system.generator.device, precision):
        output = objective(system, batch)
    if not torch.isfinite(output.loss):
        raise RuntimeError(f"the loss is {output.loss.item()} on examples {[e.id for e in batch]}")
    output.loss.backward()
    names = TOWERS if objective.needs_posterior else TOWERS[:1]
    grads = {name: flat_gradient(towers[name]) for name in names}
    for name, g in grads.items():
        if not torch.isfinite(g).all():
            raise RuntimeError(f"non-finite {name} gradient on examples {[e.id for e in batch]}")
    return grads, output.metrics


def measure(
    system: RAGSystem,
    objectives: dict[str, Objective],
    batches: Sequence[Sequence[Example]],
    *,
    repeats: int,
    precision: str = "fp32",
    progress: bool = True,
) -> tuple[dict, int]:
    """Gradient statistics of every objective: R draws on batches[0], then one draw on each batch.

    Returns ({label: {"draws": {tower: stats}, "batches": {tower: stats}, "metrics": {phase: means}}},
    the number of distinct (prompt, answer) pairs the generator scored);
    towers an objective does not train are absent.
    """
    if repeats < 2 or len(batches) < 2:
        raise ValueError("a variance needs at least 2 draws and 2 batches")
    towers = prepare(system)
    with scored_once(system.generator) as memo:
        results = _measure(system, objectives, batches, towers, repeats, precision, progress)
        pairs = len(memo)
    for parameters in towers.values():
        for p in parameters:
            p.grad = None
    return results, pairs


def _measure(system, objectives, batches, towers, repeats, precision, progress) -> dict:
    results = {}
    bar = tqdm(total=len(objectives) * (repeats + len(batches)), unit="grad", desc="gradient variance",
               dynamic_ncols=True, disable=not progress)
    for label, objective in objectives.items():
        result: dict = {"metrics": {}}
        for phase, plan in (("draws", [batches[0]] * repeats), ("batches", list(batches))):
            bar.set_description(f"{label}: {phase}")
            moments: dict[str, GradientMoments] = {}
            metrics: dict[str, list[float]] = {}
            for batch in plan:
                grads, values = gradient(system, objective, batch, towers, precision)
                for name, g in grads.items():
                    moments.setdefault(name, GradientMoments()).add(g)
                for key, value in values.items():
                    metrics.setdefault(key, []).append(float(value))
                bar.update(1)
            result[phase] = {name: m.summary() for name, m in moments.items()}
            result["metrics"][phase] = {key: float(np.mean(v)) for key, v in metrics.items()}
        results[label] = result
    bar.close()
    return results


def variance_examples(config: RunConfig, examples: int, batch_size: int, batches: int, seed: int) -> list[list[Example]]:
    """N disjoint mini-batches of B from a seeded sample of `examples` dev examples (config.data.dev,
    or the embedded dev split) that have an answer (a gradient needs a target)."""
    where = config.data.dev or "the embedded dev split"
    pool = answerable(load_examples(config.data.dev, config.data.format) if config.data.dev else embedded_examples("dev"), where)
    if examples > len(pool):
        raise UserError(f"--examples {examples}: {where} has only {len(pool)} examples")
    chosen = random.Random(seed).sample(pool, examples)
    return [chosen[i * batch_size : (i + 1) * batch_size] for i in range(batches)]


def run_config(config_path: str | None, checkpoint: str | None, overrides: Sequence[str]) -> RunConfig:
    """Defaults -> YAML -> --set, or the checkpoint's own config -> --set (method, data, train only)."""
    if checkpoint is None:
        return load_config(config_path, overrides)
    if config_path is not None:
        raise UserError("--config and --checkpoint exclude each other: a checkpoint carries its own config")
    fixed = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if fixed:
        raise UserError(f"--set {fixed[0]}: a checkpoint fixes its models; only method.*, data.* and train.* settings apply")
    directory = Path(checkpoint)
    if not (directory / "weights.pt").is_file() or not (directory / "config.yaml").is_file():
        raise UserError(f"{directory} is not a checkpoint (no weights.pt and config.yaml); pass RUN_DIR/checkpoint")
    return load_config(str(directory / "config.yaml"), overrides)


def load_system(config: RunConfig, checkpoint: str | None) -> RAGSystem:
    if checkpoint is not None:
        return load_trained(checkpoint)[1]
    system = rag_system(config)
    system.add_posterior()
    return system


def run_variance(
    config_path: str | None = None,
    *,
    checkpoint: str | None = None,
    overrides: Sequence[str] = (),
    examples: int | None = None,
    batch_size: int = 2,
    repeats: int = 8,
    batches: int = 8,
    out: str | Path = "runs/variance",
    progress: bool = True,
) -> dict:
    """Measure, write `out/variance.json` and `out/variance.png`, and return the report.

    `examples` (default B×N) is the size of the seeded sample of dev examples the N disjoint
    mini-batches of B are taken from; the draws repeat the first mini-batch R times.
    """
    for name, value, least in (("--batch-size", batch_size, 1), ("--repeats", repeats, 2), ("--batches", batches, 2)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}" + (" (a variance needs two estimates)" if least == 2 else ""))
    examples = batch_size * batches if examples is None else examples
    if examples < batch_size * batches:
        raise UserError(f"--examples {examples} is too few for --batches {batches} of --batch-size {batch_size} (needs {batch_size * batches})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    config = run_config(config_path, checkpoint, overrides)
    seed = config.train.seed
    plan = variance_examples(config, examples, batch_size, batches, seed)
    objectives = variance_objectives(config)

    started = time.perf_counter()
    system = load_system(config, checkpoint)
    precision = resolve_precision(config.train.precision, system.generator.device)
    torch.manual_seed(seed)
    results, pairs = measure(system, objectives, plan, repeats=repeats, precision=precision, progress=progress)
    m = config.method
    report = {
        "settings": {
            "checkpoint": str(checkpoint) if checkpoint else None,
            "config": config_path,
            "generator": config.model.generator or "SmolLM2-135M-Instruct",
            "index": str(system.index.directory),
            "data": config.data.dev or "embedded:dev",
            "examples": examples,
            "batch_size": batch_size,
            "repeats": repeats,
            "batches": batches,
            "k": m.k, "tau": m.tau, "reduce": m.reduce, "beta": m.beta, "candidates": m.candidates,
            "proposals": m.proposals, "states": m.states,
            "precision": precision,
            "seed": seed,
            "chain_cache": CHAIN_CACHE,
            "generator_frozen": True,
            "dropout": "off (eval mode)",
            "parameters": {name: sum(p.numel() for p in tower.parameters())
                           for name, tower in (("prior", system.retriever.query_encoder), ("posterior", system.posterior))},
            "draw_batch": [e.id for e in plan[0]],
            "generator_pairs_scored": pairs,
        },
        "methods": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "variance.json", report)
    plot_variance(report, out / "variance.png")
    return report


# --- presentation ---------------------------------------------------------------------------------


def _number(value) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.3e}"


def format_table(report: dict) -> str:
    """The statistics as a plain-text table, one row per (method, tower), with a legend."""
    s = report["settings"]
    header = ["method", "tower"] + [f"{phase}:{column}" for phase in PHASES for column in ("tr(Cov)", "|mean|^2", "ratio", "cos")]
    rows = []
    for label, result in report["methods"].items():
        for tower in TOWERS:
            if tower not in result["draws"]:
                continue
            row = [label, tower]
            for phase in PHASES:
                stats = result[phase][tower]
                cosine = stats["mean_cosine"]
                row += [_number(stats["trace_cov"]), _number(stats["mean_sq_norm"]), _number(stats["relative_variance"]),
                        "-" if cosine is None else f"{cosine:.3f}"]
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    intro = (
        f"retriever gradient variance: {s['repeats']} draws on one batch of {s['batch_size']}, {s['batches']} batches of "
        f"{s['batch_size']} ({s['data']}); k={s['k']} tau={s['tau']} M={s['proposals']} {s['precision']}; "
        f"{'checkpoint ' + s['checkpoint'] if s['checkpoint'] else 'base models'}"
    )
    legend = (
        "tr(Cov): sum over parameters of the variance of one estimate; |mean|^2: squared norm of the mean gradient;\n"
        "ratio: tr(Cov)/|mean|^2 (relative variance); cos: mean cosine between estimates. Generator frozen, dropout off;\n"
        f"JSA chain cache {s['chain_cache']}."
    )
    return "\n".join([intro, "", *lines, "", legend])


def plot_variance(report: dict, path: Path) -> Path:
    """Bar charts (log scale) of tr(Cov) and tr(Cov)/|mean|^2, across draws and across batches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(report["methods"])
    figure = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(figure)
    width = 0.38
    panels = [(phase, key) for key in ("trace_cov", "relative_variance") for phase in PHASES]
    titles = {"trace_cov": "trace of covariance", "relative_variance": "relative variance tr(Cov)/|mean|²",
              "draws": "across draws (one batch)", "batches": "across mini-batches"}
    for i, (phase, key) in enumerate(panels):
        axes = figure.add_subplot(2, 2, i + 1)
        positives = []
        for j, tower in enumerate(TOWERS):
            positions = np.arange(len(labels)) + (j - 0.5) * width
            values = [report["methods"][m][phase].get(tower, {}).get(key) for m in labels]
            shown = [(x, v) for x, v in zip(positions, values) if v is not None and v > 0]
            positives += [v for _, v in shown]
            if shown:
                axes.bar([x for x, _ in shown], [v for _, v in shown], width, label=tower, color=f"C{j}")
            else:
                axes.bar([], [], width, label=tower, color=f"C{j}")
            for x, v in zip(positions, values):
                if v is None or v == 0:
                    axes.annotate("n/a" if v is None else "0", (x, 0.02), xycoords=("data", "axes fraction"),
                                  ha="center", va="bottom", fontsize=8, color=f"C{j}")
        if positives:  # bars start a decade below the smallest, so that bar heights compare honestly
            axes.set_yscale("log")
            axes.set_ylim(10 ** (math.floor(math.log10(min(positives))) - 1), max(positives) * 10)
        axes.set_xticks(np.arange(len(labels)), labels, rotation=20)
        axes.set_xlim(-0.7, len(labels) - 0.3)
        axes.set_title(f"{titles[key]}, {titles[phase]}", fontsize=10)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
