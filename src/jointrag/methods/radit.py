"""RA-DIT (Lin et al., ICLR 2024, arXiv 2310.01352): dual instruction tuning (methods.md §4).

Two independent stages; `train/radit.py` runs both and the ablation.

- `LMFinetune` (LM-ft): each (x, y) becomes k' examples, one per retrieved passage placed in the
  prompt's background field; loss -sum_z log p(y | z ∘ x) over the k' passages (mean over examples).
  The retriever is frozen; the generator trains (LoRA or all weights).
- `LSR` (R-ft, LM-supervised retrieval): over the top-k candidates, the frozen LM's preference
  p_LSR(z|x,y) = softmax(log p_LM(y | z ∘ x) / lm_tau) (or softmax(p_LM / lm_tau), the paper's
  formula, with form="prob"; its tau = 0.01 suits probabilities in [0, 1], while on log-likelihoods it
  makes p_LSR one-hot and the KL hundreds of nats, so the log form defaults to lm_tau = 1: the LM's
  likelihood normalised over the candidates), the retriever's p_R(z|x) = softmax(s(x,z) / tau), and the loss
  KL(p_R || p_LSR). Only the query tower trains. The LM's scores are computed online each step, or
  once before training (`scores`: a file, reused by later runs), as the paper does; then the
  candidates are the ones retrieved when the scores were computed.

A corpus-derived example (x = the start of a passage, y = its end) lists its source passage in
`Example.exclude`; it is never a candidate, since it holds y itself and would teach nothing.

Shapes: B examples, K candidates, T target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import read_cache, write_cache
from ..errors import UserError
from ..system import RAGSystem
from ..types import Example, ObjectiveOutput
from ._base import Stateless
from ..maths import NEG_INF, kl_divergence, log_softmax_masked, sequence_logp


@dataclass
class LMFinetune(Stateless):
    k: int = 3
    reduce: str = "sum"
    needs_posterior: bool = field(default=False, init=False)
    trains: frozenset = field(default=frozenset({"generator"}), init=False)

    def footprint(self, system: RAGSystem) -> tuple[int, None]:
        """k' prompts per example (the memory check's count; their length is the prompt limit)."""
        return self.k, None

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        answers = [e.answers[0] for e in batch]
        rows = system.search([e.question for e in batch], self.k)  # (B, k')
        mask = system.candidate_mask(rows)
        token_logp, token_mask = system.target_logprobs(batch, rows, answers)  # (B, k', T)
        seq_logp = sequence_logp(token_logp, token_mask, self.reduce).masked_fill(~mask, 0.0)  # (B, k')
        loss = -seq_logp.sum(-1).mean()
        per_passage = (-seq_logp.sum() / mask.sum().clamp(min=1)).item()
        return ObjectiveOutput(loss, {"loss": loss.item(), "nll_per_passage": per_passage})


def lsr_log_target(lm_logp: torch.Tensor, mask: torch.Tensor, lm_tau: float, form: str) -> torch.Tensor:
    """log p_LSR(z|x,y) (B, K) from the LM's log p(y | z ∘ x) (B, K); -inf where `mask` is False."""
    values = lm_logp if form == "log" else lm_logp.exp()
    return log_softmax_masked(values.masked_fill(~mask, 0.0), mask, lm_tau)


