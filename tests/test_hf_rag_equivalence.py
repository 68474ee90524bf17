"""Our RAG losses agree with Hugging Face transformers' `RagSequenceForGeneration` and
`RagTokenForGeneration` on one tiny BART, in value and in gradient (methods.md §1).

Set-up: a tiny random DPR question encoder and a tiny random BART generator (no downloads), wrapped by
HF's RAG classes *and*, as the very same module object, by our `jointrag.generation.generator.Generator`. Our side
goes through `Generator.target_logprobs` unchanged; HF gets precomputed `context_input_ids`,
`context_attention_mask` and `doc_scores` (a leaf requiring grad), so its retriever and question
encoder are never used. B = 2 examples, K = 3 passages.

The settings that align the two (found by reading `modeling_rag.py`, transformers 5.x):

1. `context_input_ids` / `context_attention_mask` = `tokenizer.pad(Generator.prompt_ids(prompts))`,
   example-major rows (b0k0, b0k1, b0k2, b1k0, ...), right-padded, exactly what our Generator encodes.
2. `labels = [decoder_start_token_id] + Generator.target_ids(target)`, right-padded with the pad id.
   HF feeds `labels` unshifted as `decoder_input_ids` and scores `labels[1:]` (it shifts the target
   left by one and pads the end), so its first label plays the decoder-start token. Our Generator
   feeds `shift_tokens_right(target)`, i.e. `[decoder_start] + target[:-1]`, and scores all of
   `target`: the same tokens under the same decoder inputs. HF passes no decoder attention mask; BART's
   decoder is causal, so trailing padding cannot change the real positions and our mask is harmless.
3. `exclude_bos_score=False`. With a BART-style tokenizer the target is `<s> y </s>`; our Generator
   scores the `<s>` too, HF drops it when `exclude_bos_score=True` (and every row's shifted target
   starts with `bos_token_id`). Then HF equals ours computed on `token_logp[..., 1:]` (tested).
   RAG-Token's loss ignores the flag.
4. `label_smoothing = 0` in the `RagConfig` (HF's `epsilon`; the default) and `reduce_loss=False` for
   per-example losses (B,); `reduce_loss=True` is their sum.
5. Every target must have at least two scored tokens for RAG-Sequence. HF adds the doc log-prior to
   the log-prob of the *second* scored token and then zeroes padded positions, so for a one-token
   target the prior is masked away and HF returns -log sum_z p(y|x,z), without p(z|x) (tested below
   as a documented HF quirk). BART-style targets `<s> y </s>` always have >= 3.
6. Dropout off: `.eval()` on the shared BART.

The tiny BART's weights are redrawn from N(0, 0.3^2): at HF's default init (std 0.02) the output is
almost independent of the encoder input, p(y|x,z) barely varies with z, and RAG-Sequence and RAG-Token
give the same number, which would make the comparison blind to how the passages are weighted.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from conftest import PASSAGES, make_tokenizer
from jointrag.generation.generator import Generator
from jointrag.maths import log_softmax_masked, rag_sequence_nll, rag_token_nll, sequence_logp

K = 3
PROMPTS = [
    [f"{p.title} / {p.text} // What is the capital of France?" for p in PASSAGES[:3]],
    [f"{p.title} / {p.text} // Who won Super Bowl 50?" for p in PASSAGES[5:8]],
]
TARGETS = ["Paris, France", "the Denver Broncos"]
ATOL = 1e-4


class Setup:
    def __init__(self, style: str):
        tokenizer = make_tokenizer()
        if style == "bart":  # like BART's own tokenizer: <s> text </s> on prompts and targets
            tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
                single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)]
            )
        torch.manual_seed(0)
        vocab = len(tokenizer)
        bart = BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        ))
        dpr = DPRQuestionEncoder(DPRConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, pad_token_id=0,
        ))
        config = RagConfig.from_question_encoder_generator_configs(dpr.config, bart.config, n_docs=K)
        assert config.label_smoothing == 0.0
        self.rag_sequence = RagSequenceForGeneration(config, question_encoder=dpr, generator=bart).eval()
        self.rag_token = RagTokenForGeneration(config, question_encoder=dpr, generator=bart).eval()
        assert self.rag_sequence.generator is bart and self.rag_token.generator is bart
        with torch.no_grad():  # after the RAG wrappers' post_init, so nothing re-initialises them
            g = torch.Generator().manual_seed(1)
            for p in bart.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.3, generator=g)
        self.bart = bart.eval()
        self.generator = Generator(bart, tokenizer, name="tiny")
        self.style = style

        ids = self.generator.prompt_ids([p for row in PROMPTS for p in row])  # (B*K), example-major
        context = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        self.context_input_ids, self.context_attention_mask = context["input_ids"], context["attention_mask"]
        self.target_ids = self.generator.target_ids(TARGETS)
        start = bart.config.decoder_start_token_id
        self.labels = torch.full((len(TARGETS), max(map(len, self.target_ids)) + 1), tokenizer.pad_token_id)
        for i, t in enumerate(self.target_ids):
            self.labels[i, : len(t) + 1] = torch.tensor([start] + t)
        self.doc_scores = torch.randn(len(TARGETS), K, generator=torch.Generator().manual_seed(2)) * 2
        # generator parameters on both sides of the cross attention
        self.params = [bart.model.encoder.layers[0].self_attn.q_proj.weight, bart.model.decoder.layers[0].fc1.weight]

    def hf_loss(self, model, doc_scores, **kwargs):
        return model(
            context_input_ids=self.context_input_ids, context_attention_mask=self.context_attention_mask,
            doc_scores=doc_scores, labels=self.labels, n_docs=K, **kwargs,
        ).loss

    def ours(self, doc_scores):
        token_logp, token_mask = self.generator.target_logprobs(PROMPTS, TARGETS)  # (B, K, T)
        doc_logp = log_softmax_masked(doc_scores, torch.ones_like(doc_scores, dtype=torch.bool))
        return doc_logp, token_logp, token_mask

    def grads(self, loss, doc_scores):
        return torch.autograd.grad(loss.sum(), [doc_scores, *self.params])


@pytest.fixture(scope="module", params=["bart", "plain"])
def setup(request):
    return Setup(request.param)


def assert_grads_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_alignment_scores_the_same_tokens(setup):
    _, token_logp, token_mask = setup.ours(setup.doc_scores)
    assert token_mask.sum(-1)[:, 0].tolist() == [len(t) for t in setup.target_ids]
    shifted = setup.labels[:, 1:]  # what HF scores
    for i, t in enumerate(setup.target_ids):
        assert shifted[i, : len(t)].tolist() == t and shifted[i, len(t):].eq(0).all()
        assert len(t) >= 2  # see note 5
    if setup.style == "bart":
        assert all(t[0] == 1 and t[-1] == 2 for t in setup.target_ids)
    # the passages matter to this generator: the per-passage sequence log-probs are far apart
    seq = sequence_logp(token_logp, token_mask)
    assert (seq.max(-1).values - seq.min(-1).values).min() > 1.0


def test_rag_sequence_matches_hf_in_value_and_gradient(setup):
    doc_scores = setup.doc_scores.clone().requires_grad_()
    doc_logp, token_logp, token_mask = setup.ours(doc_scores)
    ours = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))  # (B,)
    theirs = setup.hf_loss(setup.rag_sequence, doc_scores, exclude_bos_score=False, reduce_loss=False)
    assert ours.shape == theirs.shape == (2,)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert_grads_close(setup.grads(ours, doc_scores), setup.grads(theirs, doc_scores))
    summed = setup.hf_loss(setup.rag_sequence, doc_scores, exclude_bos_score=False, reduce_loss=True)
    torch.testing.assert_close(ours.sum(), summed, atol=ATOL, rtol=0)


def test_rag_token_matches_hf_in_value_and_gradient(setup):
    doc_scores = setup.doc_scores.clone().requires_grad_()
    doc_logp, token_logp, token_mask = setup.ours(doc_scores)
    ours = rag_token_nll(doc_logp, token_logp, token_mask)  # (B,)
    theirs = setup.hf_loss(setup.rag_token, doc_scores, reduce_loss=False)
    assert ours.shape == theirs.shape == (2,)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert_grads_close(setup.grads(ours, doc_scores), setup.grads(theirs, doc_scores))
    # and the two objectives really differ on this generator
    sequence = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))
    assert (sequence - ours).abs().max() > 1e-2


def test_exclude_bos_score_drops_the_first_target_token(setup):
    doc_scores = setup.doc_scores.clone().requires_grad_()
    doc_logp, token_logp, token_mask = setup.ours(doc_scores)
    theirs = setup.hf_loss(setup.rag_sequence, doc_scores, exclude_bos_score=True, reduce_loss=False)
    if setup.style == "bart":  # the shifted target starts with <s> in every row: HF leaves its score out
        without_bos = rag_sequence_nll(doc_logp, sequence_logp(token_logp[..., 1:], token_mask[..., 1:]))
        torch.testing.assert_close(without_bos, theirs, atol=ATOL, rtol=0)
        full = rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask))
        assert (full - theirs).min() > 0.1
    else:  # no <s> in the targets: the flag does nothing
        torch.testing.assert_close(rag_sequence_nll(doc_logp, sequence_logp(token_logp, token_mask)), theirs, atol=ATOL, rtol=0)


def test_hf_rag_sequence_drops_the_prior_for_one_token_targets():
    """Documents HF's quirk behind note 5: the doc prior sits on the second scored token."""
    setup = Setup("plain")
    one = ["Paris", "Paris"]
    assert [len(t) for t in setup.generator.target_ids(one)] == [1, 1]
    start = setup.bart.config.decoder_start_token_id
    setup.labels = torch.tensor([[start] + t for t in setup.generator.target_ids(one)])
    doc_scores = setup.doc_scores.clone()
    with torch.no_grad():
        token_logp, token_mask = setup.generator.target_logprobs(PROMPTS, one)
        seq = sequence_logp(token_logp, token_mask)
        theirs = setup.hf_loss(setup.rag_sequence, doc_scores, reduce_loss=False)
        ours = rag_sequence_nll(doc_scores.log_softmax(-1), seq)
    torch.testing.assert_close(theirs, -torch.logsumexp(seq, -1), atol=ATOL, rtol=0)  # no p(z|x) at all
    assert (theirs - ours).abs().min() > 0.1
    # RAG-Token has no such quirk
    with torch.no_grad():
        torch.testing.assert_close(setup.hf_loss(setup.rag_token, doc_scores, reduce_loss=False), ours, atol=ATOL, rtol=0)
