import pytest
import torch

from jointrag.generation.decoding import _rag_token_search, rag_sequence_generate, rag_token_generate
from jointrag.generation.generator import load_generator

NEG_INF = float("-inf")
QUESTIONS = ["What is the capital of France?", "Who won Super Bowl 50?"]


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def generator(request, tiny_dir):
    """A tiny generator with larger random weights.

    At the default initialisation the tiny models' next-token distributions are nearly flat and the
    BART one ends every answer at once; larger weights give peaked, prompt-dependent distributions
    (no near-ties for argmax to flip on) and answers of varied length.
    """
    generator = load_generator(str(tiny_dir / request.param), precision="fp32")
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in generator.model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.2)
    return generator


def prompt_rows(passages, k: int = 3) -> list[list[str]]:
    """(B=2, K) prompts: each question with K passages of its own."""
    return [[f"{p.title}: {p.text}\nQuestion: {q}\nAnswer:" for p in passages[3 * b : 3 * b + k]] for b, q in enumerate(QUESTIONS)]


def direct_token_logp(generator, prompt: str, ids: list[int]) -> torch.Tensor:
    """log p(ids_t | prompt, ids_<t) as (S,), from one unpadded model call."""
    prompt_ids, device = generator.prompt_ids([prompt])[0], generator.device
    with torch.no_grad():
        if generator.seq2seq:
            start = generator.model.generation_config.decoder_start_token_id
            inputs = {"input_ids": torch.tensor([prompt_ids], device=device), "decoder_input_ids": torch.tensor([[start] + ids[:-1]], device=device)}
            logits = generator.model(**inputs).logits[0]
        else:
            logits = generator.model(torch.tensor([prompt_ids + ids], device=device)).logits[0, len(prompt_ids) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids, device=device)[:, None]).squeeze(-1)


def test_one_passage_rag_token_is_plain_greedy(generator, passages):
    prompts = [p for row in prompt_rows(passages) for p in row]
    expected, expected_logp = generator.generate(prompts, max_new_tokens=8, return_scores=True)
    one_each = [[p] for p in prompts]
    assert rag_token_generate(generator, one_each, torch.zeros(len(prompts), 1), max_new_tokens=8) == expected
    _, logp = _rag_token_search(generator, one_each, torch.zeros(len(prompts), 1), 8, 1)
    assert torch.allclose(logp, expected_logp, atol=1e-4)
    assert len(set(expected)) > 1  # the prompts matter: the comparison is not between constant answers


def test_rag_token_follows_the_only_real_passage(generator, passages):
    prompts = prompt_rows(passages)
    greedy = generator.generate([p for row in prompts for p in row], max_new_tokens=8)  # (B*K)
    doc_logp = torch.tensor([[NEG_INF, 0.3, NEG_INF], [1.0, NEG_INF, NEG_INF]])
    assert rag_token_generate(generator, prompts, doc_logp, max_new_tokens=8) == [greedy[1], greedy[3]]


def test_rag_token_beam_score_is_the_mixture_of_its_tokens(generator, passages, monkeypatch):
    """The search's score equals the mixture log-prob recomputed from scratch, so the cache follows the beams."""
    monkeypatch.setattr(generator.model.generation_config, "forced_eos_token_id", None)  # a forced token scores 0
    prompts = prompt_rows(passages)
    doc_logp = torch.tensor([[-0.5, -1.5, -1.0], [0.0, NEG_INF, -2.0]])
    ids, scores = _rag_token_search(generator, prompts, doc_logp, 8, 3)
    eos = generator.model.generation_config.eos_token_id
    for b, row in enumerate(prompts):
        tokens = ids[b].tolist()
        tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        token_logp = torch.stack([direct_token_logp(generator, p, tokens) for p in row])  # (K, S)
        mixture = (doc_logp[b].log_softmax(-1)[:, None] + token_logp.cpu()).logsumexp(0)  # (S,)
        assert scores[b].item() == pytest.approx(mixture.sum().item(), abs=1e-4)


