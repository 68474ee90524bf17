"""Tests for jointrag.memory: the estimates against hand computations, the failure message and its
suggestion, the skip switches, and the checks wired into the index build and the CLI."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import jointrag.memory as memory
from cli_helpers import assert_user_error, run, write_jsonl
from jointrag.errors import UserError
from jointrag.generation.generator import with_lora
from jointrag.memory import GIB, SKIP_ENV, available_bytes, check_memory, check_training_memory, training_estimate
from jointrag.retrieval.index import build_index, index_estimate
from jointrag.retrieval.encoders import load_retriever


@pytest.fixture
def no_memory(monkeypatch):
    """A machine with no memory free, and the skip switch off whatever the environment says."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)
    monkeypatch.delenv(SKIP_ENV, raising=False)


def test_exact_and_flat_hold_the_vectors():
    for kind in ("exact", "flat"):
        assert index_estimate(kind, 1_000_000, 768).parts == {"vectors": 1_000_000 * 768 * 4}


def test_hnsw_adds_its_graph():
    parts = index_estimate("hnsw", 1000, 64, {"M": 32}).parts
    # per node: 2M level-0 links and M/(M-1) upper-level links of 4 bytes, a level (4) and an offset (8)
    assert parts == {"vectors": 1000 * 64 * 4, "graph": round(1000 * (4 * (64 + 32 / 31) + 12))}


def test_ivfpq_holds_codes_centroids_and_its_training_sample():
    parts = index_estimate("ivfpq", 100_000, 768, {"nlist": 1024, "m": 96, "nbits": 8}).parts
    assert parts == {
        "codes and ids": 100_000 * (96 + 8),
        "centroids": (1024 + 256) * 768 * 4,
        "training sample": 65_536 * 768 * 4,  # 64 per list, and at least 256 per PQ centroid
        "training residuals": 65_536 * 768 * 4,
        "add batch": 100_000 * 768 * 4,
    }
    large = index_estimate("ivfpq", 10_000_000, 768, {"nlist": 4096, "m": 96, "nbits": 8}).parts
    assert large["training sample"] == 64 * 4096 * 768 * 4 and large["training residuals"] == 256 * 256 * 768 * 4
    assert index_estimate("ivfpq", 30_000, 768, {"nlist": 512, "m": 96, "nbits": 8}).parts["training sample"] == 30_000 * 768 * 4


def test_bm25_grows_with_the_text():
    parts = index_estimate("bm25", 10_000, None, text_bytes=6_000_000).parts
    assert parts == {"texts": 6_000_000 + 50 * 10_000, "token ids": 1_000_000 * 36, "score matrix": 1_000_000 * 8}


def test_training_estimate():
    estimate = training_estimate(parameters=135_000_000, trainable=100_000_000, param_bytes=4, precision="bf16",
                                 sequences=20, tokens=512, hidden=576, layers=30, vocab=49152, lora=False)
    logits = 20 * 32 * 49152 * 2 * 4
    assert estimate.parts == {
        "weights": 540_000_000,
        "master weights": 0,  # fp32 weights are their own masters
        "gradients": 400_000_000,
        "AdamW state": 800_000_000,
        "activations": 20 * (512 + 32) * 30 * 576 * 80 + logits,  # prompt and answer tokens; logits
    }
    bf16 = training_estimate(parameters=135_000_000, trainable=100_000_000, param_bytes=2, precision="bf16",
                             sequences=20, tokens=512, hidden=576, layers=30, vocab=49152, lora=False, checkpointing=True)
    assert bf16.parts == {
        "weights": 270_000_000,
        "master weights": 400_000_000,  # the optimiser's state is fp32 whatever the weights' dtype
        "gradients": 400_000_000,
        "AdamW state": 800_000_000,
        "activations": 20 * (512 + 32) * 576 * (30 * 2 + 80) + logits,  # each layer's bf16 input, one layer recomputed
    }
    assert "train.checkpointing=true" in estimate.suggestion and "train.checkpointing" not in bf16.suggestion
    fp32 = training_estimate(parameters=1, trainable=1, param_bytes=4, precision="fp32", sequences=1, tokens=1,
                             hidden=1, layers=1, vocab=1, lora=False)
    assert fp32.parts["activations"] == 33 * 96 + 32 * 2 * 4


# Measured by benchmarks/memory_calibration.py (SmolLM2-135M, 134.5M parameters, 30 layers, hidden 576,
# vocabulary 49152; full fine-tuning on the CPU, 1 thread): (sequences, prompt tokens, precision) ->
# (MiB the step added to the loaded model at its peak, MiB of activations: the forward+backward peak
# less the baseline and the gradients).
CALIBRATION = {
    (8, 128, "fp32"): (2117, 1439), (8, 256, "fp32"): (3738, 3224), (8, 512, "fp32"): (6455, 5942),
    (20, 128, "fp32"): (4745, 4232), (20, 256, "fp32"): (7996, 7483), (20, 512, "fp32"): (15976, 15463),
    (8, 128, "bf16"): (2676, 1251), (8, 256, "bf16"): (2495, 1982), (8, 512, "bf16"): (5259, 4746),
    (20, 128, "bf16"): (3575, 3062), (20, 256, "bf16"): (6716, 6202), (20, 512, "bf16"): (13464, 12951),
}


