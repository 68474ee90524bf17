"""The bf16 fast paths against the fp32 ones they replace.

- bf16 weights (`runtime.weight_dtype`): the teacher-forced log-probs and their gradients stay within
  bf16's tolerance of the fp32 model's (stated below);
- fp32 master weights (`train.precision.MasterWeights`): the optimiser follows the fp32 trajectory
  and keeps updates that stepping bf16 weights directly would round away; a bf16 run's checkpoint
  holds the fp32 masters and resumes on the same trajectory; backward moves each gradient to its
  master, and micro-batches add up there in fp32;
- fused AdamW (the trainer's optimiser) follows the for-loop AdamW; activation checkpointing
  (`train.checkpointing`) gives the same losses and weights;
- generation stopped at the first line break (`LineEnded`) gives the answers generating to the end gives.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cli_helpers import assert_resumes_on_the_same_trajectory, read_metrics, train_argv, weights_of
from conftest import make_tokenizer
from jointrag.cli import main
from jointrag.generation.generator import Generator, LineEnded
from jointrag.train.precision import MasterWeights

# bf16 keeps 8 significant bits: a relative rounding error of 2^-9 per operation. Through the tiny
# Llama (2 layers) the log-probs move by at most LOGP_ATOL, and the gradient keeps its direction.
LOGP_ATOL = 0.05
GRAD_COSINE = 0.99

PROMPTS = ["Title: Paris\nParis is the capital of France.\n\nQuestion: What is the capital of France?\nShort answer:",
           "Title: Oslo\nOslo is in Norway.\n\nQuestion: Where is Oslo?\nShort answer:"]
ANSWERS = ["Paris", "Norway"]


def tiny_generator(dtype: torch.dtype) -> Generator:
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return Generator(model.to(dtype), tokenizer, name="tiny", precision="bf16" if dtype == torch.bfloat16 else "fp32")


def logprobs_and_gradient(generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logp, mask = generator.pair_logprobs(PROMPTS, ANSWERS)
    (logp.sum() / mask.sum()).backward()
    gradient = torch.cat([p.grad.float().flatten() for p in generator.parameters()])
    return logp.detach(), gradient


def test_bf16_weights_give_the_fp32_log_probs_and_gradients_within_tolerance():
    logp32, grad32 = logprobs_and_gradient(tiny_generator(torch.float32))
    logp16, grad16 = logprobs_and_gradient(tiny_generator(torch.bfloat16))
    assert logp16.dtype == torch.float32  # the log-softmax runs in fp32
    torch.testing.assert_close(logp16, logp32, atol=LOGP_ATOL, rtol=0)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > GRAD_COSINE
    assert abs(grad16.norm() / grad32.norm() - 1) < 0.05


def test_masters_follow_the_fp32_trajectory_and_keep_small_updates():
    torch.manual_seed(0)
    reference = torch.nn.Parameter((torch.randn(64) + 1.0).bfloat16().float())  # near 1, where a bf16 step is 2^-7
    low = torch.nn.Parameter(reference.detach().bfloat16())
    direct = torch.nn.Parameter(reference.detach().bfloat16())
    masters = MasterWeights([low])
    optimizers = [torch.optim.AdamW(params, lr=1e-4) for params in ([reference], masters.masters, [direct])]
    start = low.detach().clone()
    for _ in range(60):
        gradient = 1.0 + 0.1 * torch.randn(64)  # one direction: Adam steps of about lr each
        reference.grad, low.grad, direct.grad = gradient, gradient.bfloat16(), gradient.bfloat16()
        masters.gradients_to_masters()
        assert low.grad is None and masters.master(low).grad.dtype == torch.float32
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # as the trainer does: the masters accumulate gradients
        masters.masters_to_model()
    master = masters.master(low)
    torch.testing.assert_close(master, reference.detach(), atol=1e-5, rtol=0)  # gradients rounded to bf16 only
    assert torch.equal(low.detach(), master.detach().bfloat16())
    assert (low != start).float().mean() > 0.5  # 60 steps of 1e-4 add up to more than half a bf16 step below 2
    assert torch.equal(direct.detach(), start)  # each 1e-4 step alone rounds away in bf16


def test_backward_moves_each_gradient_to_its_master_and_micro_batches_add_up_in_fp32():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    masters = MasterWeights([weight])
    inputs = [torch.randn(3, 4).bfloat16() for _ in range(2)]
    expected = torch.zeros(8, 4)
    for x in inputs:
        (x @ weight.t()).float().square().sum().backward()
        assert weight.grad is None  # moved by the hook as backward formed it
        reference = torch.nn.Parameter(weight.detach().clone())
        (x @ reference.t()).float().square().sum().backward()
        expected += reference.grad.float()
    assert masters.master(weight).grad.dtype == torch.float32
    torch.testing.assert_close(masters.master(weight).grad, expected, rtol=0, atol=0)


def test_an_fp32_parameter_is_its_own_master():
    weight = torch.nn.Parameter(torch.ones(3))
    masters = MasterWeights([weight])
    assert masters.master(weight) is weight
    weight.grad = torch.ones(3)
    masters.gradients_to_masters()
    assert weight.grad is not None


def test_a_bf16_run_checkpoints_fp32_masters_and_resumes_on_the_same_trajectory(tmp_path, files, index_dir, tiny_dir, isolated_home):
    def argv(out, steps):
        return train_argv(files, index_dir, tiny_dir, out, "rag-sequence", steps, "train.precision=bf16",
                          "train.schedule=constant")  # a decaying schedule depends on train.steps

    resumed = assert_resumes_on_the_same_trajectory(tmp_path, argv)
    weights = weights_of(resumed)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())  # the masters, not bf16 values


def test_stopping_at_the_first_line_break_keeps_the_answer():
    tokenizer = make_tokenizer()
    prompt = tokenizer("question", add_special_tokens=False)["input_ids"]
    rows = {"\n Paris": False, "Paris": False, " \n\n": False, "Paris\n": True, "\nParis\nQuestion": True}
    ids = [prompt + tokenizer(text, add_special_tokens=False)["input_ids"] for text in rows]
    width = max(map(len, ids))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    assert LineEnded(tokenizer, len(prompt))(batch, None).tolist() == list(rows.values())


def test_greedy_answers_are_the_same_with_and_without_stopping(monkeypatch):
    generator = tiny_generator(torch.float32)
    newline = generator.tokenizer("\n", add_special_tokens=False)["input_ids"]
    # make the random model write line breaks: a bias towards the newline token in its output layer
    with torch.no_grad():
        generator.model.lm_head.weight[newline] += 0.5 * generator.model.lm_head.weight.abs().max()
    prompts = PROMPTS + ["Question: Where?\nShort answer:"]
    ended, check = [], LineEnded.__call__
    monkeypatch.setattr(LineEnded, "__call__", lambda self, ids, scores, **kw: ended.append(check(self, ids, scores)) or ended[-1])
    stopped = generator.generate(prompts, max_new_tokens=12)
    assert ended[-1].any()  # some rows ended their line before the 12 new tokens
    monkeypatch.setattr(LineEnded, "__call__", lambda self, ids, scores, **kw: torch.zeros(len(ids), dtype=torch.bool))
    assert generator.generate(prompts, max_new_tokens=12) == stopped


BF16_SETTINGS = {  # every trained part in bf16 with fp32 masters: LoRA adapters (Invar-RAG), the bridge LM (BGM)
    "jsa": (),
    "rag-token": (),
    "vrag": (),
    "ra-dit-lsr": ("method.lm_tau=0.5",),
    "bgm-sl": ("bgm.bridge={causal}", "bgm.max_new_tokens=6", "bgm.answer_tokens=3", "bgm.max_len=2"),
    "invar-rag": ("invar.teacher={index}", "invar.negatives=2", "invar.lora_r=2", "method.lm_k=2", "data.test={qa}"),
}


@pytest.mark.parametrize("method", sorted(BF16_SETTINGS))
def test_each_method_trains_in_bf16_and_checkpoints_fp32_masters(files, index_dir, tiny_dir, tmp_path, method):
    sets = [s.format(causal=tiny_dir / "causal", index=index_dir, qa=files["qa"]) for s in BF16_SETTINGS[method]]
    out = tmp_path / "run"
    argv = train_argv(files, index_dir, tiny_dir, out, method, 2, "train.precision=bf16", *sets)
    if method == "invar-rag":  # it builds the LLM retriever's own index
        at = argv.index("--index")
        del argv[at : at + 2]
    assert main(argv) == 0
    for run in [out / stage for stage in ("retrieval", "generation")] if method == "invar-rag" else [out]:  # its two stages
        metrics = [row for row in read_metrics(run) if row["split"] == "train"]
        assert metrics and all(math.isfinite(value) for row in metrics for value in row.values() if isinstance(value, float))
        weights = weights_of(run)
        assert weights and all(w.dtype == torch.float32 for w in weights.values())


def test_activation_checkpointing_gives_the_same_losses_and_weights(files, index_dir, tiny_dir, tmp_path):
    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / f"checkpointing-{checkpointing}"
        assert main(train_argv(files, index_dir, tiny_dir, out, "jsa", 2, f"train.checkpointing={str(checkpointing).lower()}",
                               "eval.limit=1")) == 0
        runs[checkpointing] = ([row["loss"] for row in read_metrics(out) if row["split"] == "train" and "loss" in row], weights_of(out))
    (losses, weights), (losses_ckpt, weights_ckpt) = runs[False], runs[True]
    assert len(losses) == 2 and losses_ckpt == pytest.approx(losses, abs=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(weights_ckpt[name], value, atol=1e-6, rtol=0)


def test_checkpointing_a_method_that_does_not_train_the_generator_is_refused(files, index_dir, tiny_dir, tmp_path, capsys):
    assert main(train_argv(files, index_dir, tiny_dir, tmp_path / "run", "ra-dit-lsr", 1, "train.checkpointing=true",
                           "method.lm_tau=0.5")) != 0
    assert "train.checkpointing: ra-dit-lsr does not train the generator" in capsys.readouterr().err


def test_fused_adamw_follows_the_for_loop_adamw():
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    runs = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        runs.append(params)
    for loop, fused in zip(*runs):
        torch.testing.assert_close(fused, loop, atol=1e-6, rtol=1e-5)
