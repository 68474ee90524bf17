"""Tests for Invar-RAG (methods.md §6): each loss term against brute force, the invariance term at 0
for identical views, the candidates, the one shared LLM (what each stage trains and leaves alone), the
LLM retriever as an ordinary retriever, and a tiny run of the whole pipeline through the CLI.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, resume_finished_pipeline, run, train_argv, write_jsonl
from conftest import QA
from jointrag.cli import main
from jointrag.methods.invar import alignment_kl, info_nce, invariance_kl
from jointrag.types import Example

NEG_INF = float("-inf")

pytestmark = pytest.mark.usefixtures("isolated_home")


# --- the three losses against brute force ---------------------------------------------------------


def softmax(values: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_info_nce_matches_brute_force():
    torch.manual_seed(0)
    scores = torch.randn(3, 5, dtype=torch.float64)
    positive = torch.tensor([0, 3, 2])
    allowed = torch.tensor([[True] * 5, [True, False, True, True, False], [False, True, True, True, True]])
    got = info_nce(scores, positive, allowed, 0.2)
    for b in range(3):
        kept = [(n, float(scores[b, n])) for n in range(5) if allowed[b, n]]
        probabilities = dict(zip([n for n, _ in kept], softmax([s for _, s in kept], 0.2)))
        assert float(got[b]) == pytest.approx(-math.log(probabilities[int(positive[b])]))


def test_alignment_and_invariance_match_brute_force():
    torch.manual_seed(1)
    small, llm, varied = (torch.randn(2, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    align = alignment_kl(small, llm, mask, 0.3, 0.1)
    invariance = invariance_kl(llm, varied, mask, 0.1)
    for b in range(2):
        columns = [k for k in range(4) if mask[b, k]]

        def p(x, tau):
            return softmax([float(x[b, k]) for k in columns], tau)

        assert float(align[b]) == pytest.approx(kl(p(small, 0.3), p(llm, 0.1)))
        assert float(invariance[b]) == pytest.approx(kl(p(llm, 0.1), p(varied, 0.1)))


def test_invariance_is_zero_for_identical_views():
    scores = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, True, True]])
    value = invariance_kl(scores, scores, mask, 0.05)
    assert torch.equal(value, torch.zeros(3))
    value.sum().backward()
    assert torch.equal(scores.grad, torch.zeros(3, 4))


# --- the system and the objective on tiny models --------------------------------------------------


def invar_config(files, index_dir, tiny_dir, tmp_path, method="invar-retrieval", *sets):
    from jointrag.config import load_config

    return load_config(None, [
        f"method.name={method}", f"model.index={tmp_path / 'llm-index'}", f"invar.teacher={index_dir}",
        f"data.train={files['qa']}", f"data.dev={files['qa']}", f"model.generator={tiny_dir / 'causal'}",
        f"out={tmp_path / 'run'}", "train.batch_size=3", "invar.negatives=2", "invar.lora_r=2", "eval.limit=2",
        "eval.max_new_tokens=3", "eval.k=3", "train.precision=fp32", "model.train_passage_tower=true",
        "train.lr_retriever=0.01", "train.lr_generator=0.01", *sets,
    ])


def trainer(config):
    from jointrag.train import Trainer

    return Trainer(config)


def prepared(t):
    t.objective.prepare(t.system, t.train_examples)
    return t


def test_one_base_model_serves_both_adapters(files, index_dir, tiny_dir, tmp_path):
    t = trainer(invar_config(files, index_dir, tiny_dir, tmp_path))
    system = t.system
    assert system.retriever.query_encoder is system.retriever.passage_encoder
    retriever = {id(p) for p in system.retriever.parameters()}
    generator = {id(p) for p in system.generator.parameters()}
    assert retriever <= generator  # the retriever's body is the generator's
    trainable = [name for name, p in system.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".retrieval." in name for name in trainable)
    assert [g["name"] for g in t.optimizer.param_groups] == ["retriever"]


def test_candidates_take_the_gold_else_an_answer_passage_and_clean_negatives(files, index_dir, tiny_dir, tmp_path):
    t = prepared(trainer(invar_config(files, index_dir, tiny_dir, tmp_path)))
    corpus = t.system.index.corpus
    batch = [Example("a", "What is the capital of France?", ("Paris",), gold_ids=("p0",)),
             Example("b", "Which capital is on the Danube?", ("Vienna",)),
             Example("c", "Which city is the capital of Atlantis?", ("Atlantis",))]
    rows, small = t.objective.candidates(t.system, batch)
    assert rows.shape == (3, 3) and small.shape == (3, 3)
    assert corpus[int(rows[0, 0])].id == "p0"
    assert "Vienna" in corpus[int(rows[1, 0])].text
    assert rows[2, 0] == -1  # no gold and no passage with the answer
    for b, example in enumerate(batch):
        negatives = [corpus[int(r)] for r in rows[b, 1:] if r >= 0]
        assert len(negatives) == 2
        assert all(p.id not in example.gold_ids and example.answers[0] not in p.text for p in negatives)
    # the small encoder's scores are its cosines
    questions = t.objective.small.retriever.encode_queries([e.question for e in batch])
    expected = np.einsum("bd,bkd->bk", questions, t.objective.small.embeddings(rows).numpy())
    assert np.allclose(small.numpy(), expected, atol=1e-5)


def test_the_objective_is_its_three_terms(files, index_dir, tiny_dir, tmp_path):
    t = prepared(trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "invar.w_align=0.5",
                                      "invar.w_invariance=2.0")))
    batch = t.sampler.next(3)
    output = t.objective(t.system, batch)
    m = output.metrics
    assert m["loss"] == pytest.approx(m["contrastive"] + 0.5 * m["align"] + 2.0 * m["invariance"], rel=1e-5)
    assert m["invariance"] > 0  # words dropped, windows resized: the views differ
    output.loss.backward()
    grads = [p.grad for name, p in t.system.named_parameters() if ".retrieval." in name and "lora_B" in name]
    assert grads and all(g is not None for g in grads)


def test_identical_views_give_zero_invariance(files, index_dir, tiny_dir, tmp_path):
    t = prepared(trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "invar.word_drop=0",
                                      "invar.window=1")))
    output = t.objective(t.system, t.sampler.next(3))
    assert output.metrics["invariance"] == 0.0


def test_rewrites_replace_the_dropped_words(files, index_dir, tiny_dir, tmp_path):
    rewrites = write_jsonl(tmp_path / "rewrites.jsonl", [{"id": "q0", "rewrite": "France's capital city?"}])
    t = prepared(trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", f"invar.rewrites={rewrites}",
                                      "invar.word_drop=0")))
    batch = [Example("q0", "What is the capital of France?", ("Paris",)), Example("q1", "Who won?", ("Denver",))]
    questions, _ = t.objective.vary(t.system, batch, [0])
    assert questions == ["France's capital city?", "Who won?"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "q0", "rewrite": "ok"}, {"id": "q1"}])
    t.objective.rewrites = str(bad)
    with pytest.raises(Exception, match=r"bad.jsonl:2: field 'rewrite'"):
        t.objective.prepare(t.system, [])


def test_resized_windows_keep_a_share_or_grow_by_the_next_passage_of_the_title(files, index_dir, tiny_dir, tmp_path):
    t = prepared(trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "invar.window=0.5")))
    corpus = t.system.index.corpus
    for _ in range(5):
        _, varied = t.objective.vary(t.system, [Example("x", "q", ("a",))], list(range(len(corpus))))
        for row, passage in enumerate(varied):
            words, original = passage.text.split(), corpus[row].text.split()
            assert len(words) >= round(0.5 * len(original))
            assert passage.text in corpus[row].text  # the fixture passages have distinct titles: windows only


def test_generation_stage_leaves_the_retrieval_adapter_and_the_base_alone(files, index_dir, tiny_dir, tmp_path):
    retrieval = trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "train.steps=2"))
    retrieval.run()
    checkpoint = tmp_path / "run" / "checkpoint"
    config = invar_config(files, index_dir, tiny_dir, tmp_path, "invar-generation", "train.steps=2",
                          f"model.index={tmp_path / 'run' / 'index'}", f"invar.adapter={checkpoint}",
                          "model.train_passage_tower=false", f"out={tmp_path / 'gen'}")
    generation = trainer(config)
    before = {name: p.detach().clone() for name, p in generation.system.named_parameters()}
    trained = torch.load(checkpoint / "weights.pt", weights_only=True)
    assert trained and all(torch.equal(before[name], w) for name, w in trained.items())  # the adapter was loaded
    assert [g["name"] for g in generation.optimizer.param_groups] == ["generator"]
    generation.run()
    after = dict(generation.system.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed and all("lora_" in name and ".generation." in name for name in changed)
    assert all(torch.equal(before[name], after[name].detach()) for name in trained)


def test_invar_settings_are_checked(files, index_dir, tiny_dir, tmp_path, capsys):
    from jointrag.errors import UserError

    with pytest.raises(UserError, match="model.train_passage_tower=true"):
        trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "model.train_passage_tower=false"))
    with pytest.raises(UserError, match="model.lora=false"):
        trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "model.lora=true"))
    with pytest.raises(UserError, match="invar.window"):
        invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "invar.window=1.5")
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "z", "title": "Z", "text": "Zurich is in Switzerland."}])
    small = tmp_path / "other-index"
    assert main([str(a) for a in ("index", "--corpus", other, "--out", small, "--retriever", tiny_dir / "encoder", "--precision", "fp32")]) == 0
    trainer(invar_config(files, index_dir, tiny_dir, tmp_path))  # builds the LLM index over the fixture corpus
    t = trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", f"invar.teacher={small}"))
    with pytest.raises(UserError, match="another corpus"):
        t.objective.prepare(t.system, [])


# --- the LLM retriever anywhere a retriever goes --------------------------------------------------


def test_a_decoder_only_lm_is_a_retriever(files, tiny_dir, tmp_path, capsys):
    from jointrag.retrieval.encoders import load_retriever

    retriever = load_retriever(str(tiny_dir / "causal"))
    tower = retriever.query_encoder
    assert (tower.pooling, tower.normalize, tower.append_eos) == ("last", True, True)
    texts = ["What is the capital of France?", "Who won Super Bowl 50 in the end?", "Plants?"]
    together = tower.encode(texts)
    alone = np.stack([tower.encode([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-5)  # padding changes nothing
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    out = tmp_path / "llm-index"
    code, _, err = run(capsys, "index", "--corpus", files["corpus"], "--out", out, "--retriever", tiny_dir / "causal",
                       "--precision", "fp32")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["pooling"] == "last" and manifest["encoder"]["normalize"] is True
    code, stdout, err = run(capsys, "retrieve", "--index", out, "-k", "2", "--json", "What is the capital of France?")
    assert code == 0, err
    assert len(json.loads(stdout)[0]["passages"]) == 2
    # inside another training method: RAG-Sequence trains the LLM retriever's query tower
    code, _, err = run(capsys, *train_argv(files, str(out), tiny_dir, tmp_path / "rag", "rag-sequence", 1))
    assert code == 0, err
    weights = torch.load(tmp_path / "rag" / "checkpoint" / "weights.pt", weights_only=True)
    assert any(name.startswith("retriever.query_encoder.") for name in weights)


# --- the pipeline through the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_run(files, index_dir, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("invar") / "run"
    argv = ["train", "--method", "invar-rag", "--data", files["qa"], "--out", out, "--steps", 2]
    for setting in (f"data.dev={files['qa']}", f"data.test={files['qa']}", f"model.generator={tiny_dir / 'causal'}",
                    "train.batch_size=2", "eval.limit=2", "eval.max_new_tokens=3", "eval.k=3", "train.precision=fp32",
                    f"invar.teacher={index_dir}", "invar.negatives=2", "method.lm_k=2", "invar.lora_r=2"):
        argv += ["--set", setting]
    assert main([str(a) for a in argv]) == 0
    return out


def test_pipeline_trains_both_stages_and_writes_the_table(pipeline_run):
    out = pipeline_run
    for stage in ("retrieval", "generation"):
        assert torch.load(out / stage / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2
    retrieval = torch.load(out / "retrieval" / "checkpoint" / "weights.pt", weights_only=True)
    generation = torch.load(out / "generation" / "checkpoint" / "weights.pt", weights_only=True)
    assert retrieval and all(".retrieval." in name for name in retrieval)
    assert generation and all(".generation." in name for name in generation)
    assert torch.load(out / "checkpoint" / "weights.pt", weights_only=True).keys() == retrieval.keys() | generation.keys()
    assert (out / "index-base" / "manifest.json").is_file() and (out / "retrieval" / "index" / "manifest.json").is_file()
    rows = json.loads((out / "table" / "top1" / "table.json").read_text())
    assert list(rows) == ["MiniLM (small encoder)", "LLM retriever, base", "after retrieval stage", "after generation stage"]
    assert all(rows[row]["examples"] == len(QA) for row in rows)
    recall = [key for key in rows["MiniLM (small encoder)"] if "recall" in key or key.startswith("mrr")]
    for key in recall:  # the generation stage leaves retrieval alone
        assert rows["after generation stage"][key] == rows["after retrieval stage"][key]
    assert (out / "table" / "top1" / "table.png").stat().st_size > 0


def test_pipeline_checkpoint_answers_and_refuses_a_second_run(capsys, pipeline_run, files, tmp_path):
    code, out, err = run(capsys, "eval", "--checkpoint", pipeline_run / "checkpoint", "--data", files["qa"], "-k", "3",
                         "--max-new-tokens", "3", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == len(QA)
    assert_user_error(capsys, "train", "--method", "invar-rag", "--data", files["qa"], "--out", pipeline_run,
                      "--set", f"data.dev={files['qa']}", "--set", f"data.test={files['qa']}", names=("--resume",))


def test_the_memory_check_counts_what_each_stage_runs(files, index_dir, tiny_dir, tmp_path, monkeypatch):
    from jointrag.train import loop

    seen = []
    monkeypatch.setattr(loop, "check_training_memory", lambda system, **kwargs: seen.append(kwargs))
    trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "invar-retrieval", "invar.max_length=40"))
    assert (seen[-1]["k"], seen[-1]["tokens"]) == (2 * (2 + 2), 40)  # queries and 1 + 2 candidates, both views
    trainer(invar_config(files, index_dir, tiny_dir, tmp_path, "ra-dit-lm", "method.lm_k=2", f"model.index={index_dir}",
                         "model.train_passage_tower=false"))
    assert (seen[-1]["k"], seen[-1]["tokens"]) == (2, 512)  # LM-ft: k' prompts of model.max_prompt_tokens


def test_pipeline_resume_skips_finished_stages_and_evaluates_the_same_models(pipeline_run):
    rows = json.loads((pipeline_run / "table" / "top1" / "table.json").read_text())
    assert resume_finished_pipeline(pipeline_run) == rows