def test_the_training_estimate_covers_every_calibration_measurement():
    mib = 2**20
    for (sequences, tokens, precision), (step, activations) in CALIBRATION.items():
        estimate = training_estimate(parameters=134_515_008, trainable=134_515_008, param_bytes=4, precision=precision,
                                     sequences=sequences, tokens=tokens, hidden=576, layers=30, vocab=49152, lora=False)
        assert estimate.total - estimate.parts["weights"] >= step * mib, (sequences, tokens, precision)
        assert estimate.parts["activations"] >= activations * mib, (sequences, tokens, precision)  # LoRA: no gradients to spare


def test_the_failure_names_the_numbers_and_a_cheaper_index(monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    with pytest.raises(UserError) as error:
        check_memory(index_estimate("exact", 1_000_000, 768), available=GIB)
    message = str(error.value)
    assert message.startswith("an exact index of 1,000,000 x 768 float32 needs about 2.9 GiB (vectors 2.9 GiB), "
                              "but only 1.0 GiB of memory is available; use --kind ivfpq: with the default settings its index holds 0.1 GiB "
                              "and its build needs 1.2 GiB more for training and adding vectors. ")
    assert message.endswith(f"Set {SKIP_ENV}=1 to skip this check.")
    check_memory(index_estimate("exact", 1_000_000, 768), available=3 * GIB)


def test_the_skip_switch(monkeypatch):
    monkeypatch.setenv(SKIP_ENV, "1")
    check_memory(index_estimate("exact", 1_000_000, 768), available=GIB)
    monkeypatch.setenv(SKIP_ENV, "0")
    with pytest.raises(UserError):
        check_memory(index_estimate("exact", 1_000_000, 768), available=GIB)


def test_available_memory_with_and_without_psutil(monkeypatch):
    with_psutil = available_bytes("cpu")
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now fails: /proc/meminfo
    without = available_bytes("cpu")
    assert with_psutil > 0 and without > 0
    assert abs(with_psutil - without) < 0.5 * with_psutil


def test_training_check_counts_loaded_weights_once_and_suggests_lora(tiny_dir, monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "causal")
    weights = sum(p.numel() for p in model.parameters()) * 4
    estimate = memory.model_training_estimate(model, sequences=4, tokens=64, precision="fp32")
    assert estimate.parts["weights"] == estimate.loaded == weights
    assert estimate.parts["AdamW state"] == 2 * weights
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": estimate.total - weights)
    check_training_memory(model, batch_size=2, k=2, tokens=64, precision="fp32")
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": estimate.total - weights - 1)
    with pytest.raises(UserError, match=r"training 0M parameters \(0\.\dM trainable, fp32\) on 4 sequences of 64 tokens.*model\.lora=true"):
        check_training_memory(model, batch_size=2, k=2, tokens=64, precision="fp32")
    lora = with_lora(model, r=2, alpha=4, targets="all-linear")
    check_training_memory(lora, batch_size=2, k=2, tokens=64, precision="fp32")  # LoRA needs no AdamW state for the weights
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 0)
    with pytest.raises(UserError) as error:
        check_training_memory(lora, batch_size=2, k=2, tokens=64, precision="fp32")
    assert "model.lora" not in str(error.value) and "train.batch_size" in str(error.value)


def test_build_index_fails_fast_and_leaves_nothing(tmp_path, passages, tiny_dir, no_memory, monkeypatch):
    retriever = load_retriever(str(tiny_dir / "encoder"))
    encode, encoded = retriever.passage_encoder.encode, []
    monkeypatch.setattr(retriever.passage_encoder, "encode", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    with pytest.raises(UserError, match="an exact index of 8 x 32 float32 needs about"):
        build_index(passages, tmp_path / "index", retriever=retriever)
    assert not encoded and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="a bm25 index of 8 passages"):
        build_index(passages, tmp_path / "bm25", retriever=None, kind="bm25")
    assert len(build_index(passages, tmp_path / "index", retriever=retriever, memory_check=False).corpus) == 8
    monkeypatch.setenv(SKIP_ENV, "1")
    assert len(build_index(passages, tmp_path / "flat", retriever=retriever, kind="flat").corpus) == 8


def test_cli_index_check_and_flag(tmp_path, passages, tiny_dir, capsys, no_memory):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in passages])
    args = ["index", "--corpus", corpus, "--retriever", tiny_dir / "encoder", "--out", tmp_path / "index"]
    assert_user_error(capsys, *args, names=("needs about", "use --kind ivfpq", SKIP_ENV))
    code, out, err = run(capsys, *args, "--no-memory-check")
    assert code == 0, err
    assert "index of 8 passages" in out


def test_gpu_memory_is_read_from_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    assert 0 < available_bytes("cuda") <= torch.cuda.get_device_properties(0).total_memory
