"""`jointrag export` and the de-quantised GGUF copies, on the tiny models.

A JSA run with a LoRA generator (its query and posterior towers and the adapter train) is exported
through the CLI; each exported part is then loaded by the library that owns its format
(sentence-transformers, transformers, peft), without jointrag, and must give what the trained system
gives. The exported query tower searches the index the run trained with. A tiny GGUF file, written
here, holds one Q8_0 tensor, so loading it de-quantises.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_user_error, run, train_argv
from conftest import PASSAGES, QA, make_tokenizer
from jointrag.cli import main

pytestmark = pytest.mark.usefixtures("isolated_home")

QUESTIONS = [q["question"] for q in QA] + ["Which river flows through Vienna?", "Where is Lisbon?"]
PROMPTS = ["Title: Paris\nParis is the capital of France.\n\nQuestion: What is the capital of France?\nShort answer:",
           "Question: Who won Super Bowl 50?\nShort answer:"]
TARGETS = ["Paris", "Denver Broncos"]


@pytest.fixture(scope="module")
def checkpoint(files, index_dir, tiny_dir, tmp_path_factory) -> Path:
    """A 2-step JSA run whose generator trains a LoRA adapter."""
    out = tmp_path_factory.mktemp("export-run") / "run"
    assert main(train_argv(files, index_dir, tiny_dir, out, "jsa", 2, "model.lora=true", "model.lora_r=2",
                           "train.lr_generator=1e-2")) == 0
    return out / "checkpoint"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "model"
    argv = ["export", str(checkpoint), "--out", str(out), "--json"]
    assert main(argv) == 0
    return out, json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def trained(checkpoint):
    from jointrag.train import load_trained

    return load_trained(checkpoint, precision="fp32")[1]


def st_embeddings(directory: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(directory), device="cpu").encode(texts, convert_to_numpy=True)


def logprobs(generator) -> torch.Tensor:
    return generator.pair_logprobs(PROMPTS, TARGETS)[0].detach()


# --- export ---------------------------------------------------------------------------------------


def test_export_writes_every_part_and_says_what(capsys, checkpoint, exported, trained, index_dir):
    out, record = exported
    assert {p.name for p in out.iterdir()} == {"query_encoder", "passage_encoder", "posterior_encoder", "generator",
                                               "generator_adapter", "export.json"}
    assert record["checkpoint"] == str(checkpoint.resolve()) and record["method"] == "jsa"
    manifest = json.loads((Path(index_dir) / "manifest.json").read_text())
    assert record["index"]["directory"] == str(Path(index_dir).resolve())
    assert record["index"]["passage_fingerprint"] == manifest["encoder"]["fingerprint"]
    towers = record["towers"]
    assert towers["passage_encoder"]["fingerprint"] == manifest["encoder"]["fingerprint"]  # frozen: the tower that built it
    assert towers["query_encoder"]["fingerprint"] == trained.retriever.query_encoder.fingerprint() != manifest["encoder"]["fingerprint"]
    assert not record["tied"] and record["index"]["accepts_passage_encoder"]
    assert record["generator"]["lora"] and record["generator"]["merged"]
    assert json.loads((out / "query_encoder" / "jointrag.json").read_text())["passage_encoder"] == "../passage_encoder"
    code, stdout, err = run(capsys, "export", checkpoint, "--out", out)  # again, over the earlier export
    assert code == 0, err
    assert "tied" not in stdout and str(out / "generator_adapter") in stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_towers_give_the_same_embeddings_in_sentence_transformers(exported, trained):
    out, _ = exported
    retriever = trained.retriever
    queries = retriever.query_texts(QUESTIONS)
    passages = retriever.passage_texts(PASSAGES)
    posterior = trained.posterior_texts(QUESTIONS[:4], [q["answers"][0] for q in QA])
    for name, tower, texts in (("query_encoder", retriever.query_encoder, queries),
                               ("passage_encoder", retriever.passage_encoder, passages),
                               ("posterior_encoder", trained.posterior, posterior)):
        expected = tower.encode(texts)
        assert np.abs(st_embeddings(out / name, texts) - expected).max() < 1e-5, name


def test_generator_loads_in_transformers_and_its_adapter_in_peft(exported, trained, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jointrag.generation.generator import Generator

    out, record = exported
    expected = logprobs(trained.generator)
    merged = AutoModelForCausalLM.from_pretrained(out / "generator", dtype=torch.float32)
    assert not any("lora" in name for name in merged.state_dict())
    assert torch.allclose(logprobs(Generator(merged, trained.generator.tokenizer, name="merged")), expected, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "causal", dtype=torch.float32)
    assert not torch.allclose(logprobs(Generator(base, trained.generator.tokenizer, name="base")), expected, atol=1e-3)  # it trained
    adapter = json.loads((out / "generator_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "causal"  # portable: not the path it was trained from
    assert str(tiny_dir / "causal") in (out / "generator_adapter" / "README.md").read_text()
    assert record["generator"]["adapter"]["trained_on"] == str(tiny_dir / "causal")
    with_adapter = PeftModel.from_pretrained(base, out / "generator_adapter")
    assert torch.allclose(logprobs(Generator(with_adapter, trained.generator.tokenizer, name="peft")), expected, atol=1e-5)


def test_no_merge_writes_the_base_weights_the_adapter_was_trained_on(checkpoint, trained, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jointrag.generation.generator import Generator

    out = tmp_path / "model"
    assert main(["export", str(checkpoint), "--out", str(out), "--no-merge"]) == 0
    assert not json.loads((out / "export.json").read_text())["generator"]["merged"]
    exported = AutoModelForCausalLM.from_pretrained(out / "generator", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "causal", dtype=torch.float32).state_dict()
    assert all(torch.equal(w, base[name]) for name, w in exported.state_dict().items())
    with_adapter = PeftModel.from_pretrained(exported, out / "generator_adapter")
    expected = logprobs(trained.generator)
    assert torch.allclose(logprobs(Generator(with_adapter, trained.generator.tokenizer, name="peft")), expected, atol=1e-5)

def test_the_exported_query_tower_searches_the_index_it_was_trained_with(capsys, checkpoint, exported, index_dir):
    from jointrag.evaluation.evaluate import retrieve
    from jointrag.train import load_trained_index

    out, _ = exported
    code, stdout, err = run(capsys, "retrieve", "--index", index_dir, "--retriever", out / "query_encoder", "-k", 8, "--json", *QUESTIONS)
    assert code == 0, err
    got = json.loads(stdout)
    expected = retrieve(load_trained_index(checkpoint)[1], QUESTIONS, 8)
    for row, result in zip(got, expected):
        assert [p["id"] for p in row["passages"]] == [p.id for p in result.passages]
        assert [p["score"] for p in row["passages"]] == pytest.approx(result.scores, abs=1e-4)


def test_another_passage_tower_is_still_refused(capsys, exported, index_dir, tmp_path):
    out, _ = exported
    alone = tmp_path / "query_encoder"
    shutil.copytree(out / "query_encoder", alone)
    (alone / "jointrag.json").unlink()  # a trained query tower as its own passage tower: not the one that built the index
    assert_user_error(capsys, "retrieve", "--index", index_dir, "--retriever", alone, "who?", names=("built with passage encoder",))
    (alone / "jointrag.json").write_text(json.dumps({"passage_encoder": "../passage_encoder"}))
    assert_user_error(capsys, "retrieve", "--index", index_dir, "--retriever", alone, "who?",
                      names=("jointrag.json", "../passage_encoder", "missing"))


def test_export_refuses_a_directory_that_is_not_an_export(capsys, checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(capsys, "export", checkpoint, "--out", tmp_path, names=(str(tmp_path), "not an export directory"))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- parts on their own: an LLM tower, a prefix prompt, a seq2seq generator ----------------------------


def test_an_llm_tower_ends_texts_with_end_of_sequence_in_sentence_transformers(tiny_dir, tmp_path):
    """Last-token pooling of an appended end-of-sequence token, and a query instruction as the default prompt;
    jointrag reads the exported tower back without appending a second end-of-sequence token."""
    from jointrag.export import export_tower
    from jointrag.retrieval.encoders import load_encoder

    tower = load_encoder(str(tiny_dir / "causal"))
    assert tower.pooling == "last" and tower.append_eos and tower.normalize
    record = export_tower(tower, tmp_path / "q", "query: {question}", "query", None)
    assert record["prompt"] == "query: "
    texts = ["a", "What is the capital of France?", "Paris " * 40]  # unequal lengths: padding
    expected = tower.encode([f"query: {t}" for t in texts])
    assert np.abs(st_embeddings(tmp_path / "q", texts) - expected).max() < 1e-5
    reloaded = load_encoder(str(tmp_path / "q"))
    assert np.abs(reloaded.encode([f"query: {t}" for t in texts]) - expected).max() < 1e-5
    assert reloaded.fingerprint() == tower.fingerprint() == record["fingerprint"]


def test_a_seq2seq_generator_exports(tiny_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from jointrag.export import export_generator
    from jointrag.generation.generator import Generator, load_generator

    generator = load_generator(str(tiny_dir / "seq2seq"), precision="fp32")
    record = export_generator(generator, tmp_path / "generator", tmp_path / "adapter", merge=True)
    assert record["seq2seq"] and not record["lora"] and not (tmp_path / "adapter").exists()
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "generator", dtype=torch.float32)
    assert torch.allclose(logprobs(Generator(model, generator.tokenizer, name="exported")), logprobs(generator), atol=1e-6)


# --- GGUF: de-quantised once, and exportable ---------------------------------------------------------


def write_tiny_gguf(path: Path, seed: int, hidden: int = 32, layers: int = 2, heads: int = 2, ffn: int = 64) -> Path:
    """A tiny Llama GGUF file with the fixture tokenizer; its first FFN weight is stored as Q8_0."""
    import gguf

    state = json.loads(make_tokenizer().backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weight(f"blk.{i}.{name}.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        gate = (rng.standard_normal((ffn, hidden)) * 0.1).astype(np.float32)
        if i == 0:
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", gguf.quants.quantize(gate, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", gate)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    weight("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def direct_gguf(path: Path):
    """The GGUF file loaded by transformers itself, as jointrag loaded it before keeping copies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jointrag.generation.generator import Generator

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return Generator(model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), name=path.name)


