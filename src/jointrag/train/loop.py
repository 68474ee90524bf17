"""The one training loop every method runs.

Gradient accumulation, mixed precision, clipping, separate learning rates for retriever, generator
and BGM's bridge, the schedule, evaluation, checkpoint/resume and index refresh are written once here; a
method is only its objective (`objectives/`). A checkpoint holds the trained weights, the optimiser,
the scheduler, every RNG state, the data position, the objective's state (JSA's chain cache) and the
index in use, so a resumed run continues the same trajectory. It is written to a temporary
directory and swapped in, so a failed run leaves the previous checkpoint intact.

Under `torchrun` (see `distributed.py`) `train.batch_size` is per rank: the sampler draws the global
batch of batch_size x world_size and each rank takes its slice, so N ranks take the steps one process
takes with N times the batch (the same losses wherever the objective draws no random numbers).
Gradients and logged metrics are averaged over ranks; rank 0 alone evaluates, rebuilds the index and
writes metrics, TensorBoard, plots and checkpoints. The data position is global and the objective's
per-example state is kept whole on every rank, so a checkpoint resumes on any number of ranks.

`train.fsdp` shards the generator over the ranks (FSDP2, `distributed.shard_module`) instead of
replicating it; the query and posterior towers keep the gradient all-reduce. A sharded generator's
forward is collective, so every rank must run it equally often: FSDP serves the methods that score
all K candidates in one pass per micro-batch (`FSDP_METHODS`; not JSA or VRAG's sampled estimator,
whose passes depend on what each rank drew), and every rank evaluates (rank 0 records). Checkpoints
gather the whole weights and optimiser state, so they are the ones an unsharded run writes. In one
process `train.fsdp` has nothing to shard and is ignored, with a notice.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from .. import metrics as qa_metrics
from ..config import RunConfig, load_config, save_config
from ..errors import UserError
from ..evaluation.evaluate import evaluate
from ..io import read_tensors
from ..memory import check_training_memory
from ..methods import METHODS
from ..methods._base import CHECKPOINT
from ..methods.bgm_bridge import BridgeSystem, bridge_answers, score_bridged
from ..retrieval.index import RetrievalIndex, build_index
from ..retrieval.resolve import resolve_index
from ..runtime import autocast, release_freed_memory, resolve_precision
from ..system import load_weights
from ..types import Example
from .build import checkpoint_activations, entry, examples_from, objective_from, set_trainable, system_for
from .log import RunLog
from .precision import MasterWeights


class Sampler:
    """Examples in a fresh seeded permutation per epoch; its position is part of a checkpoint."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed = examples, seed
        self.epoch, self.offset = 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self, size: int) -> list[Example]:
        batch = []
        while len(batch) < size:
            order = self._order()
            take = order[self.offset : self.offset + size - len(batch)]
            batch += [self.examples[i] for i in take]
            self.offset += len(take)
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def parse_refresh(schedule: str) -> list[tuple[int, int | None, int]]:
    """'0-1000:500,1000-:2000' -> [(0, 1000, 500), (1000, None, 2000)]: re-index every N steps in [start, end)."""
    spans = []
    for part in schedule.split(","):
        try:
            window, every = part.split(":")
            start, end = window.split("-")
            spans.append((int(start), int(end) if end else None, int(every)))
        except ValueError:
            raise UserError(f"model.refresh: '{part}' is not 'start-end:every' (e.g. 0-1000:500,1000-:2000)") from None
        if spans[-1][2] <= 0:
            raise UserError(f"model.refresh: '{part}': the interval must be positive")
    return spans


def refresh_due(spans: list[tuple[int, int | None, int]], step: int) -> bool:
    return any(start <= step and (end is None or step < end) and (step - start) % every == 0 and step > 0
               for start, end, every in spans)


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values (`io.read_tensors` loads them back)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_weights(system, masters: MasterWeights) -> dict:
    """The trained parameters at full precision (their masters), whole (collective when FSDP shards
    some: every rank calls it)."""
    return {name: distributed.gathered(masters.master(p)).detach().cpu() for name, p in system.named_parameters() if p.requires_grad}


