"""Bi-encoder retriever: an untied query tower and passage tower over one index.

`search` (no gradient: encode queries, MIPS over the index) is kept apart from `score`
(differentiable scores of given candidates with the current query tower), because every training
method retrieves with the first and learns through the second (methods.md §7).

Shapes: B queries, K candidates, D embedding size.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError, local_path
from ..runtime import autocast
from ..models import (DEFAULT_GENERATOR, DEFAULT_RETRIEVER, default_generator_path, default_retriever_path, load_errors,
                      pretrained_location)
from ..types import Passage

POOLINGS = ("mean", "cls", "last")


def _sentence_transformers_settings(directory: Path) -> dict:
    """Pooling and normalisation declared by a sentence-transformers model directory, if it is one."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    settings: dict = {"normalize": any(m["type"].endswith("Normalize") for m in modules)}
    for module in modules:
        if module["type"].endswith("Pooling"):
            pooling = json.loads((directory / module["path"] / "config.json").read_text())
            mode = pooling.get("pooling_mode")  # sentence-transformers 6 writes one key, earlier ones a flag per mode
            if pooling.get("pooling_mode_cls_token") or mode == "cls":
                settings["pooling"] = "cls"
            elif pooling.get("pooling_mode_lasttoken") or mode == "lasttoken":
                settings["pooling"] = "last"
            else:
                settings["pooling"] = "mean"
    return settings


EXPORT_NOTE = "jointrag.json"  # what `jointrag export` records in a tower's directory


