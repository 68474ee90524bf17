"""Tests for RA-DIT (methods.md §4): the LSR loss and the LM-ft loss against brute force, what each
stage trains, the precomputed LM-score file, corpus-derived examples, the ensemble decoder against a
brute-force mixture, and a tiny run of the whole pipeline through the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, resume_finished_pipeline, run, train_argv
from conftest import QA
from jointrag.cli import main
from jointrag.maths import kl_divergence
from jointrag.methods.radit import lsr_log_target
from jointrag.types import Example

NEG_INF = float("-inf")

pytestmark = pytest.mark.usefixtures("isolated_home")


def trainer_for(files, index_dir, tiny_dir, tmp_path, method, *sets):
    from jointrag.config import load_config
    from jointrag.train import Trainer

    return Trainer(load_config(None, [
        f"method.name={method}", f"model.index={index_dir}", f"data.train={files['qa']}", f"data.dev={files['qa']}",
        f"model.generator={tiny_dir / 'causal'}", f"out={tmp_path / 'run'}", "method.k=3", "method.lm_k=2",
        "eval.limit=3", "train.precision=fp32", "method.lm_tau=0.5", *sets,
    ]))


def single_pair_logp(system, question: str, passage, answer: str) -> float:
    """log p(answer | passage ∘ question) from one unbatched, unpadded generator call."""
    logp, mask = system.generator.pair_logprobs([system.template.render(question, [passage])], [answer])
    return float((logp * mask).sum())


# --- the LSR loss ---------------------------------------------------------------------------------


def brute_force_lsr(scores, lm_logp, tau, lm_tau, form):
    """KL(p_R || p_LSR) of one example with plain Python floats."""
    values = [math.exp(v) if form == "prob" else v for v in lm_logp]
    lsr = [math.exp(v / lm_tau) for v in values]
    lsr = [v / sum(lsr) for v in lsr]
    r = [math.exp(s / tau) for s in scores]
    r = [v / sum(r) for v in r]
    return sum(a * math.log(a / b) for a, b in zip(r, lsr))


@pytest.mark.parametrize("form, lm_tau", [("log", 0.5), ("log", 2.0), ("prob", 0.3)])
def test_lsr_loss_matches_brute_force(form, lm_tau):
    torch.manual_seed(0)
    scores, lm_logp = torch.randn(3, 4, dtype=torch.float64), -torch.rand(3, 4, dtype=torch.float64) * 3
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True, False, True, True]])
    tau = 0.7
    log_r = torch.log_softmax((scores / tau).masked_fill(~mask, NEG_INF), -1)
    loss = kl_divergence(log_r, lsr_log_target(lm_logp.masked_fill(~mask, NEG_INF), mask, lm_tau, form))
    for b in range(3):
        keep = mask[b].tolist()
        expected = brute_force_lsr([s for s, k in zip(scores[b].tolist(), keep) if k],
                                   [v for v, k in zip(lm_logp[b].tolist(), keep) if k], tau, lm_tau, form)
        assert loss[b].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the paper's direction: F.kl_div(input=log p_LSR, target=log p_R) = KL(p_R || p_LSR)
    log_r, log_lsr = torch.log_softmax(scores / tau, -1), lsr_log_target(lm_logp, torch.ones_like(mask), lm_tau, form)
    reference = torch.nn.functional.kl_div(log_lsr, log_r, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(log_r, log_lsr), reference)


def test_lsr_objective_matches_a_brute_force_computation(files, index_dir, tiny_dir, tmp_path):
    """The whole R-ft loss of a batch, rebuilt from the retriever's scores and single generator calls."""
    trainer = trainer_for(files, index_dir, tiny_dir, tmp_path, "ra-dit-lsr")
    system, objective = trainer.system, trainer.objective
    batch = trainer.train_examples[:2]
    loss = objective(system, batch).loss
    expected = []
    with torch.no_grad():
        for example in batch:
            scores, rows = system.index.search([example.question], 3)
            passages = system.passages(rows)[0]
            lm = [single_pair_logp(system, example.question, p, example.answers[0]) for p in passages]
            s = system.retriever.score([example.question], system.index.embeddings(rows))[0].tolist()
            assert s == pytest.approx(scores[0].tolist(), abs=1e-5)
            expected.append(brute_force_lsr(s, lm, objective.tau, objective.lm_tau, "log"))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_lsr_trains_only_the_query_tower(files, index_dir, tiny_dir, tmp_path):
    trainer = trainer_for(files, index_dir, tiny_dir, tmp_path, "ra-dit-lsr")
    assert trainer.objective.trains == {"query"}
    trainer.objective(trainer.system, trainer.train_examples[:2]).loss.backward()
    trainable = {name for name, p in trainer.system.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("retriever.query_encoder.") for name in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for name, p in trainer.system.named_parameters()
               if name.startswith("retriever.query_encoder."))


