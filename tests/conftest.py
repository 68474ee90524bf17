"""Tiny randomly initialised models built from configs: no downloads, a few MB, fast on a CPU.

They share one byte-level BPE tokenizer trained in memory on the fixture texts, so any text
tokenises (no unknown words) and the tests exercise the same loading code as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from jointrag.types import Passage

PASSAGES = [
    Passage("p0", "Paris", "Paris is the capital and largest city of France."),
    Passage("p1", "Berlin", "Berlin is the capital of Germany and its largest city."),
    Passage("p2", "Rome", "Rome is the capital city of Italy, founded on seven hills."),
    Passage("p3", "Madrid", "Madrid is the capital of Spain, in the centre of the country."),
    Passage("p4", "Lisbon", "Lisbon is the capital of Portugal, on the Atlantic coast."),
    Passage("p5", "Vienna", "Vienna is the capital of Austria, on the river Danube."),
    Passage("p6", "Super Bowl 50", "The Denver Broncos won Super Bowl 50 against the Carolina Panthers."),
    Passage("p7", "Photosynthesis", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
QA = [
    {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"], "gold_ids": ["p0"]},
    {"id": "q2", "question": "Who won Super Bowl 50?", "answers": ["Denver Broncos"], "gold_ids": ["p6"]},
    {"id": "q3", "question": "What do plants make from light?", "answers": ["sugar"], "gold_ids": ["p7"]},
    {"id": "q4", "question": "What is the capital of Italy?", "answers": ["Rome"], "gold_ids": ["p2"]},
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [f"{p.title} {p.text}" for p in PASSAGES] + ["What is the capital of France? Answer: Paris"]
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>",
    )


@pytest.fixture(scope="session", autouse=True)
def one_faiss_thread():
    """Faiss's OpenMP threads spin for seconds on a busy machine; the tiny indexes need one."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory with `encoder/` (BERT), `causal/` (Llama) and `seq2seq/` (BART) tiny checkpoints."""
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    models_ = {
        "encoder": BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=256, pad_token_id=0)),
        "causal": LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "seq2seq": BartForConditionalGeneration(BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None)),
    }
    for name, model in models_.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture
def passages():
    return list(PASSAGES)


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """No test may build or read the default index in the real home. Not autouse (some tests use the
    real home's models): a module takes it with `pytestmark = pytest.mark.usefixtures("isolated_home")`."""
    monkeypatch.setenv("JOINTRAG_HOME", str(tmp_path / "home"))
    yield
    assert not (tmp_path / "home").exists()


def write_files(root: Path, qa: list[dict]) -> dict[str, Path]:
    """`root/corpus.jsonl` (the fixture passages) and `root/qa.jsonl` (`qa`)."""
    from cli_helpers import write_jsonl

    corpus = write_jsonl(root / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES])
    return {"corpus": corpus, "qa": write_jsonl(root / "qa.jsonl", qa)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """`corpus.jsonl` and `qa.jsonl` (`QA`), written once per module."""
    return write_files(tmp_path_factory.mktemp("train-files"), QA)


@pytest.fixture(scope="module")
def index_dir(files, tiny_dir, tmp_path_factory) -> str:
    """An exact index of the fixture passages, built once through the CLI and only read after."""
    from jointrag.cli import main

    out = tmp_path_factory.mktemp("train-index") / "index"
    assert main(["index", "--corpus", str(files["corpus"]), "--out", str(out), "--retriever", str(tiny_dir / "encoder"),
                 "--precision", "fp32"]) == 0
    return str(out)
