"""Answering from K retrieved passages at once: RAG-Token and RAG-Sequence decoding.

Lewis et al. 2020 (arXiv 2005.11401), §2.5; methods.md §1. Both take B rows of K prompts (one per
passage) and the retriever's log p(z|x) as (B, K), renormalised over the candidates; a candidate
with log p(z|x) = -inf is padding and never shapes the answer.

- `rag_token_generate`: one search whose next-token distribution is the p(z|x)-weighted mixture of
  the K passages' distributions, so each token may draw on a different passage. Every step is one
  forward pass over B*K*W rows that reuses the KV cache.
- `rag_sequence_generate`: beam search under each passage alone gives a hypothesis set Y; the answer
  is argmax_y Σ_z p(z|x) p(y|x,z), with p(y|x,z) rescored for every pair ("thorough") or taken from
  z's own beam and 0 when y was not in it ("fast", no extra passes).

With K = 1 both reduce to plain decoding on that passage's prompt.

Shapes: B examples, K passages per example, W beams, V vocabulary, Y hypotheses of one example.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from .generator import Generator, Prompt
from ..runtime import autocast

NEG_INF = float("-inf")


class _Rows:
    """Incremental decoding of B*K*W rows (ordered (B, K, W)) that share one KV cache.

    Each prompt is encoded once, then its cache is copied for the W beams. `step` moves every row
    onto the prefix of the row it now extends (a beam reorder), feeds one token per row and
    returns the next-token log-probs (B*K*W, V).
    """

    def __init__(self, generator: Generator, prompts: list[Prompt], beams: int):
        self.model, self.seq2seq = generator.model, generator.seq2seq
        batch = generator.tokenizer.pad({"input_ids": generator.prompt_ids(prompts)}, return_tensors="pt").to(generator.device)
        mask = batch["attention_mask"]  # (B*K, P)
        if self.seq2seq:
            hidden = self.model.get_encoder()(**batch).last_hidden_state  # (B*K, P, D)
            self.encoder = {
                "encoder_outputs": BaseModelOutput(last_hidden_state=hidden.repeat_interleave(beams, 0)),  # (B*K*W, P, D)
                "attention_mask": mask.repeat_interleave(beams, 0),
            }
            start = torch.full((len(prompts) * beams, 1), self.model.generation_config.decoder_start_token_id, device=mask.device)
            out = self.model(**self.encoder, decoder_input_ids=start, use_cache=True)
            logits = out.logits[:, -1]  # (B*K*W, V)
        else:
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens count from 0
            keep = {"logits_to_keep": 1} if generator._keeps_logits else {}
            out = self.model(**batch, position_ids=positions, use_cache=True, **keep)
            out.past_key_values.batch_repeat_interleave(beams)
            self.mask = mask.repeat_interleave(beams, 0)  # (B*K*W, P)
            self.position = positions[:, -1:].repeat_interleave(beams, 0)  # (B*K*W, 1)
            logits = out.logits[:, -1].repeat_interleave(beams, 0)  # (B*K*W, V)
        self.cache = out.past_key_values
        self.first_logp = torch.log_softmax(logits.float(), -1)

    def step(self, tokens: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """Append `tokens` (B*K*W,) to the prefixes of rows `source` (B*K*W,; None: unchanged)."""
        if source is not None:
            self.cache.reorder_cache(source)
        tokens = tokens[:, None]  # (B*K*W, 1)
        if self.seq2seq:
            out = self.model(**self.encoder, decoder_input_ids=tokens, past_key_values=self.cache, use_cache=True)
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(tokens)], 1)
            self.position = self.position + 1
            out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=self.position, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), -1)  # (B*K*W, V)


@torch.inference_mode()
def _rag_token_search(
    generator: Generator, prompts: Sequence[Sequence[Prompt]], doc_logp: torch.Tensor, max_new_tokens: int, num_beams: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the mixture; returns the best ids (B, S) and their summed mixture log-probs (B,).

    Finished beams stay in the beam, extended by padding at no cost. Since log-probs are <= 0 no
    running beam can overtake a finished one, so the search stops once every example's best beam
    has ended. With one beam this is greedy search. The generation config's forced first token
    (seq2seq) and forced last token are honoured as in `model.generate`; its other logits
    processors (repetition penalties, n-gram blocking) are not.
    """
    batch, k, beams = len(prompts), len(prompts[0]), num_beams
    device, config = generator.device, generator.model.generation_config
    doc_logp = doc_logp.to(device, torch.float32).log_softmax(-1)[:, :, None, None]  # (B, K, 1, 1)
    real = doc_logp.isfinite()  # (B, K, 1, 1)
    eos = torch.tensor([] if config.eos_token_id is None else config.eos_token_id, dtype=torch.long, device=device).view(-1)
    forced = {0: config.forced_bos_token_id if generator.seq2seq else None, max_new_tokens - 1: config.forced_eos_token_id}
    first_row = torch.arange(batch * k, device=device).view(batch, k, 1) * beams  # (B, K, 1) each prompt's first beam row
    scores = torch.full((batch, beams), NEG_INF, device=device)
    scores[:, 0] = 0.0  # the W copies start identical: expand only the first
    ids = torch.empty((batch, beams, 0), dtype=torch.long, device=device)  # (B, W, S)
    finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    with autocast(device, generator.precision):
        rows = _Rows(generator, [p for row in prompts for p in row], beams)
        logp = rows.first_logp
        for step in range(max_new_tokens):
            mixture = torch.where(real, doc_logp + logp.view(batch, k, beams, -1), NEG_INF).logsumexp(1)  # (B, W, V)
            mixture = _constrain(mixture, forced.get(step), finished, generator.tokenizer.pad_token_id)
            scores, index = (scores[..., None] + mixture).view(batch, -1).topk(beams, dim=1)  # (B, W), best first
            source, token = index // mixture.shape[-1], index % mixture.shape[-1]  # (B, W): beam extended, token added
            ids = torch.cat([ids.gather(1, source[..., None].expand_as(ids)), token[..., None]], 2)
            finished = finished.gather(1, source) | torch.isin(token, eos)
            if finished[:, 0].all() or step == max_new_tokens - 1:
                break
            reorder = None if beams == 1 else (first_row + source[:, None, :]).view(-1)  # (B*K*W,)
            logp = rows.step(token[:, None, :].expand(batch, k, beams).reshape(-1), reorder)
    return ids[:, 0], scores[:, 0]


