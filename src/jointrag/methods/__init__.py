"""Methods: one file per objective, and `METHODS`, the one registry of their names.

A method is one `Method` entry here (see `_base.Method`): its objective class and how it reads its
options from the run's config, the system it trains, whether it runs under torchrun and FSDP, its
stages if it is a pipeline, and its rows in `jointrag variance`. Nothing else in jointrag tests a
method's name: `config.py` takes the choices of `method.name` from here, the training loop, the
pipelines, `jointrag variance` and the CLI read the entries.
"""

from __future__ import annotations

from ..io import names
from . import bgm_pipeline, invar_pipeline, radit_pipeline
from ._base import Method, Objective, Stages
from .bgm import BGMPPO, BGMSupervised
from .bgm_bridge import bridge_system
from .invar import InvarRetrieval
from .invar_adapters import invar_system
from .jsa import JSA
from .radit import LSR, LMFinetune
from .rag import RagSequence, RagToken
from .systems import rag_system
from .vrag import VRAG

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "Objective", "Stages", "method"]

DEFAULT_METHOD = "jsa"  # the flagship


def _top_k(c) -> dict:
    return {"k": c.method.k, "tau": c.method.tau, "reduce": c.method.reduce}


def _lm_ft(c) -> dict:
    return {"k": c.method.lm_k, "reduce": c.method.reduce}


def _bgm(c) -> dict:
    b = c.bgm
    return {"k": c.method.k, "metrics": tuple(names(b.metrics)),
            "max_new_tokens": b.answer_tokens}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rag-sequence", "RAG-Sequence: -log sum_z p(z|x) p(y|x,z) over the prior's top-K", RagSequence, _top_k, rag_system,
           distributed=True, fsdp=lambda c: True, variance=(("rag-sequence", {}),)),
    Method("rag-token", "RAG-Token: -sum_t log sum_z p(z|x) p(y_t|x,z,y_<t)", RagToken, _top_k, rag_system,
           distributed=True, fsdp=lambda c: True, variance=(("rag-token", {}),)),
    Method("vrag", "VRAG: -ELBO with a posterior retriever q(z|x,y)", VRAG,
           lambda c: {**_top_k(c), "beta": c.method.beta, "estimator": c.method.estimator, "candidates": c.method.candidates,
                      "samples": c.method.proposals},
           rag_system, distributed=True, fsdp=lambda c: c.method.estimator == "enumerate",
           variance=(("vrag-enumerate", {"method.estimator": "enumerate"}), ("vrag-sample", {"method.estimator": "sample"}))),
    Method("jsa", "JSA-RAG: MIS with q as proposal, the chain's states as pseudo-labels", JSA,
           lambda c: {**_top_k(c), "proposals": c.method.proposals, "cache": c.method.cache, "states": c.method.states},
           rag_system, distributed=True, variance=(("jsa", {"method.cache": False}),)),
    Method("ra-dit", "RA-DIT: LM-ft and R-ft from the same base models, then the ablation table", system=rag_system,
           pipeline=lambda c, s: radit_pipeline.run(c, s, ("ra-dit-lm", "ra-dit-lsr")), outputs=radit_pipeline.OUTPUTS),
    Method("ra-dit-lm", "RA-DIT LM-ft: -sum_z log p(y|z∘x) over the top-k' passages", LMFinetune, _lm_ft, rag_system),
    Method("ra-dit-lsr", "RA-DIT R-ft: KL(p_R(z|x) || p_LSR(z|x,y)) of the frozen LM", LSR,
           lambda c: {**_top_k(c), "lm_tau": c.method.lm_tau, "form": c.method.lsr_form, "scores": c.method.lm_scores},
           rag_system, corpus_examples=True),
    Method("bgm", "BGM: the supervised and PPO stages, then the comparison with plain retrieval", system=bridge_system,
           pipeline=lambda c, s: bgm_pipeline.run(c, s, ("bgm-sl", "bgm-ppo")), outputs=bgm_pipeline.OUTPUTS),
    Method("bgm-sl", "BGM stage 1: the bridge learns silver passage sequences", BGMSupervised,
           lambda c: {**_bgm(c), "silver": c.bgm.silver, "tie_break": c.bgm.tie_break, "max_len": c.bgm.max_len,
                      "repeat": c.bgm.repeat},
           bridge_system),
    Method("bgm-ppo", "BGM stage 2: PPO on the bridge with the frozen LLM's score as reward", BGMPPO,
           lambda c: {**_bgm(c), "samples": c.bgm.samples, "clip": c.bgm.clip, "beta": c.bgm.beta, "epochs": c.bgm.epochs,
                      "temperature": c.bgm.temperature},
           bridge_system),
    Method("invar-rag", "Invar-RAG: the retrieval stage, the generation stage, then their table", system=invar_system,
           pipeline=lambda c, s: invar_pipeline.run(c, s, ("invar-retrieval", "invar-generation")),
           outputs=invar_pipeline.OUTPUTS, separate_retriever=False),
    Method("invar-retrieval", "Invar-RAG retrieval stage: InfoNCE, alignment and invariance losses on the LLM retriever",
           InvarRetrieval,
           lambda c: {"teacher": c.invar.teacher, "negatives": c.invar.negatives, "tau": c.invar.tau,
                      "teacher_tau": c.invar.teacher_tau, "w_contrastive": c.invar.w_contrastive, "w_align": c.invar.w_align,
                      "w_invariance": c.invar.w_invariance, "word_drop": c.invar.word_drop, "rewrites": c.invar.rewrites,
                      "window": c.invar.window},
           invar_system, separate_retriever=False),
    Method("invar-generation", "Invar-RAG generation stage: LM-ft on the generation adapter", LMFinetune, _lm_ft, invar_system,
           separate_retriever=False),
)}


def method(name: str) -> Method:
    """The registry entry called `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"no method called {name!r}; known: {', '.join(METHODS)}") from None
