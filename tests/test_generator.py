import pytest
import torch

from jointrag.errors import UserError
from jointrag.generation import generator as generator_module
from jointrag.generation.generator import PromptTemplate, length_groups, load_generator
from jointrag.types import Passage

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def direct_logprob(generator, prompt: str, target: str) -> torch.Tensor:
    """log p(target | prompt) summed over tokens, from one unpadded model call."""
    prompt_ids = generator.prompt_ids([prompt])[0]
    target_ids = generator.target_ids([target])[0]
    model = generator.model
    with torch.no_grad():
        if generator.seq2seq:
            labels = torch.tensor([target_ids])
            logits = model(input_ids=torch.tensor([prompt_ids]), labels=labels).logits[0]
            logp = logits.log_softmax(-1)
            return sum(logp[t, target_ids[t]] for t in range(len(target_ids)))
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
        logp = logits.log_softmax(-1)
        return sum(logp[len(prompt_ids) + t - 1, target_ids[t]] for t in range(len(target_ids)))


def prompts_and_targets(passages):
    template = PromptTemplate()
    questions = ["What is the capital of France?", "Who won Super Bowl 50 in the end?"]
    prompts = [[template.render(q, [p]) for p in passages[:3]] for q in questions]  # (B=2, K=3)
    return prompts, ["Paris", "the Denver Broncos"]


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_target_logprobs_match_direct_calls(tiny_dir, passages, kind):
    generator = load_generator(str(tiny_dir / kind), precision="fp32")  # exact: bf16 rounds differently under padding
    prompts, targets = prompts_and_targets(passages)
    logp, mask = generator.target_logprobs(prompts, targets)
    assert logp.shape == mask.shape and logp.shape[:2] == (2, 3)
    lengths = [len(t) for t in generator.target_ids(targets)]
    assert mask.sum(-1).tolist() == [[lengths[0]] * 3, [lengths[1]] * 3]
    assert (logp[~mask] == 0).all()
    for b in range(2):
        for k in range(3):
            expected = direct_logprob(generator, prompts[b][k], targets[b])
            assert logp[b, k].sum().item() == pytest.approx(expected.item(), abs=1e-4)


def test_length_groups_cut_sorted_rows_where_padding_would_grow(monkeypatch):
    monkeypatch.setattr(generator_module, "GROUP_TOKENS", 200)
    lengths = [100, 30, 95, 60, 58, 90]
    order = sorted(range(6), key=lambda i: -lengths[i])  # 100, 95, 90, 60, 58, 30
    # 100 and 95 hold fewer than 200 tokens, 90 is within 15% of 100; 60 is not; 58 and 30 fill the next group
    assert length_groups(order, lengths) == [[0, 2, 5], [3, 4, 1]]
    assert length_groups(order, lengths, extra=1000) == [order]  # long targets make every row alike


def test_grouped_passes_give_the_one_pass_log_probs_and_gradients(tiny_dir, passages, monkeypatch):
    generator = load_generator(str(tiny_dir / "causal"), precision="fp32")
    prompts, targets = prompts_and_targets(passages)
    prompts[0][1] = "short"  # prompts of different lengths

    def logprobs_and_gradient():
        generator.model.zero_grad()
        logp, _ = generator.target_logprobs(prompts, targets)
        (logp * torch.arange(1, logp.numel() + 1).view_as(logp)).sum().backward()
        return logp.detach(), generator.model.lm_head.weight.grad.clone()

    monkeypatch.setattr(generator_module, "GROUP_TOKENS", 10**9)
    whole = logprobs_and_gradient()
    monkeypatch.setattr(generator_module, "GROUP_TOKENS", 1)
    groups = length_groups(list(range(6)), [len(p) for p in generator.prompt_ids([p for row in prompts for p in row])])
    assert len(groups) > 1
    grouped = logprobs_and_gradient()
    assert torch.allclose(grouped[0], whole[0], atol=1e-5)
    assert torch.allclose(grouped[1], whole[1], atol=1e-5)


def test_chat_template_prompts_match_direct_calls(tiny_dir, passages):
    generator = load_generator(str(tiny_dir / "causal"), precision="fp32")
    generator.tokenizer.chat_template = CHAT_TEMPLATE
    generator.chat = True
    assert generator.format_prompt("hi") == "<s>user: hi</s><s>assistant:"
    prompts, targets = prompts_and_targets(passages)
    logp, _ = generator.target_logprobs(prompts, targets)
    assert logp[1, 2].sum().item() == pytest.approx(direct_logprob(generator, prompts[1][2], targets[1]).item(), abs=1e-4)
    assert generator.target_ids(["Paris"])[0][-1] == generator.tokenizer.eos_token_id


def test_target_logprobs_carry_gradient(tiny_dir, passages):
    generator = load_generator(str(tiny_dir / "causal"))
    prompts, targets = prompts_and_targets(passages)
    logp, _ = generator.target_logprobs(prompts, targets)
    logp.sum().backward()
    assert generator.model.lm_head.weight.grad.abs().sum() > 0


def test_prompt_truncation_keeps_the_end(tiny_dir):
    generator = load_generator(str(tiny_dir / "causal"))
    generator.max_prompt_tokens = 8
    ids = generator.prompt_ids(["word " * 50 + "capital city?"])[0]
    assert len(ids) == 8
    assert generator.tokenizer.decode(ids).endswith("capital city?")


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_returns_one_line_per_prompt(tiny_dir, kind, beams):
    generator = load_generator(str(tiny_dir / kind))
    answers = generator.generate(["Question: capital of France?", "Question: a much longer question here?"], max_new_tokens=5, num_beams=beams)
    assert len(answers) == 2 and all(isinstance(a, str) and "\n" not in a for a in answers)


def test_prompt_template_renders_passages():
    template = PromptTemplate(template="{passages} || {question}", passage_template="[{index}] {title}: {text}", separator=" ")
    rendered = template.render("Q?", [Passage("a", "A", "alpha"), Passage("b", "B", "beta")])
    assert rendered == "[1] A: alpha [2] B: beta || Q?"


def test_unreadable_generator_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load generator"):
        load_generator(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="model.gguf.*no such file"):
        load_generator(str(tmp_path / "model.gguf"))
