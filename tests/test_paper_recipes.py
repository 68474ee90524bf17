"""The paper-scale recipes (configs/paper/*.yaml, docs/paper-scale.md) on a tiny slice: each loads with
`load_config`, keeps the papers' settings it quotes, and trains for one step through `jointrag train` with
the tiny random models, the fixture questions and a tiny index in place of BART-large / Mistral-7B, NQ and
the 21M-passage index. Also: the DPR setting's two towers from two checkpoints (the question encoder's
`jointrag.json` naming the context encoder that built the index), `scripts/dpr_to_jsonl.py` and
`scripts/paper_plan.py`.

These recipes cannot run on the 2-core CPU of the sessions that wrote them; this tests their plumbing only.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_complete_run, run
from jointrag.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "paper").glob("*.yaml"))

pytestmark = [pytest.mark.usefixtures("isolated_home"), pytest.mark.slow]  # a training step per recipe: CI's make test-slow


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_recipes_load_and_keep_the_papers_settings():
    names = {path.stem for path in RECIPES}
    assert names == {"nq-rag-sequence", "nq-rag-token", "nq-vrag", "nq-jsa", "nq-rag-sequence-mistral", "nq-vrag-mistral",
                     "nq-jsa-mistral"}
    for path in RECIPES:
        config = load_config(str(path))
        assert config.data.train and config.data.dev and config.data.test, path
        assert config.model.index.startswith("indexes/psgs_w100-"), path
        assert config.train.precision == "bf16" and config.train.save_every, path
        if path.stem.endswith("-mistral"):  # JSA-RAG's setting (methods.md §3)
            assert config.model.generator.endswith("Mistral-7B-v0.1") and config.model.lora and config.model.lora_r == 8
            assert (config.train.lr_generator, config.train.lr_retriever, config.train.batch_size, config.train.steps) == (2e-5, 1e-5, 4, 20000)
            assert config.method.tau == 0.1 and config.train.checkpointing
        else:  # the RAG paper's (methods.md §1), with the authors' example script's optimiser settings
            assert config.model.generator.endswith("bart-large") and not config.model.lora
            assert config.model.retriever.endswith("dpr-question") and config.method.k in (5, 10)
            assert config.train.lr_generator == config.train.lr_retriever == 3e-5 and config.method.tau == 1.0
        if config.method.name == "jsa":
            assert (config.method.proposals, config.method.states, config.method.cache) == (50, "all", True)
    assert "{title} / {text}" in (ROOT / "configs" / "templates" / "rag-bart.yaml").read_text()


def tiny_slice(path: Path, files, index_dir, tiny_dir, out: Path, *extra: str) -> list[str]:
    """`jointrag train` of the recipe at `path` with the tiny models, data and index in place of the paper's."""
    generator = tiny_dir / ("causal" if path.stem.endswith("-mistral") else "seq2seq")
    sets = [f"model.index={index_dir}", "model.retriever=null", f"model.generator={generator}", f"data.train={files['qa']}",
            f"data.dev={files['qa']}", f"data.test={files['qa']}", "train.batch_size=2", "train.precision=fp32",
            "method.proposals=5", "eval.limit=2", "eval.max_new_tokens=3", *extra]
    return ["train", "--config", str(path), "--out", str(out), "--steps", "1"] + [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_recipe_trains_one_step_on_a_tiny_slice(capsys, monkeypatch, path, files, index_dir, tiny_dir, tmp_path):
    monkeypatch.chdir(ROOT)  # the recipes name their prompt templates from the repository root
    out = tmp_path / "run"
    code, _, err = run(capsys, *tiny_slice(path, files, index_dir, tiny_dir, out))
    assert code == 0, err
    assert_complete_run(out, 1)
    saved = load_config(str(out / "checkpoint" / "config.yaml"))
    recipe = load_config(str(path))
    assert (saved.method.name, saved.method.k, saved.method.tau, saved.model.lora, saved.model.max_prompt_tokens) == \
        (recipe.method.name, recipe.method.k, recipe.method.tau, recipe.model.lora, recipe.model.max_prompt_tokens)
    assert Path(saved.model.template) == (ROOT / recipe.model.template).resolve()
    weights = torch.load(out / "checkpoint" / "weights.pt", weights_only=True)
    if recipe.model.lora:  # only the adapters and the query towers trained: the 7B base stays frozen
        assert all("lora_" in name or name.startswith(("retriever.", "posterior.")) for name in weights)
    assert not any(name.startswith("retriever.passage_encoder.") for name in weights)  # the document encoder stays fixed


def test_the_dpr_setting_has_its_two_towers_from_two_checkpoints(capsys, monkeypatch, files, tiny_dir, tmp_path):
    """DPR's question and context encoders are two checkpoints: the index is built with the context
    encoder, and the recipe's model.retriever names the question encoder, whose jointrag.json names the
    context encoder as its passage tower (docs/paper-scale.md)."""
    monkeypatch.chdir(ROOT)
    ctx, question = tmp_path / "models" / "dpr-ctx", tmp_path / "models" / "dpr-question"
    shutil.copytree(tiny_dir / "encoder", ctx)
    shutil.copytree(tiny_dir / "encoder", question)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(question)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(question)
    (question / "jointrag.json").write_text(json.dumps({"passage_encoder": "../dpr-ctx"}))
    index = tmp_path / "indexes" / "psgs_w100-dpr"
    code, _, err = run(capsys, "index", "--corpus", files["corpus"], "--out", index, "--retriever", ctx, "--precision", "fp32")
    assert code == 0, err
    path = ROOT / "configs" / "paper" / "nq-rag-sequence.yaml"
    out = tmp_path / "run"
    argv = tiny_slice(path, files, index, tiny_dir, out, f"model.retriever={question}")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    from jointrag.train import load_trained

    _, system = load_trained(out / "checkpoint")
    towers = system.retriever
    ctx_weights = AutoModel.from_pretrained(ctx).state_dict()
    assert all(torch.equal(w, ctx_weights[name]) for name, w in towers.passage_encoder.model.state_dict().items())
    assert any(not torch.equal(w, ctx_weights[name]) for name, w in towers.query_encoder.model.state_dict().items())


def test_dpr_to_jsonl_streams_what_jointrag_reads_from_dpr_json(tmp_path, monkeypatch):
    from jointrag.data.qa import load_examples

    converter = script("dpr_to_jsonl")
    questions = [
        {"dataset": "nq", "question": "who wrote \"the iliad\"?", "answers": ["Homer"],
         "positive_ctxs": [{"title": "Iliad", "text": "The Iliad ... [x]", "score": 1, "passage_id": "628725"}],
         "negative_ctxs": [{"title": "Odyssey", "text": "long text " * 50, "passage_id": "9"}], "hard_negative_ctxs": []},
        {"question": "capital of france", "answers": ["Paris", "paris"], "positive_ctxs": [{"id": 12, "title": "", "text": ""}]},
        {"question": "no gold", "answers": ["x"]},
    ]
    source = tmp_path / "biencoder-nq-train.json.gz"
    with gzip.open(source, "wt", encoding="utf-8") as f:
        json.dump(questions, f, indent=1)
    monkeypatch.setattr(converter, "CHUNK", 7)  # objects cut across many reads
    target = tmp_path / "nq-train.jsonl"
    assert converter.main([str(source), str(target)]) == 0
    assert load_examples(target) == load_examples(source, "dpr")
    assert [e.gold_ids for e in load_examples(target)] == [("628725",), ("12",), ()]
    source.with_suffix("").write_text(json.dumps(questions)[:-40])
    with pytest.raises(SystemExit, match="truncated"):
        converter.convert(source.with_suffix(""), tmp_path / "bad.jsonl")


def test_paper_plan_prints_each_recipe_within_80_gb(capsys):
    planner = script("paper_plan")
    assert planner.main([]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| nq-")]
    assert {row[0].removeprefix("| ") for row in rows} == {p.stem for p in RECIPES}
    for row in rows:
        share = int(row[10].rstrip("%"))
        assert 0 < share < 100, row  # every layout fits an 80 GB GPU by the planner's (over-)estimate
        assert float(row[-1].rstrip(" |")) > 0
    assert "psgs_w100-dpr" in out and "psgs_w100-bge" in out