def test_rag_token_beam_search(generator, passages):
    prompts = prompt_rows(passages)
    doc_logp = torch.tensor([[-0.5, -1.5, -1.0], [0.0, -0.2, -2.0]])
    answers = rag_token_generate(generator, prompts, doc_logp, max_new_tokens=8, num_beams=3)
    assert len(answers) == 2 and all(isinstance(a, str) and "\n" not in a for a in answers)
    greedy = rag_token_generate(generator, prompts, doc_logp, max_new_tokens=8)
    assert rag_token_generate(generator, prompts, doc_logp, max_new_tokens=8, num_beams=1) == greedy


def test_rag_sequence_thorough_is_the_argmax_over_its_hypotheses(generator, passages):
    prompts = prompt_rows(passages)
    doc_logp = torch.tensor([[-0.5, -1.5, -1.0], [0.0, NEG_INF, -2.0]])
    answers = rag_sequence_generate(generator, prompts, doc_logp, mode="thorough", max_new_tokens=8, num_beams=2)
    for b, row in enumerate(prompts):
        real = [z for z in range(3) if doc_logp[b, z] > NEG_INF]
        beams = generator.generate([row[z] for z in real], max_new_tokens=8, num_beams=2, num_return_sequences=2, length_penalty=0.0)
        hypotheses = sorted(set(beams))
        target_logp, _ = generator.target_logprobs([row] * len(hypotheses), hypotheses)  # (Y, K, T)
        joint = (doc_logp[b].log_softmax(-1) + target_logp.sum(-1).cpu()).logsumexp(-1)  # (Y,)
        assert answers[b] == hypotheses[int(joint.argmax())]


def test_rag_sequence_fast_with_one_passage_is_plain_beam_search(generator, passages):
    prompts = [[row[0]] for row in prompt_rows(passages)]
    doc_logp = torch.zeros(2, 1)
    best = generator.generate([row[0] for row in prompts], max_new_tokens=8, num_beams=3, num_return_sequences=3, length_penalty=0.0)[::3]
    assert rag_sequence_generate(generator, prompts, doc_logp, mode="fast", max_new_tokens=8, num_beams=3) == best
    fast = rag_sequence_generate(generator, prompts, doc_logp, mode="fast", max_new_tokens=8, num_beams=1)
    assert fast == rag_sequence_generate(generator, prompts, doc_logp, mode="thorough", max_new_tokens=8, num_beams=1)


def test_padded_candidates_never_matter(generator, passages):
    """Candidates at -inf give the answers of the same call without them, whatever their prompts say."""
    (a0, _, a2), (b0, b1, _) = prompt_rows(passages)
    doc_logp = torch.tensor([[-0.5, NEG_INF, -1.0], [0.0, -0.2, NEG_INF]])
    padded = [[a0, "zzz", a2], [b0, b1, "Answer: Berlin"]]
    kept = [[a0, a2], [b0, b1]]
    kept_logp = torch.tensor([[-0.5, -1.0], [0.0, -0.2]])
    decoders = [
        lambda p, d: rag_token_generate(generator, p, d, max_new_tokens=6),
        lambda p, d: rag_token_generate(generator, p, d, max_new_tokens=6, num_beams=2),
        lambda p, d: rag_sequence_generate(generator, p, d, mode="thorough", max_new_tokens=6, num_beams=2),
        lambda p, d: rag_sequence_generate(generator, p, d, mode="fast", max_new_tokens=6, num_beams=2),
    ]
    for decode in decoders:
        assert decode(padded, doc_logp) == decode(kept, kept_logp)


def test_generate_scores_beams_by_their_sum(generator, passages):
    prompts = prompt_rows(passages)[0]
    texts, logp = generator.generate(prompts, max_new_tokens=6, num_beams=3, num_return_sequences=3, length_penalty=0.0, return_scores=True)
    assert len(texts) == 9 and logp.shape == (9,)
    assert (logp <= 0).all() and (logp.view(3, 3).diff(dim=1) <= 1e-6).all()  # best first per prompt


def test_unknown_rag_sequence_mode_is_an_error(generator, passages):
    with pytest.raises(ValueError, match="mode"):
        rag_sequence_generate(generator, prompt_rows(passages), torch.zeros(2, 3), mode="exhaustive")