@dataclass
class LSR(Stateless):
    k: int = 10
    tau: float = 0.1
    lm_tau: float = 1.0
    form: str = "log"
    reduce: str = "sum"
    scores: str | None = None
    needs_posterior: bool = field(default=False, init=False)
    trains: frozenset = field(default=frozenset({"query"}), init=False)
    table: dict = field(default_factory=dict, init=False)  # example id -> {question, answer, history, passages, logp}

    def search(self, system: RAGSystem, batch: Sequence[Example]) -> np.ndarray:
        """Top-k rows (B, k) for each example, its `exclude` passages left out; -1 padded."""
        extra = max(len(e.exclude) for e in batch)
        rows = system.search([e.question for e in batch], self.k + extra)
        if not extra:
            return rows
        kept = np.full((len(batch), self.k), -1, dtype=np.int64)
        for i, (example, row, passages) in enumerate(zip(batch, rows.tolist(), system.passages(rows))):
            keep = [r for r, p in zip(row, passages) if p is not None and p.id not in example.exclude][: self.k]
            kept[i, : len(keep)] = keep
        return kept

    @torch.no_grad()
    def lm_logprobs(self, system: RAGSystem, batch: Sequence[Example], rows: np.ndarray) -> torch.Tensor:
        """log p_LM(y | z ∘ x) of the frozen LM (B, K); -inf at padding."""
        token_logp, token_mask = system.target_logprobs(batch, rows, [e.answers[0] for e in batch])  # (B, K, T)
        logp = sequence_logp(token_logp.float(), token_mask, self.reduce)
        return logp.masked_fill(~system.candidate_mask(rows), NEG_INF)

    def prepare(self, system: RAGSystem, examples: Sequence[Example], batch_size: int = 8) -> None:
        """Load the score file and compute, once, the scores of the examples it lacks."""
        if self.scores is None:
            return
        path = Path(self.scores)
        corpus = system.index.corpus
        header = {"jointrag": "lm-scores", "k": self.k, "reduce": self.reduce, "corpus": corpus.fingerprint}
        self.table = _read_scores(path, header) if path.exists() else {}
        if self.table:
            self._check_same_lm(system, path)
        missing = list({e.id: e for e in examples if e.id not in self.table}.values())
        if not missing:
            return
        with tqdm(total=len(missing), unit="example", desc="RA-DIT: frozen-LM scores", dynamic_ncols=True) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                rows = self.search(system, batch)
                logp = self.lm_logprobs(system, batch, rows).cpu().tolist()
                for example, passages, values in zip(batch, system.passages(rows), logp):
                    kept = [(p.id, round(v, 5)) for p, v in zip(passages, values) if p is not None]  # as stored
                    self.table[example.id] = {"question": example.question, "answer": example.answers[0],
                                              "history": example.history, "passages": [i for i, _ in kept],
                                              "logp": [v for _, v in kept]}
                bar.update(len(batch))
        write_cache(path, header, self.table)

    def _check_same_lm(self, system: RAGSystem, path: Path) -> None:
        """Re-score the file's first example: another LM or prompt template gives other numbers."""
        example_id, record = next(iter(self.table.items()))
        rows = np.array([[system.index.corpus.row_of(i) for i in record["passages"]]], dtype=np.int64)
        example = Example(example_id, record["question"], (record["answer"],), history=record["history"])
        fresh = self.lm_logprobs(system, [example], rows)[0].tolist()
        if any(abs(a - b) > 0.1 + 0.02 * abs(b) for a, b in zip(fresh, record["logp"])):
            raise UserError(
                f"{path}: its LM scores were computed with another generator or prompt template "
                f"(example {example_id}: stored {record['logp'][0]:.3f}, now {fresh[0]:.3f}); "
                "delete the file or set method.lm_scores to a new path"
            )

    def precomputed(self, system: RAGSystem, batch: Sequence[Example]) -> tuple[np.ndarray, torch.Tensor]:
        """The stored candidates (B, K) and their LM log-probs (B, K), -1 / -inf padded."""
        corpus = system.index.corpus
        rows = np.full((len(batch), self.k), -1, dtype=np.int64)
        logp = torch.full((len(batch), self.k), NEG_INF)
        for i, example in enumerate(batch):
            record = self.table[example.id]
            if (record["question"], record["answer"], record["history"]) != (example.question, example.answers[0], example.history):
                raise UserError(f"{self.scores}: example {example.id} has another question, answer or history there than "
                                "in this run's data; delete the file or set method.lm_scores to a new path")
            for j, (passage_id, value) in enumerate(zip(record["passages"], record["logp"])):
                row = corpus.row_of(passage_id)
                if row is None:
                    raise UserError(f"{self.scores}: passage '{passage_id}' (example {example.id}) is not in the index's corpus")
                rows[i, j], logp[i, j] = row, value
        return rows, logp.to(system.generator.device)

    def __call__(self, system: RAGSystem, batch: Sequence[Example]) -> ObjectiveOutput:
        if self.scores is not None:
            rows, lm_logp = self.precomputed(system, batch)
        else:
            rows = self.search(system, batch)
            lm_logp = self.lm_logprobs(system, batch, rows)
        mask = system.candidate_mask(rows)
        log_r = log_softmax_masked(system.prior_scores([e.question for e in batch], rows), mask, self.tau)  # (B, K)
        log_lsr = lsr_log_target(lm_logp, mask, self.lm_tau, self.form)
        loss = kl_divergence(log_r, log_lsr).mean()
        agree = (log_r.argmax(-1) == log_lsr.argmax(-1)).float().mean().item()
        return ObjectiveOutput(loss, {"loss": loss.item(), "top1_agreement": agree,
                                      "lsr_top1": log_lsr.exp().max(-1).values.mean().item()})


def _read_scores(path: Path, header: dict) -> dict:
    """{example id: {question, answer, history, passages, logp}} from a score file written by `write_cache`.

    Line 1 is a header naming k, the reduction and the corpus fingerprint; then one example a line
    (`history`, the dialog turns as [speaker, text] pairs, may be absent: no history).
    """
    table = {}
    for line_no, record in read_cache(path, header, "set method.lm_scores to a new path"):
        try:
            example_id = str(record["id"])
            entry = {"question": str(record["question"]), "answer": str(record["answer"]),
                     "history": tuple((str(speaker), str(text)) for speaker, text in record.get("history", [])),
                     "passages": [str(i) for i in record["passages"]], "logp": [float(v) for v in record["logp"]]}
        except (KeyError, TypeError, ValueError):
            entry = None
        if entry is None or len(entry["passages"]) != len(entry["logp"]) or len(entry["logp"]) > header["k"]:
            raise UserError(f"{path}:{line_no}: expected fields 'id', 'question', 'answer', optionally 'history' "
                            f"([speaker, text] pairs), and 'passages' and 'logp' of the same length (at most k = {header['k']})")
        table[example_id] = entry
    return table