def test_lm_ft_loss_sums_the_passages_and_trains_only_the_generator(files, index_dir, tiny_dir, tmp_path):
    trainer = trainer_for(files, index_dir, tiny_dir, tmp_path, "ra-dit-lm")
    system, batch = trainer.system, trainer.train_examples[:2]
    output = trainer.objective(system, batch)
    with torch.no_grad():
        expected = []
        for example in batch:
            passages = system.passages(system.index.search([example.question], 2)[1])[0]
            expected.append(-sum(single_pair_logp(system, example.question, p, example.answers[0]) for p in passages))
    assert output.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    output.loss.backward()
    trainable = {name for name, p in system.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("generator.") for name in trainable)


def test_r_ft_run_changes_only_the_query_tower(capsys, files, index_dir, tiny_dir, tmp_path):
    out = tmp_path / "r-ft"
    argv = train_argv(files, index_dir, tiny_dir, out, "ra-dit-lsr", 2, "train.lr_retriever=0.01", "method.lm_tau=0.5")
    code, _, err = run(capsys, *argv, "--json")
    assert code == 0, err
    from jointrag.config import load_config
    from jointrag.train import load_trained
    from jointrag.methods.systems import rag_system

    _, trained = load_trained(out / "checkpoint")
    base = rag_system(load_config(str(out / "checkpoint" / "config.yaml")))
    before, after = dict(base.named_parameters()), dict(trained.named_parameters())
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and all(name.startswith("retriever.query_encoder.") for name in changed)


# --- the precomputed LM scores --------------------------------------------------------------------


def lsr_argv(files, index_dir, tiny_dir, out, scores, *sets):
    return train_argv(files, index_dir, tiny_dir, out, "ra-dit-lsr", 2, f"method.lm_scores={scores}", "method.lm_tau=0.5", *sets)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_lm_scores_are_computed_once_and_reused(capsys, files, index_dir, tiny_dir, tmp_path):
    scores = tmp_path / "scores.jsonl"
    assert main(lsr_argv(files, index_dir, tiny_dir, tmp_path / "a", scores)) == 0
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert lines[0]["jointrag"] == "lm-scores" and lines[0]["k"] == 3
    assert {r["id"] for r in lines[1:]} == {q["id"] for q in QA}  # 2 steps x batch 2 visit all four
    assert all(len(r["passages"]) == len(r["logp"]) == 3 and all(v < 0 for v in r["logp"]) for r in lines[1:])
    written = scores.stat().st_mtime_ns
    assert main(lsr_argv(files, index_dir, tiny_dir, tmp_path / "b", scores)) == 0
    assert scores.stat().st_mtime_ns == written  # nothing was missing: not rewritten
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    online = tmp_path / "online"
    assert main(train_argv(files, index_dir, tiny_dir, online, "ra-dit-lsr", 2, "method.lm_tau=0.5")) == 0
    assert losses(online)[0] == pytest.approx(losses(tmp_path / "a")[0], rel=1e-3)  # same model at step 1


def test_lm_scores_of_another_generator_are_refused(capsys, files, index_dir, tiny_dir, tmp_path):
    scores = tmp_path / "scores.jsonl"
    assert main(lsr_argv(files, index_dir, tiny_dir, tmp_path / "a", scores)) == 0
    lines = scores.read_text().splitlines()
    first = json.loads(lines[1])
    first["logp"] = [v - 5.0 for v in first["logp"]]
    scores.write_text("\n".join([lines[0], json.dumps(first), *lines[2:]]) + "\n")
    assert_user_error(capsys, *lsr_argv(files, index_dir, tiny_dir, tmp_path / "b", scores), names=(str(scores), "generator"))


