"""The trainable parts of a RAG model in one module, and the handles every objective uses.

`RAGSystem` holds the bi-encoder retriever (query tower, passage tower), the generator and, for the
methods that need one, the posterior retriever q(z|x,y): its own query tower reading `x [SEP] y`,
sharing the passage tower and the index (methods.md §2-3). The index and corpus are plain handles,
not modules. Objectives call the methods below and own no model. Retrieval reads an example's
`question` (for a dialog, the query built from its last turns); the generator's prompt is built from
the whole example (question and dialog history, `PromptTemplate.prompt`).

Candidates are corpus rows in a (B, K) integer array, -1 where an example has fewer; their mask is
`rows >= 0`. Shapes: B examples, K or P candidates, T target tokens, D embedding size.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .generation.generator import Generator, Prompt, PromptTemplate
from .retrieval.index import RetrievalIndex
from .maths import sequence_logp
from .retrieval.encoders import BiEncoder, Encoder
from .errors import UserError
from .types import Example, Passage

EMPTY = Passage("", "", "")


def union_rows(*columns: np.ndarray) -> np.ndarray:
    """Ordered, de-duplicated union of candidate rows per example, padded with -1: (B, P)."""
    merged = [list(dict.fromkeys(r for r in row if r >= 0)) for row in np.concatenate(columns, axis=1).tolist()]
    width = max(1, max(len(m) for m in merged))
    out = np.full((len(merged), width), -1, dtype=np.int64)
    for i, m in enumerate(merged):
        out[i, : len(m)] = m
    return out


def load_weights(system: nn.Module, weights: dict, where) -> None:
    """Load trained `weights` (a subset of `system`'s parameters) read from `where`; weights for
    parameters the system does not have are refused."""
    missing = set(weights) - {name for name, _ in system.named_parameters()}
    if missing:
        raise UserError(f"{where}: weights for parameters this model does not have: {sorted(missing)[:3]}")
    system.load_state_dict(weights, strict=False)


def eval_frozen(parts: Iterable[nn.Module | None]) -> None:
    """Put each part that has parameters but trains none of them in eval mode (no dropout), after
    `train()`: a frozen model scores (rewards, silver sequences, LSR targets) and must not add noise.

    A part that trains (any parameter with requires_grad, a LoRA model too) is left wholly in train
    mode, and so is every module it shares with a frozen part: the same tower twice (tied towers), a
    retriever tower over the generator's body (Invar-RAG's `AdapterView`).
    """
    present = list({id(p): p for p in parts if p is not None}.values())
    trains = {id(p): any(w.requires_grad for w in p.parameters()) for p in present}
    training = {id(m) for p in present if trains[id(p)] for m in p.modules()}
    for part in present:
        if trains[id(part)] or next(part.parameters(), None) is None:
            continue
        if not any(id(m) in training for m in part.modules()):
            part.eval()
            continue
        for module in part.modules():  # shares a module with a training part: the rest only
            if id(module) not in training:
                module.training = False


class RAGSystem(nn.Module):
    def __init__(
        self,
        retriever: BiEncoder,
        generator: Generator,
        index: RetrievalIndex,
        template: PromptTemplate,
        *,
        posterior: Encoder | None = None,
        posterior_template: str = "{question} [SEP] {answer}",
        train_passage_tower: bool = False,
        max_pairs: int = 64,
    ):
        super().__init__()
        self.retriever = retriever
        self.generator = generator
        self.posterior = posterior
        self.index = index
        self.template = template
        self.posterior_template = posterior_template
        self.train_passage_tower = train_passage_tower
        self.max_pairs = max_pairs

    def train(self, mode: bool = True) -> "RAGSystem":
        """Train mode for the parts that train; the frozen ones (the LM under RA-DIT's LSR, the passage
        tower when its stored embeddings are used) stay in eval mode (`eval_frozen`)."""
        super().train(mode)
        if mode:
            r = self.retriever
            eval_frozen([r.query_encoder, r.passage_encoder, self.posterior, self.generator])
        return self

    def add_posterior(self) -> None:
        """Start q(z|x,y) from a copy of the prior's query tower (methods.md §2)."""
        if self.posterior is None:
            self.posterior = copy.deepcopy(self.retriever.query_encoder)

    def posterior_texts(self, questions: Sequence[str], answers: Sequence[str]) -> list[str]:
        return [self.posterior_template.format(question=q, answer=a) for q, a in zip(questions, answers)]

    # retrieval: search (no gradient) and score (differentiable)

    def search(self, questions: Sequence[str], k: int) -> np.ndarray:
        """Prior top-k corpus rows (B, k), -1 padded, searched with this system's query tower."""
        return self.index.search_embeddings(self.retriever.encode_queries(questions), k)[1]

    def search_posterior(self, questions: Sequence[str], answers: Sequence[str], k: int) -> np.ndarray:
        """Posterior top-k corpus rows (B, k) for `x [SEP] y`, from the same index."""
        queries = self.posterior.encode(self.posterior_texts(questions, answers))
        return self.index.search_embeddings(queries, k)[1]

    def candidate_mask(self, rows: np.ndarray) -> torch.Tensor:
        """True where a candidate exists (B, K)."""
        return torch.from_numpy(rows >= 0).to(self.generator.device)

    def candidate_embeddings(self, rows: np.ndarray) -> torch.Tensor:
        """Passage embeddings (B, K, D): stored ones, or fresh and differentiable when the passage tower trains."""
        if not self.train_passage_tower:
            return self.index.embeddings(rows).to(self.generator.device)
        flat = [p or EMPTY for row in self.passages(rows) for p in row]
        embeddings = self.retriever.passage_encoder(self.retriever.passage_texts(flat))  # (B*K, D)
        return embeddings.view(*rows.shape, -1)

    def prior_scores(self, questions: Sequence[str], rows: np.ndarray) -> torch.Tensor:
        """Differentiable s(x, z) for the given candidates (B, K)."""
        return self.retriever.score(questions, self.candidate_embeddings(rows)).float()

    def posterior_scores(self, questions: Sequence[str], answers: Sequence[str], rows: np.ndarray) -> torch.Tensor:
        """Differentiable s_q(x, y, z) of the posterior query tower for the given candidates (B, K)."""
        queries = self.posterior(self.posterior_texts(questions, answers))  # (B, D)
        embeddings = self.candidate_embeddings(rows)
        return torch.einsum("bd,bkd->bk", queries, embeddings.to(queries.dtype)).float()

    # generation likelihoods

    def passages(self, rows: np.ndarray) -> list[list[Passage | None]]:
        return self.index.passages(rows)

    def prompt(self, example: Example, passage: Passage | None) -> Prompt:
        """The generator's prompt for `example` with one passage; a padded candidate gets an empty one."""
        return self.template.prompt(example, [passage or EMPTY], self.generator.chat)

    def prompts(self, examples: Sequence[Example], rows: np.ndarray) -> list[list[Prompt]]:
        """One prompt per (example, candidate): B rows of K prompts."""
        return [[self.prompt(e, p) for p in row] for e, row in zip(examples, self.passages(rows))]

    def target_logprobs(self, examples: Sequence[Example], rows: np.ndarray, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(y_t | x, z, y_<t) for every candidate: (logp (B, K, T), mask (B, K, T))."""
        return self.generator.target_logprobs(self.prompts(examples, rows), answers)

    def selected_logprobs(
        self, examples: Sequence[Example], rows: np.ndarray, selected: torch.Tensor, answers: Sequence[str], reduce: str
    ) -> torch.Tensor:
        """log p(y | x, z) (B, P) for the selected (example, candidate) pairs only, -inf elsewhere.

        The pairs are scored in batches of `max_pairs` rows; gradient flows when enabled by the caller.
        """
        pairs = selected.nonzero().tolist()  # [(b, p)]
        passages = self.passages(rows)
        out = torch.full(selected.shape, float("-inf"), device=self.generator.device)
        values = []
        for start in range(0, len(pairs), self.max_pairs):
            chunk = pairs[start : start + self.max_pairs]
            prompts = [self.prompt(examples[b], passages[b][p]) for b, p in chunk]
            logp, mask = self.generator.pair_logprobs(prompts, [answers[b] for b, _ in chunk])  # (n, T)
            values.append(sequence_logp(logp.unsqueeze(1), mask.unsqueeze(1), reduce).squeeze(1))
        if values:
            index = torch.tensor(pairs, device=out.device)
            out = out.index_put((index[:, 0], index[:, 1]), torch.cat(values))
        return out