def _constrain(logp: torch.Tensor, forced: int | list[int] | None, finished: torch.Tensor, pad: int) -> torch.Tensor:
    """Next-token log-probs (B, W, V) after a forced token (log-prob 0, as in `model.generate`) and
    with finished beams (B, W) allowed only padding, at no cost."""
    if forced is not None:
        logp = torch.full_like(logp, NEG_INF).index_fill_(-1, torch.tensor(forced, device=logp.device).view(-1), 0.0)
    padding = torch.full_like(logp[0, 0], NEG_INF).index_fill_(0, torch.tensor([pad], device=logp.device), 0.0)  # (V,)
    return torch.where(finished[..., None], padding, logp)


def _answer(generator: Generator, ids: torch.Tensor) -> list[str]:
    """Decoded like `Generator.generate`: special tokens dropped, cut at the first line break."""
    return [t.strip().split("\n")[0].strip() for t in generator.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def rag_token_generate(
    generator: Generator, prompts: Sequence[Sequence[Prompt]], doc_logp: torch.Tensor, *, max_new_tokens: int = 32, num_beams: int = 1
) -> list[str]:
    """RAG-Token decoding: greedy (num_beams=1) or beam search over the passage mixture.

    p(y_t | x, y_<t) = Σ_z p(z|x) p(y_t | x, z, y_<t) at every step; beams are ranked by the sum of
    these log-probs. `prompts` are B rows of K prompts, `doc_logp` is log p(z|x) (B, K).
    """
    ids, _ = _rag_token_search(generator, prompts, doc_logp, max_new_tokens, num_beams)
    return _answer(generator, ids)


@torch.inference_mode()
def rag_sequence_generate(
    generator: Generator,
    prompts: Sequence[Sequence[Prompt]],
    doc_logp: torch.Tensor,
    *,
    mode: str = "thorough",
    max_new_tokens: int = 32,
    num_beams: int = 4,
) -> list[str]:
    """RAG-Sequence decoding: argmax over y in Y of log Σ_z p(z|x) p(y|x,z).

    Y is the union of the num_beams answers of a beam search under each real passage (answers
    equal after post-processing are one hypothesis). "thorough" rescores every y under every real
    passage (one teacher-forced pass over the Y*K pairs of each example); "fast" takes log p(y|x,z) from
    z's own beam (log-summed over the beams that give the same answer) and -inf when y was not in it.
    """
    if mode not in ("thorough", "fast"):
        raise ValueError(f"mode must be 'thorough' or 'fast', not {mode!r}")
    batch, k = len(prompts), len(prompts[0])
    doc_logp = doc_logp.float().cpu().log_softmax(-1)  # (B, K)
    real = doc_logp.isfinite()  # (B, K)
    pairs = real.nonzero().tolist()  # [(b, z)]: only real passages are decoded
    texts, beam_logp = generator.generate(
        [prompts[b][z] for b, z in pairs], max_new_tokens=max_new_tokens, num_beams=num_beams,
        num_return_sequences=num_beams, length_penalty=0.0, return_scores=True,
    )  # (pairs*W) answers and their summed log-probs
    beams_of: list[list[tuple[str, int, float]]] = [[] for _ in range(batch)]  # per example: (answer, passage, log-prob)
    for i, (text, logp) in enumerate(zip(texts, beam_logp.tolist())):
        b, z = pairs[i // num_beams]
        beams_of[b].append((text, z, logp))
    answers = []
    for b, found in enumerate(beams_of):
        hypotheses = list(dict.fromkeys(text for text, _, _ in found))  # Y, in beam order
        seq_logp = torch.full((len(hypotheses), k), NEG_INF)  # (Y, K) log p(y|x,z)
        if mode == "thorough":
            passages = real[b].nonzero().view(-1).tolist()
            with autocast(generator.device, generator.precision):
                pair_logp, _ = generator.pair_logprobs(
                    [prompts[b][z] for _ in hypotheses for z in passages], [y for y in hypotheses for _ in passages]
                )  # (Y*K', T) over the K' real passages
            seq_logp[:, passages] = pair_logp.sum(-1).float().cpu().view(len(hypotheses), len(passages))
        else:
            for text, z, logp in found:
                y = hypotheses.index(text)
                seq_logp[y, z] = torch.logaddexp(seq_logp[y, z], torch.tensor(logp))
        joint = torch.where(real[b], doc_logp[b] + seq_logp, NEG_INF).logsumexp(-1)  # (Y,)
        answers.append(hypotheses[int(joint.argmax())])
    return answers