def evaluate_system(system, config: RunConfig, examples: list[Example]) -> tuple[list[dict], dict]:
    """Predictions and metrics of `system` on `examples` with the run's evaluation settings; a BGM
    system answers through its bridge (`eval.num_beams`: the bridge's beams) from the top `eval.k`."""
    c = config.eval
    if isinstance(system, BridgeSystem):
        result = bridge_answers(system, examples, k=c.k, num_beams=c.num_beams, max_new_tokens=c.max_new_tokens,
                                batch_size=c.batch_size)
        return score_bridged(examples, result)
    return evaluate(
        system.index, system.generator, examples, k=c.k, template=system.template, batch_size=c.batch_size,
        max_new_tokens=c.max_new_tokens, num_beams=c.num_beams, decoder=c.decode, tau=config.method.tau,
    )


def gold_recall(index: RetrievalIndex, rows: np.ndarray, examples: list[Example], k: int) -> float:
    """Gold recall@k (%) of the corpus rows (B, >= k) retrieved for `examples`."""
    ids = [[p.id for p in ps if p is not None] for ps in index.passages(rows)]
    return 100 * qa_metrics.mean([qa_metrics.gold_recall_at_k(i, e.gold_ids, k) for i, e in zip(ids, examples)])


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's, or a campaign's deadline) while training: the first asks
    the loop to finish the step in progress, save a checkpoint and stop, so that `--resume` loses
    nothing; a second stops at once (KeyboardInterrupt), keeping the last checkpoint. Under torchrun
    every rank stops at the first step at which any rank was asked to. Only the main thread can take
    signals: training started from another thread stops as before."""

    def __init__(self):
        self.signal: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\njointrag: {self.signal}: saving a checkpoint after this step, then stopping (send it again to stop "
              "at once, keeping the last checkpoint)", file=sys.stderr, flush=True)

    def due(self) -> bool:
        asked = self.signal is not None
        return any(distributed.all_gather(asked)) if distributed.world_size() > 1 else asked


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.out = Path(config.out)
        method = entry(config)
        if distributed.world_size() > 1 and not method.distributed:
            runs = ", ".join(m.name for m in METHODS.values() if m.distributed)
            raise UserError(f"method '{method.name}' trains in one process; torchrun runs {runs}")
        self.fsdp = config.train.fsdp and distributed.world_size() > 1
        if self.fsdp and not method.fsdp(config):
            raise UserError(f"train.fsdp: every rank must run the sharded generator equally often, which '{method.name}' "
                            "with these settings does not (of VRAG's estimators, enumerate does); train it without FSDP")
        if config.train.fsdp and not self.fsdp:
            print("jointrag: train.fsdp has no effect in one process: the generator trains unsharded", file=sys.stderr)
        _seed(config.train.seed)
        self.objective = objective_from(config)
        if config.train.checkpointing and "generator" not in self.objective.trains:  # before the models load
            raise UserError(f"train.checkpointing: {config.method.name} does not train the generator, whose layers it checkpoints")
        self.system = system_for(config, self.objective)
        set_trainable(self.system, self.objective.trains, passage_tower=config.model.train_passage_tower)
        if config.train.checkpointing:
            checkpoint_activations(self.system)
        distributed.broadcast_parameters([p for p in self.system.parameters() if p.requires_grad])  # start alike
        if self.fsdp:  # before the memory check and the optimiser; FSDP shards fp32 weights (bf16 runs under autocast)
            self.system.generator.model.float()
            self.sharded_generator = distributed.shard_module(self.system.generator.model)
        self.train_examples, self.dev_examples = examples_from(config, self.system.index.corpus)
        self.sampler = Sampler(self.train_examples, config.train.seed)
        self.precision = resolve_precision(config.train.precision, self.system.generator.device)
        # sequences a training example puts through the model, and their tokens: K prompts, unless the objective says
        per_example, tokens = self.objective.footprint(self.system) if hasattr(self.objective, "footprint") else (None, None)
        check_training_memory(self.system, batch_size=config.train.batch_size, k=per_example or config.method.k,
                              tokens=tokens or config.model.max_prompt_tokens, precision=self.precision,
                              checkpointing=config.train.checkpointing)
        rates = {"generator": config.train.lr_generator, "retriever": config.train.lr_retriever, "bridge": config.train.lr_bridge}

        # a parameter belongs to the generator or the bridge if that part owns it and trains, else to the
        # retriever (query, posterior and passage towers); parts may share a base model (Invar-RAG)
        owners = {name: {id(p) for p in getattr(self.system, name).parameters()}
                  for name in ("generator", "bridge") if name in self.objective.trains}

        def part(parameter) -> str:
            return next((name for name, ids in owners.items() if id(parameter) in ids), "retriever")

        trainable = [p for p in self.system.parameters() if p.requires_grad]
        self.masters = MasterWeights(trainable)  # the optimiser steps fp32 masters of the bf16 weights
        groups = [{"params": [self.masters.master(p) for p in trainable if part(p) == group], "lr": lr, "name": group}
                  for group, lr in rates.items()]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.train.weight_decay, fused=True)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if distributed.rank():  # the ranks start alike, then sample independently
            _seed(config.train.seed + distributed.rank())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.train.schedule, config.train.warmup_steps, config.train.steps)
        )
        self.refresh = parse_refresh(config.model.refresh) if config.model.train_passage_tower else []
        self.refreshes = 0
        self.step = 0

    # checkpoints

    def save(self) -> None:
        """Rank 0 writes the checkpoint (every rank's RNG state included) while the others wait; under
        FSDP every rank first takes part in gathering the whole weights and optimiser state."""
        rng = distributed.all_gather(_rng_state())
        if self.fsdp or distributed.is_main():
            weights, optimizer = trained_weights(self.system, self.masters), distributed.gathered(self.optimizer.state_dict())
        if distributed.is_main():
            self._write_checkpoint(rng, weights, optimizer)
        distributed.barrier()

    def _write_checkpoint(self, rng: list[dict], weights: dict, optimizer: dict) -> None:
        target, tmp = self.out / CHECKPOINT, self.out / f"{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(weights, tmp / "weights.pt")
        torch.save({
            "step": self.step,
            "precision": self.precision,  # `train.run.check_precision` compares it on --resume
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "sampler": self.sampler.state_dict(),
            "objective": self.objective.state_dict(),
            "index": {"directory": str(self.system.index.directory.resolve()), "refreshes": self.refreshes,
                      "corpus": self.system.index.manifest["corpus"]["fingerprint"],
                      "encoder": (self.system.index.manifest["encoder"] or {}).get("fingerprint")},  # None for BM25
        }, tmp / "trainer.pt")
        save_config(self.config, tmp / "config.yaml")
        if target.exists():
            old = self.out / f"{CHECKPOINT}.old"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)

    def resume(self) -> None:
        directory = self.out / CHECKPOINT
        parameters = dict(self.system.named_parameters())
        weights = read_tensors(directory / "weights.pt")  # whole tensors: cut them as FSDP cut ours
        weights = {name: distributed.shard_like(w, parameters.get(name)) for name, w in weights.items()}
        load_weights(self.system, weights, directory)
        self.masters.load(parameters, weights)
        state = read_tensors(directory / "trainer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        distributed.shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        # the optimiser state holds the rates of the saved run's schedule, which depends on train.steps;
        # a resumed run may extend it, so set this step's rates from the schedule of this run
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.sampler.load_state_dict(state["sampler"])
        self.objective.load_state_dict(state["objective"])
        self.step, self.refreshes = state["step"], state["index"]["refreshes"]
        if Path(state["index"]["directory"]) != self.system.index.directory.resolve():
            self.system.index = RetrievalIndex.open(state["index"]["directory"], self.system.index.retriever,
                                                    built_by=state["index"].get("encoder"))
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older checkpoints: one process's
        if distributed.rank() < len(rng):
            _set_rng_state(rng[distributed.rank()])
        else:  # a rank the saved run did not have
            _seed(self.config.train.seed + distributed.rank() + self.step)

    # index refresh (only when the passage tower trains)

    def refresh_index(self) -> dict:
        """Rank 0 re-encodes the corpus into the run's index while the other ranks wait, then they open it."""
        values = self._rebuild_index() if distributed.is_main() else {}
        distributed.barrier()
        if not distributed.is_main():
            self.system.index = RetrievalIndex.open(self.out / "index", self.system.retriever)
        self.refreshes += 1
        return values

    def _rebuild_index(self) -> dict:
        """Re-encode the corpus with the current passage tower into the run's index; report staleness:
        gold recall@k on a probe of dev questions with the stale index minus with the fresh one."""
        old = self.system.index
        probe = [e for e in self.dev_examples if e.gold_ids][: self.config.model.staleness_probe]
        k = self.config.eval.k

        def recall(index) -> float:
            return gold_recall(index, index.search([e.question for e in probe], k)[1], probe, k) if probe else float("nan")

        self.system.eval()
        stale = recall(old)
        passages = (p for batch in old.corpus.iter_batches(4096) for p in batch)
        fresh_index = build_index(passages, self.out / "index", retriever=self.system.retriever, kind=old.kind,
                                  params=old.manifest.get("params", {}), source=old.manifest.get("source"))
        fresh = recall(fresh_index)
        self.system.train()
        self.system.index = fresh_index
        return {f"stale_recall@{k}": stale, f"fresh_recall@{k}": fresh, "staleness": stale - fresh}

    # evaluation

    def evaluate(self) -> dict:
        """Dev metrics, computed by rank 0 while the other ranks wait (they get {}); under FSDP every rank
        computes them alike, since a sharded generator's forward needs every rank."""
        values = {}
        if distributed.is_main() or self.fsdp:
            if self.fsdp:  # the root's weights (embeddings, head) whole until the next backward: an
                self.sharded_generator.unshard()  # encoder-decoder's generate() runs its encoder outside the root's forward
            self.system.eval()
            _, result = evaluate_system(self.system, self.config, self.dev_examples)
            if getattr(self.system, "posterior", None) is not None:
                result.update(self.posterior_recall())
            self.system.train()
            values = {key: value for key, value in result.items() if isinstance(value, float) or key == "examples"} \
                if distributed.is_main() else {}
        distributed.barrier()
        return values

    def posterior_recall(self) -> dict[str, float]:
        """Gold recall@1 and @k (eval.k) of the posterior retriever q(z|x,y), searched with each dev
        question and its first answer, beside the prior's gold recall of the same evaluation: the
        curves of both show whether the posterior finds the gold passage more often than the prior and
        how the prior closes the gap (methods.md section 2). Questions without gold passages or an
        answer are left out."""
        probe = [e for e in self.dev_examples if e.gold_ids and e.answers and e.answers[0]]
        if not probe:
            return {}
        k = self.config.eval.k
        rows = self.system.search_posterior([e.question for e in probe], [e.answers[0] for e in probe], k)
        return {f"posterior_gold_recall@{n}": gold_recall(self.system.index, rows, probe, n) for n in sorted({1, k})}

    def upcoming(self) -> list[Example]:
        """The examples the rest of the run will draw, in order (a copy of the sampler runs ahead)."""
        c = self.config.train
        ahead = Sampler(self.train_examples, c.seed)
        ahead.load_state_dict(self.sampler.state_dict())
        return ahead.next((c.steps - self.step) * c.grad_accum * c.batch_size * distributed.world_size())

    # the loop

    def train_step(self) -> dict[str, float]:
        """One optimiser step over `train.grad_accum` micro-batches; its metrics (micro-batch means),
        gradient norm and seconds."""
        c = self.config.train
        started = time.perf_counter()
        metrics: dict[str, list[float]] = {}
        for _ in range(c.grad_accum):
            batch = distributed.shard(self.sampler.next(c.batch_size * distributed.world_size()))
            with autocast(self.system.generator.device, self.precision):
                output = self.objective(self.system, batch)
            distributed.share_example_state(self.objective, [e.id for e in batch])
            if not torch.isfinite(output.loss):
                raise UserError(f"step {self.step + 1}: the loss is {output.loss.item()} (try a lower learning rate or "
                                f"train.precision=fp32); the last checkpoint and the metrics logged so far are intact")
            (output.loss / c.grad_accum).backward()
            for key, value in output.metrics.items():
                metrics.setdefault(key, []).append(value)
        self.masters.gradients_to_masters()
        distributed.average_gradients(self.parameters)
        norm = distributed.clip_grad_norm(self.parameters, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.masters.masters_to_model()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        release_freed_memory()
        self.step += 1
        return {**{key: float(np.mean(v)) for key, v in metrics.items()}, "grad_norm": norm.item(),
                "sec_per_step": time.perf_counter() - started}

    def run(self, resume: bool = False) -> dict:
        c = self.config.train
        checkpoint = self.out / CHECKPOINT
        if resume:
            if not checkpoint.is_dir():
                raise UserError(f"--resume: no checkpoint in {self.out}")
            self.resume()
        elif checkpoint.exists():
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        main = distributed.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out / "config.yaml")
            log = RunLog(self.out, self.step if resume else None)

        def record(split: str, values: dict) -> None:
            if main:
                log.record(self.step, split, values)

        with autocast(self.system.generator.device, self.precision):
            self.objective.prepare(self.system, self.upcoming())
        if self.step == 0 and c.eval_every:
            record("eval", self.evaluate())
        self.system.train()
        pending: dict[str, list[float]] = {}
        # the bar is closed on errors too, so an error message never lands on the bar's line
        where = f"{self.system.generator.device}, {self.precision}"  # say what `auto` chose
        bar = tqdm(total=c.steps, initial=self.step, unit="step", desc=f"training {self.config.method.name} ({where})",
                   dynamic_ncols=True, disable=not main)
        with bar, StopRequest() as stop:
            while self.step < c.steps:
                try:
                    step_metrics = self.train_step()
                except UserError:  # a non-finite loss: first log this rank's steps since the last row (no collective:
                    if pending:   # another rank may not have failed)
                        record("train", {key: float(np.mean(v)) for key, v in pending.items()})
                    raise
                for key, value in step_metrics.items():
                    pending.setdefault(key, []).append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(pending['loss']):.3f}")
                stopping = self.step < c.steps and stop.due()
                if self.step % c.log_every == 0 or self.step == c.steps or stopping:
                    values = distributed.mean_over_ranks({key: float(np.mean(v)) for key, v in pending.items()})
                    values.update({f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups})
                    record("train", values)
                    pending = {}
                if refresh_due(self.refresh, self.step):
                    record("train", self.refresh_index())
                if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    record("eval", self.evaluate())
                saved = c.save_every and self.step % c.save_every == 0 and self.step < c.steps
                if saved:
                    self.save()
                if stopping:
                    if not saved:
                        self.save()
                    if main:
                        log.close()
                        print(f"jointrag: stopped at step {self.step} of {c.steps}; {self.out / CHECKPOINT} holds it: "
                              "--resume continues the run", file=sys.stderr)
                    raise KeyboardInterrupt
        if self.refresh and not refresh_due(self.refresh, self.step):
            record("train", self.refresh_index())  # the saved index matches the saved passage tower
        final = self.evaluate()
        record("eval", final)
        self.save()
        if main:
            log.close()
            from ..evaluation.plot import plot_run

            plot_run(self.out)
        return distributed.from_main(final)