@pytest.mark.parametrize("edit, names", [
    (lambda lines: lines[:1] + ["{not json"] + lines[2:], (":2:", "JSON")),
    (lambda lines: lines[:1] + ['{"id": "q1", "question": "x", "answer": "y", "passages": ["p0"], "logp": []}'] + lines[2:],
     (":2:", "same length")),
    (lambda lines: [json.dumps({**json.loads(lines[0]), "k": 7})] + lines[1:], (":1:", "'k'")),
])
def test_a_bad_score_file_names_file_and_line(capsys, files, index_dir, tiny_dir, tmp_path, edit, names):
    scores = tmp_path / "scores.jsonl"
    assert main(lsr_argv(files, index_dir, tiny_dir, tmp_path / "a", scores)) == 0
    scores.write_text("\n".join(edit(scores.read_text().splitlines())) + "\n")
    kept = scores.read_text()
    assert_user_error(capsys, *lsr_argv(files, index_dir, tiny_dir, tmp_path / "b", scores), names=(str(scores), *names))
    assert scores.read_text() == kept  # a refused file is left as it was


# --- corpus-derived examples ----------------------------------------------------------------------


def test_corpus_examples_split_a_passage_and_exclude_it(files, index_dir, tiny_dir, tmp_path):
    from jointrag.data.qa import corpus_examples

    trainer = trainer_for(files, index_dir, tiny_dir, tmp_path, "ra-dit-lsr", "method.corpus_ratio=0.5", "method.corpus_words=3")
    task_ids = {q["id"] for q in QA}
    derived = [e for e in trainer.train_examples if e.id not in task_ids]
    assert len(derived) == len(QA)  # ratio 0.5: as many as the task examples
    corpus = trainer.system.index.corpus
    for example in derived:
        words = corpus[corpus.row_of(example.exclude[0])].text.split()
        assert example.question == " ".join(words[:3]) and example.answers == (" ".join(words[-3:]),)
    rows = trainer.objective.search(trainer.system, derived)
    for example, passages in zip(derived, trainer.system.passages(rows)):
        ids = [p.id for p in passages if p is not None]
        assert len(ids) == 3 and example.exclude[0] not in ids
    assert math.isfinite(trainer.objective(trainer.system, derived[:2]).loss.item())
    again = corpus_examples(corpus, 20, 3, seed=0)
    assert len(again) == 20 and len({e.id for e in again}) == len(corpus)  # fewer passages than asked: repeats
    with pytest.raises(Exception, match="corpus_words"):
        corpus_examples(corpus, 2, 500, seed=0)


@pytest.mark.parametrize("setting, names", [
    ("method.corpus_ratio=1", ("method.corpus_ratio", "below 1")),
    ("method.lsr_form=linear", ("method.lsr_form", "log")),
    ("method.lm_tau=0", ("method.lm_tau", "positive")),
])
def test_bad_ra_dit_settings_name_the_key(capsys, files, index_dir, tiny_dir, tmp_path, setting, names):
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, tmp_path / "run", "ra-dit-lsr", 1, setting), names=names)


# --- ensemble decoding ----------------------------------------------------------------------------