@pytest.fixture
def gguf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "gguf-home"
    monkeypatch.setenv("JOINTRAG_HOME", str(home))
    return home


def assert_same_model(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[name], sb[name]) for name in sa)
    assert a.tokenizer(QUESTIONS)["input_ids"] == b.tokenizer(QUESTIONS)["input_ids"]
    assert torch.equal(logprobs(a), logprobs(b))


def test_a_gguf_generator_is_dequantised_once_and_comes_back_equal(tmp_path, gguf_home, monkeypatch):
    from jointrag import models
    from jointrag.generation.generator import load_generator

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    calls = []
    original = models._load_dequantized
    monkeypatch.setattr(models, "_load_dequantized", lambda path: calls.append(path) or original(path))
    first = load_generator(str(gguf), precision="fp32")
    second = load_generator(str(gguf), precision="fp32")
    assert len(calls) == 1  # the second load read the copy
    (folder,) = (gguf_home / "generators").iterdir()
    (copy,) = folder.iterdir()
    assert (copy / "model.safetensors").is_file() and "quantization_config" not in json.loads((copy / "config.json").read_text())
    direct = direct_gguf(gguf)
    assert_same_model(first, direct)
    assert_same_model(second, direct)

    write_tiny_gguf(gguf, seed=1)  # the file changes: same size, later modification time
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_generator(str(gguf), precision="fp32")
    assert len(calls) == 2
    assert_same_model(changed, direct_gguf(gguf))
    assert [p.name for p in folder.iterdir()] != [copy.name] and len(list(folder.iterdir())) == 1  # the stale copy is gone