def read_checkpoint(directory: Path | str) -> tuple[RunConfig, dict, dict]:
    """(config, trained weights, the saved index's record) of a checkpoint directory."""
    directory = Path(directory)
    if not (directory / "weights.pt").is_file():
        raise UserError(f"{directory} is not a checkpoint (no weights.pt); pass RUN_DIR/checkpoint")
    config = load_config(str(directory / "config.yaml"))
    return config, read_tensors(directory / "weights.pt"), read_tensors(directory / "trainer.pt")["index"]


def trained_index(index: RetrievalIndex, saved: dict) -> RetrievalIndex:
    """The index a checkpoint was saved with (a run that trained the passage tower rebuilt its own)."""
    if Path(saved["directory"]) == index.directory.resolve():
        return index
    return RetrievalIndex.open(saved["directory"], index.retriever, built_by=saved.get("encoder"))


def load_trained(directory: Path | str, precision: str | None = None):
    """(config, system) of a saved checkpoint, ready to evaluate: base models, then the trained weights.
    `precision` replaces the run's `train.precision` (fp32 keeps the saved fp32 weights exact: `export`)."""
    config, weights, saved = read_checkpoint(directory)
    if precision is not None:
        config.train.precision = precision
    system = system_for(config)
    if any(name.startswith("posterior.") for name in weights):
        system.add_posterior()
    load_weights(system, weights, directory)
    system.index = trained_index(system.index, saved)
    system.requires_grad_(False)
    return config, system.eval()


def load_trained_index(directory: Path | str) -> tuple[RunConfig, RetrievalIndex]:
    """(config, index with the trained retriever) of a checkpoint, without loading its generator, for
    retrieval only; a method whose retriever runs on the generator (`separate_retriever`) loads whole."""
    config, weights, saved = read_checkpoint(directory)
    if not entry(config).separate_retriever:
        return config, load_trained(directory)[1].index
    index = resolve_index(config.model.index, config.model.retriever)
    tower = {name.removeprefix("retriever."): w for name, w in weights.items() if name.startswith("retriever.")}
    if tower:
        load_weights(index.retriever, tower, directory)
        index.retriever.requires_grad_(False)
    return config, trained_index(index, saved)