def paired_passage_tower(name_or_path: str | None) -> Path | None:
    """The passage tower a query tower exported by `jointrag export` was trained with: the directory
    its note (`EXPORT_NOTE`) names, beside it in the export. None for any other model."""
    note = Path(name_or_path or "").expanduser() / EXPORT_NOTE
    if not name_or_path or not note.is_file():
        return None
    try:
        partner = json.loads(note.read_text()).get("passage_encoder")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise UserError(f"{note}: not a JSON object as `jointrag export` writes ({error}); export the checkpoint again") from None
    if partner is None:
        return None
    path = (note.parent / partner).resolve()
    if not (path / "config.json").is_file():
        raise UserError(f"{note}: names the passage tower it was trained with, {partner}, which is missing ({path}); "
                        "keep the export directory whole")
    return path


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states (n, L, D) under an attention mask (n, L) into (n, D)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (n, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    # last non-padding token; works for left and right padding alike
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # (n,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def is_decoder_only(config) -> bool:
    """A decoder-only LM (Llama, Qwen, GPT-2...), as opposed to a BERT-like encoder: it has a causal-LM
    head class and no masked-LM one (BERT has both), and it is not an encoder-decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.model_type
    return (not config.is_encoder_decoder and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


class Encoder(nn.Module):
    """One tower: a Hugging Face encoder, a pooling, optional L2 normalisation, a text template.

    A decoder-only LM is a tower too (an LLM retriever): with `append_eos`, every text ends with the
    end-of-sequence token, whose state `last` pooling takes, since only the last token of a causal
    model has read the whole text (appended here, unless the tokenizer appends it itself, as an LLM
    tower exported by `jointrag export` does for sentence-transformers). Texts are right-padded, so
    padding never shifts positions. `adapter` names the LoRA adapter the tower runs when its model
    carries several (Invar-RAG's shared LLM): only that adapter's weights are the tower's to train and
    to fingerprint.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 256,
        append_eos: bool = False,
        adapter: str | None = None,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, not '{pooling}'")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.append_eos = append_eos
        self.adapter = adapter
        self._eos_from_tokenizer = append_eos and tokenizer("a")["input_ids"][-1:] == [tokenizer.eos_token_id]

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Differentiable embeddings (n, D) of `texts`."""
        if self.append_eos and not self._eos_from_tokenizer:
            ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length - 1)["input_ids"]
            rows = [row + [self.tokenizer.eos_token_id] for row in ids]
            batch = self.tokenizer.pad({"input_ids": rows}, padding_side="right", return_tensors="pt")
        else:
            batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   padding_side="right", return_tensors="pt")
        batch = batch.to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (n, L, D)
        embeddings = pool(hidden, batch["attention_mask"], self.pooling)
        if self.normalize:
            embeddings = nn.functional.normalize(embeddings, dim=-1)
        return embeddings

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, precision: str = "fp32", on_batch: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Embeddings (n, D) as float32, without gradient and without dropout.

        Texts are encoded in order of length so that a batch pads to similar lengths; the result is
        in the input order; `on_batch(n)` is called after each batch (progress bars). `precision="bf16"` runs the model under bf16 autocast: about twice as
        fast on CPUs with AVX512-BF16, cosine to the fp32 embeddings above 0.9999 on MiniLM.
        """
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        modes = [(module, module.training) for module in self.modules()]
        self.eval()  # search is deterministic: no dropout, even in the middle of training
        try:
            with autocast(self.device, precision):
                for start in range(0, len(texts), batch_size):
                    rows = order[start : start + batch_size]
                    out[rows] = self([texts[i] for i in rows]).float().cpu().numpy()
                    if on_batch is not None:
                        on_batch(len(rows))
        finally:
            for module, training in modes:
                module.training = training
        return out

    def fingerprint(self) -> str:
        """A hash of the weights and encoding settings: two encoders with the same fingerprint agree."""
        digest = hashlib.sha256(f"{self.pooling}|{self.normalize}|{self.max_length}{'|eos' if self.append_eos else ''}".encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if not runs(self, name):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def runs(encoder: Encoder, parameter: str) -> bool:
    """Whether the weight named `parameter` (in `encoder.model`) shapes the encoder's output: all do,
    except the LoRA weights of adapters other than the one the encoder runs."""
    return encoder.adapter is None or "lora_" not in parameter or f".{encoder.adapter}." in parameter


def load_encoder(
    name_or_path: str | None = None,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int = 256,
) -> Encoder:
    """Load a tower from a hub id, a local directory, a sentence-transformers directory or a GGUF file.

    `None` or "all-MiniLM-L6-v2" is the offline default; "SmolLM2-135M-Instruct" is the default
    generator as an LLM retriever. Pooling and normalisation default to what a sentence-transformers
    directory declares; for a decoder-only LM to `last` pooling of an appended end-of-sequence token and
    L2 normalisation; else mean pooling without normalisation.
    """
    from transformers import AutoModel, AutoTokenizer

    name = name_or_path or DEFAULT_RETRIEVER
    if name in (DEFAULT_RETRIEVER, f"sentence-transformers/{DEFAULT_RETRIEVER}"):
        path = default_retriever_path()
    elif name == DEFAULT_GENERATOR:
        path = default_generator_path()
    else:
        path = local_path(name, "retriever")
        name = str(path) if path.exists() else name  # an index manifest must name it from anywhere
    declared = _sentence_transformers_settings(path) if path.is_dir() else {}
    try:
        location, extra = pretrained_location(path, name)
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = AutoModel.from_pretrained(location, dtype=torch.float32, **extra)
    except load_errors() as error:
        raise UserError(f"cannot load retriever '{name}': {' '.join(str(error).split())}") from None
    llm = is_decoder_only(model.config)
    if llm and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pooling = pooling or declared.get("pooling", "last" if llm else "mean")
    return Encoder(
        model,
        tokenizer,
        name=name,
        pooling=pooling,
        normalize=declared.get("normalize", llm) if normalize is None else normalize,
        max_length=max_length,
        append_eos=llm and pooling == "last",
    )


def format_passage(passage: Passage, template: str) -> str:
    return template.format(title=passage.title, text=passage.text)


class BiEncoder(nn.Module):
    """Query tower and passage tower, untied, both starting from the same checkpoint.

    `query_template` and `passage_template` turn a question and a passage into the text a tower reads
    (instruction prefixes for LLM retrievers go there).
    """

    def __init__(
        self,
        query_encoder: Encoder,
        passage_encoder: Encoder | None = None,
        *,
        query_template: str = "{question}",
        passage_template: str = "{title}. {text}",
    ):
        super().__init__()
        self.query_encoder = query_encoder
        self.passage_encoder = passage_encoder if passage_encoder is not None else copy.deepcopy(query_encoder)
        self.query_template = query_template
        self.passage_template = passage_template

    def query_texts(self, questions: Sequence[str]) -> list[str]:
        return [self.query_template.format(question=q) for q in questions]

    def passage_texts(self, passages: Sequence[Passage]) -> list[str]:
        return [format_passage(p, self.passage_template) for p in passages]

    def encode_queries(self, questions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Query embeddings (B, D) without gradient, for search."""
        return self.query_encoder.encode(self.query_texts(questions), batch_size)

    def score(self, questions: Sequence[str], passage_embeddings: torch.Tensor) -> torch.Tensor:
        """Differentiable scores s(x, z) (B, K) of each question's K candidates (B, K, D)."""
        queries = self.query_encoder(self.query_texts(questions))  # (B, D)
        return torch.einsum("bd,bkd->bk", queries, passage_embeddings.to(queries.dtype))

    def identity(self) -> dict:
        """What an index built with this passage tower must record, and what loading checks."""
        tower = self.passage_encoder
        return {
            "name": tower.name,
            "fingerprint": tower.fingerprint(),
            "pooling": tower.pooling,
            "normalize": tower.normalize,
            "max_length": tower.max_length,
            "passage_template": self.passage_template,
            "query_template": self.query_template,
            "dim": tower.dim,
        }


def load_retriever(
    name_or_path: str | None = None,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int = 256,
    query_template: str = "{question}",
    passage_template: str = "{title}. {text}",
) -> BiEncoder:
    """A bi-encoder whose two towers start from the same checkpoint; for a query tower exported by
    `jointrag export`, its towers are that query tower and the passage tower it was trained with."""
    settings = {"pooling": pooling, "normalize": normalize, "max_length": max_length}
    encoder = load_encoder(name_or_path, **settings)
    partner = paired_passage_tower(name_or_path)
    passage = load_encoder(str(partner), **settings) if partner is not None else None
    return BiEncoder(encoder, passage, query_template=query_template, passage_template=passage_template)