def test_a_generator_loaded_from_gguf_exports_as_plain_tensors(tmp_path):
    """The model transformers loads from a GGUF file refuses save_pretrained; the export saves its
    de-quantised weights as ordinary safetensors, which load without the GGUF file."""
    from transformers import AutoModelForCausalLM

    from jointrag.export import export_generator
    from jointrag.generation.generator import Generator

    generator = direct_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", seed=0))
    with pytest.raises(ValueError, match="not serializable"):
        generator.model.save_pretrained(tmp_path / "refused")
    export_generator(generator, tmp_path / "generator", tmp_path / "adapter", merge=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "generator", dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert torch.equal(logprobs(Generator(model, generator.tokenizer, name="exported")), logprobs(generator))
    assert generator.model.hf_quantizer is not None  # the loaded model is left as it was


@pytest.mark.integration
@pytest.mark.slow  # two loads of the real GGUF: about a minute
def test_the_default_generator_comes_back_equal_from_its_copy(gguf_home):
    from jointrag.generation.generator import load_generator
    from jointrag.models import default_generator_path

    cached = load_generator(None, precision="fp32")
    assert any((gguf_home / "generators").iterdir())
    direct = direct_gguf(default_generator_path())
    assert cached.tokenizer.chat_template == direct.tokenizer.chat_template
    assert_same_model(cached, direct)


def test_an_invar_checkpoint_exports_its_tied_llm_towers_and_its_generation_adapter(files, index_dir, tiny_dir, tmp_path):
    """Invar-RAG's one LLM carries two LoRA adapters: the towers are the LLM's body with the retrieval
    adapter merged, the generator the LM with the generation adapter merged (and that adapter alone).
    The retrieval adapter, which this stage does not train, is set to random weights first, so merging
    the wrong adapter, or none, shows."""
    from transformers import AutoModelForCausalLM

    from jointrag.export import export_system
    from jointrag.generation.generator import Generator
    from jointrag.train import load_trained

    run_dir = tmp_path / "run"
    argv = ["train", "--method", "invar-generation", "--data", files["qa"], "--out", run_dir, "--steps", 1]
    for setting in (f"data.dev={files['qa']}", f"model.generator={tiny_dir / 'causal'}", f"model.index={tmp_path / 'llm-index'}",
                    "train.batch_size=2", "eval.limit=1", "eval.max_new_tokens=2", "eval.k=2", "train.precision=fp32",
                    f"invar.teacher={index_dir}", "invar.negatives=2", "method.lm_k=2", "invar.lora_r=2", "invar.pooling=last",
                    "train.lr_generator=1e-2"):
        argv += ["--set", setting]
    assert main([str(a) for a in argv]) == 0
    system = load_trained(run_dir / "checkpoint", precision="fp32")[1]
    torch.manual_seed(0)
    for name, parameter in system.generator.model.named_parameters():
        if "lora_B.retrieval" in name:
            parameter.data.normal_(0, 0.5)
    out = tmp_path / "export"
    out.mkdir()
    record = export_system(system, out, merge=True)
    assert record["tied"] and record["towers"]["query_encoder"]["end_of_sequence"]
    assert record["towers"]["query_encoder"]["prompt"] == "query: "  # the instruction prefix, as the default prompt
    assert json.loads((out / "generator_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "causal"
    texts = system.retriever.query_texts(QUESTIONS)
    assert np.abs(st_embeddings(out / "query_encoder", QUESTIONS) - system.retriever.query_encoder.encode(texts)).max() < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(out / "generator", dtype=torch.float32)
    assert torch.allclose(logprobs(Generator(merged, system.generator.tokenizer, name="merged")), logprobs(system.generator), atol=1e-5)
