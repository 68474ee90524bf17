import json
import shutil

import numpy as np
import pytest
import torch

from jointrag.errors import UserError
from jointrag.retrieval.encoders import load_encoder, load_retriever, pool


def test_pooling_against_hand_computed_values():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [7.0, 8.0], [1.0, 1.0]]])  # (2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # second row left-padded
    assert torch.allclose(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0], [4.0, 4.5]]))
    assert torch.allclose(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    assert torch.allclose(pool(hidden, mask, "last"), torch.tensor([[3.0, 4.0], [1.0, 1.0]]))


def test_encode_matches_forward_in_input_order(tiny_dir):
    encoder = load_encoder(str(tiny_dir / "encoder"))
    texts = ["short", "a much longer text than the others here", "middle sized text"]
    with torch.no_grad():
        expected = torch.cat([encoder([t]) for t in texts]).numpy()
    assert np.allclose(encoder.encode(texts, batch_size=2), expected, atol=1e-5)


def test_bf16_encoding_is_close_to_fp32(tiny_dir):
    encoder = load_encoder(str(tiny_dir / "encoder"), normalize=True)
    texts = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
    full, half = encoder.encode(texts), encoder.encode(texts, precision="bf16")
    assert (full * half).sum(1).min() > 0.99


def test_sentence_transformers_directory_settings(tiny_dir, tmp_path):
    directory = tmp_path / "st"
    shutil.copytree(tiny_dir / "encoder", directory)
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    encoder = load_encoder(str(directory))
    assert encoder.pooling == "cls" and encoder.normalize
    assert torch.allclose(encoder(["some text"]).norm(dim=-1), torch.ones(1))
    assert load_encoder(str(directory), pooling="mean", normalize=False).pooling == "mean"


def test_towers_are_untied_and_fingerprints_track_weights(tiny_dir):
    retriever = load_retriever(str(tiny_dir / "encoder"))
    before = retriever.passage_encoder.fingerprint()
    assert retriever.query_encoder.fingerprint() == before
    with torch.no_grad():
        next(retriever.query_encoder.parameters()).add_(1.0)
    assert retriever.passage_encoder.fingerprint() == before
    assert retriever.query_encoder.fingerprint() != before


def test_score_is_differentiable_for_the_query_tower_only(tiny_dir, passages):
    retriever = load_retriever(str(tiny_dir / "encoder"))
    with torch.no_grad():
        candidates = retriever.passage_encoder(retriever.passage_texts(passages[:4])).view(2, 2, -1)  # (B, K, D)
    scores = retriever.score(["capital of France?", "Super Bowl winner?"], candidates)
    assert scores.shape == (2, 2)
    scores.sum().backward()
    query_model = retriever.query_encoder.model
    assert query_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in query_model.encoder.parameters())
    assert all(p.grad is None for p in retriever.passage_encoder.parameters())


def test_unreadable_retriever_path_and_bad_pooling(tmp_path, tiny_dir):
    with pytest.raises(UserError, match="cannot load retriever"):
        load_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="pooling must be one of"):
        load_encoder(str(tiny_dir / "encoder"), pooling="max")