def test_ensemble_equals_a_brute_force_mixture(tiny_dir, passages):
    from jointrag.evaluation.evaluate import Retrieved, decode
    from jointrag.generation.generator import PromptTemplate, load_generator

    generator = load_generator(str(tiny_dir / "causal"), precision="fp32")
    torch.manual_seed(1)
    with torch.no_grad():  # peaked, prompt-dependent distributions (see test_decoding.py)
        for weight in generator.model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.2)
    template = PromptTemplate("Background: {passages}\n\nQ: {question}\nA:", "{title}: {text}")
    questions = ["What is the capital of France?", "Who won Super Bowl 50?", "What do plants make?"]
    retrieved = [Retrieved(passages[3 * i : 3 * i + 3], [0.9, 0.5 - 0.2 * i, 0.1]) for i in range(2)]
    retrieved.append(Retrieved(passages[6:8], [0.3, 0.2]))  # fewer passages than the others
    tau = 0.3
    examples = [Example(f"q{i}", question, ()) for i, question in enumerate(questions)]
    answers = decode(generator, template, examples, retrieved, method="ensemble", tau=tau, max_new_tokens=6, num_beams=1)
    for question, result, answer in zip(questions, retrieved, answers):
        prompts = [template.render(question, [p]) for p in result.passages]
        candidates = list(dict.fromkeys(generator.generate([prompt], max_new_tokens=6)[0] for prompt in prompts))
        p_r = np.exp(np.array(result.scores) / tau)
        p_r /= p_r.sum()

        def mixture(y: str) -> float:
            total = 0.0
            for prompt, weight in zip(prompts, p_r):
                logp, mask = generator.pair_logprobs([prompt], [y])  # one pair: no batching, no padding
                total += weight * math.exp((logp * mask).sum().detach().item())
            return total

        best = max(candidates, key=mixture)
        assert answer == best
        assert mixture(answer) == pytest.approx(max(mixture(y) for y in candidates))
    assert len(set(answers)) > 1


# --- the whole pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(files, index_dir, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ra-dit") / "run"
    argv = train_argv(files, index_dir, tiny_dir, out, "ra-dit", 2, f"data.test={files['qa']}", "eval.decode=ensemble",
                      "method.lm_tau=0.5", "method.lm_k=2", f"method.lm_scores={out / 'scores.jsonl'}",
                      "train.lr_retriever=0.01", "model.lora=true", "model.lora_r=2")
    assert main(argv) == 0
    return out


def test_pipeline_trains_both_stages_and_writes_the_ablation(pipeline_run):
    out = pipeline_run
    for stage in ("lm-ft", "r-ft"):
        assert torch.load(out / stage / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2
    lm = torch.load(out / "lm-ft" / "checkpoint" / "weights.pt", weights_only=True)
    r = torch.load(out / "r-ft" / "checkpoint" / "weights.pt", weights_only=True)
    assert lm and all(k.startswith("generator.") and "lora_" in k for k in lm)
    assert r and all(k.startswith("retriever.query_encoder.") for k in r)
    combined = torch.load(out / "checkpoint" / "weights.pt", weights_only=True)
    assert combined.keys() == lm.keys() | r.keys()
    table = out / "ablation" / "ensemble"
    rows = json.loads((table / "table.json").read_text())
    assert list(rows) == ["base", "LM-ft only", "R-ft only", "LM-ft + R-ft"]
    assert all(rows[row]["examples"] == len(QA) and 0 <= rows[row]["em"] <= 100 for row in rows)
    retrieval = [key for key in rows["base"] if "recall" in key or key.startswith("mrr")]
    for key in retrieval:  # LM-ft leaves the retriever alone
        assert rows["LM-ft only"][key] == rows["base"][key] and rows["LM-ft + R-ft"][key] == rows["R-ft only"][key]
    assert (table / "table.md").read_text().count("\n") == 6 and (table / "table.png").stat().st_size > 0
    assert len((table / "LM-ft_R-ft.jsonl").read_text().splitlines()) == len(QA)


def test_pipeline_checkpoint_answers_and_resume_skips_finished_stages(capsys, pipeline_run, files, tmp_path):
    code, out, err = run(capsys, "eval", "--checkpoint", pipeline_run / "checkpoint", "--data", files["qa"], "-k", "3",
                         "--max-new-tokens", "3", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    assert json.loads(out)["decode"] == "ensemble"
    rows = json.loads((pipeline_run / "ablation" / "ensemble" / "table.json").read_text())
    assert resume_finished_pipeline(pipeline_run) == rows  # the same models evaluated again


def test_pipeline_refuses_an_existing_run_and_a_trained_passage_tower(capsys, pipeline_run, files, index_dir, tiny_dir, tmp_path):
    test = f"data.test={files['qa']}"
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, pipeline_run, "ra-dit", 2, test), names=("--resume",))
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, tmp_path / "new", "ra-dit", 2, test,
                                          "model.train_passage_tower=true"), names=("query tower",))
