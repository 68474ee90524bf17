"""`jointrag export`: a training checkpoint as directories that other tools load on their own.

A checkpoint holds only the trained tensors, named as the system's parameters, and needs jointrag and
the base models to be used. `export(checkpoint, out)` loads it as `eval --checkpoint` does (in fp32, so
the saved fp32 weights stay exact) and writes:

- `query_encoder/`, `passage_encoder/` (and `posterior_encoder/` for VRAG and JSA): sentence-transformers
  directories (a Transformer module with the weights and tokenizer, the tower's pooling, Normalize if it
  normalises) that give the tower's embeddings; a template that is an instruction prefix before the
  question or passage becomes the directory's default prompt. Tied towers are written twice and
  `export.json` says they are tied. Each holds `jointrag.json`; the query tower's names its passage
  tower, so `--retriever DIR/query_encoder` searches the index the checkpoint was trained with;
- `generator/` (and BGM's `bridge/`): a `save_pretrained` directory, ordinary safetensors even where the
  model came from a GGUF file; a LoRA model merged into full weights (or, `merge=False`, the base
  weights it was trained on), its adapter also in `generator_adapter/` as a peft directory whose base
  model is named portably (`portable_name`);
- `export.json`: what was exported, from which checkpoint and index, with the towers' fingerprints.

The directory is written beside `out` and moved into place when complete, replacing an earlier export.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

from torch import nn

from . import __version__
from .errors import UserError
from .generation.generator import Generator
from .io import staging_directory, swap_in, write_json
from .methods.invar_adapters import AdapterView
from .models import DEFAULT_GENERATOR, unquantized
from .retrieval.encoders import EXPORT_NOTE, Encoder
from .train.loop import load_trained

MANIFEST = "export.json"
HUB_IDS = {DEFAULT_GENERATOR: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the default generator's GGUF holds these weights, quantised
POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}
ALL_POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                     "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def export(checkpoint: str | Path, out: str | Path, *, merge: bool = True) -> dict:
    """Write the checkpoint's towers, generator (and bridge) into `out`; returns what `export.json` records,
    and `out`."""
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise UserError(f"--out {out} exists and is not an export directory; choose another --out")
    config, system = load_trained(checkpoint, precision="fp32")
    tmp = staging_directory(out)
    try:
        record = {"checkpoint": str(checkpoint), "method": config.method.name, "jointrag_version": __version__}
        record.update(export_system(system, tmp, merge=merge))
        write_json(tmp / MANIFEST, record)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), **record}


def export_system(system: nn.Module, out: Path, *, merge: bool) -> dict:
    """Write the parts of a loaded system into `out`; what was written, by part."""
    index = system.index
    retriever = index.retriever
    record: dict = {"index": {"directory": str(index.directory), "kind": index.kind,
                              "passage_fingerprint": (index.manifest["encoder"] or {}).get("fingerprint")}}
    if retriever is not None:
        towers = {
            "query_encoder": (retriever.query_encoder, retriever.query_template, "query", "passage_encoder"),
            "passage_encoder": (retriever.passage_encoder, retriever.passage_template, "document", None),
        }
        if getattr(system, "posterior", None) is not None:
            towers["posterior_encoder"] = (system.posterior, system.posterior_template, "query", "passage_encoder")
        record["towers"] = {name: export_tower(encoder, out / name, template, prompt_name, partner)
                            for name, (encoder, template, prompt_name, partner) in towers.items()}
        query, passage = record["towers"]["query_encoder"], record["towers"]["passage_encoder"]
        record["tied"] = query["fingerprint"] == passage["fingerprint"]
        record["index"]["accepts_passage_encoder"] = passage["fingerprint"] == record["index"]["passage_fingerprint"]
    record["generator"] = export_generator(system.generator, out / "generator", out / "generator_adapter", merge=merge)
    record["generator"]["prompt_template"] = dataclasses.asdict(system.template)
    if getattr(system, "bridge", None) is not None:
        record["bridge"] = export_generator(system.bridge.lm, out / "bridge", out / "bridge_adapter", merge=merge)
    return record


# --- towers -----------------------------------------------------------------------------------------


def prompt_of(template: str, field: str) -> str | None:
    """The instruction prefix of a template that is a constant text followed by its `field` alone
    ("query: {question}" -> "query: "), which sentence-transformers can prepend as a prompt; else None."""
    prefix, found, rest = template.partition("{" + field + "}")
    return prefix if found and not rest and "{" not in prefix and "}" not in prefix else None


def export_tower(encoder: Encoder, directory: Path, template: str, prompt_name: str, partner: str | None) -> dict:
    """Write `encoder` as a sentence-transformers directory (legacy module names, which sentence-transformers
    2 to 6 load); `partner`: the passage tower's directory beside it, which a query tower names."""
    model = plain_model(encoder.model, encoder.adapter)
    with unquantized(model):
        model.save_pretrained(directory)
    tokenizer = copy.deepcopy(encoder.tokenizer)
    tokenizer.padding_side = "right"  # as the tower pads: a left-padded causal model would see shifted positions
    tokenizer.save_pretrained(directory)
    if encoder.append_eos:
        end_with_eos(directory, tokenizer)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    write_json(directory / "modules.json", modules)
    write_json(directory / "sentence_bert_config.json", {"max_seq_length": encoder.max_length, "do_lower_case": False})
    (directory / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": encoder.dim, **{flag: False for flag in ALL_POOLING_FLAGS},
               POOLING_FLAGS[encoder.pooling]: True, "include_prompt": True}
    write_json(directory / "1_Pooling" / "config.json", pooling)
    field = "question" if prompt_name == "query" else "text"
    prompt = prompt_of(template, field)
    prompts = {prompt_name: prompt} if prompt else {}
    write_json(directory / "config_sentence_transformers.json", {
        "__version__": {"jointrag": __version__}, "prompts": prompts, "default_prompt_name": prompt_name if prompts else None,
        "similarity_fn_name": "cosine" if encoder.normalize else "dot",
    })
    trained = encoder.fingerprint()
    exported = trained if model is encoder.model else Encoder(
        model, encoder.tokenizer, name=str(directory), pooling=encoder.pooling, normalize=encoder.normalize,
        max_length=encoder.max_length, append_eos=encoder.append_eos).fingerprint()  # LoRA merged: other weights
    record = {"directory": directory.name, "base": encoder.name, "fingerprint": exported,
              "trained_fingerprint": trained, "template": template, "prompt": prompt, "pooling": encoder.pooling,
              "normalize": encoder.normalize, "max_length": encoder.max_length, "end_of_sequence": encoder.append_eos}
    write_json(directory / EXPORT_NOTE, {**record, **({"passage_encoder": f"../{partner}"} if partner else {})})
    return record


def end_with_eos(directory: Path, tokenizer) -> None:
    """Make the saved tokenizer end every text with its end-of-sequence token, whose state an LLM tower
    pools: jointrag appends it to the token ids, sentence-transformers appends nothing itself."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory}: the tower's tokenizer has no tokenizer.json to make end texts with end-of-sequence")
    backend = Tokenizer.from_file(str(path))
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, eos_id)])
    backend.post_processor = append if backend.post_processor is None else processors.Sequence([backend.post_processor, append])
    backend.save(str(path))
    if AutoTokenizer.from_pretrained(directory)("a")["input_ids"][-1:] != [eos_id]:
        raise UserError(f"{directory}: the exported tokenizer does not keep the end-of-sequence token it must append; "
                        "sentence-transformers would pool another token")


# --- generators -------------------------------------------------------------------------------------


def plain_model(model: nn.Module, adapter: str | None = None, *, merge: bool = True) -> nn.Module:
    """The transformers model under `model` (a peft model or an `AdapterView` unwrapped), its LoRA layers
    replaced by their base layers with adapter `adapter` (None: the active ones) merged into the weights,
    or with no adapter (`merge=False`). A model without LoRA layers is returned itself, not copied."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, AdapterView):
        model, adapter = model.module, model.adapter
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    plain = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, BaseTunerLayer)]:
        if merge:
            layer.merge(adapter_names=None if adapter is None else [adapter])
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer.get_base_layer())
    return plain


def portable_name(name: str) -> str:
    """A base model's name that means the same model elsewhere: the default generator's hub id, a hub id
    as it is, a local path's last part (never a path into this machine, such as the virtualenv)."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    path = Path(name).expanduser()
    return path.name if path.is_absolute() or path.exists() else name


def export_generator(generator: Generator, directory: Path, adapter_directory: Path, *, merge: bool) -> dict:
    """Write `generator` as a `save_pretrained` directory, and its LoRA adapter (if any) as a peft directory."""
    from peft import PeftModel

    lora = isinstance(generator.model, PeftModel)
    adapter = generator.adapter or (generator.model.active_adapter if lora else None)
    model = plain_model(generator.model, adapter, merge=merge)
    with unquantized(model):
        model.save_pretrained(directory)
    generator.tokenizer.save_pretrained(directory)
    record = {"directory": directory.name, "base": generator.name, "seq2seq": generator.seq2seq, "chat": generator.chat,
              "lora": lora, "merged": lora and merge}
    if lora:
        beside = f"../{directory.name}/ holds {'the adapter merged into those weights' if merge else 'those weights'}"
        record["adapter"] = export_adapter(generator.model, adapter, adapter_directory, generator.name, beside)
    return record


def export_adapter(model: nn.Module, adapter: str, directory: Path, base: str, beside: str) -> dict:
    """Write LoRA adapter `adapter` of the peft `model` as a peft directory (adapter_config.json,
    adapter_model.safetensors) whose `base_model_name_or_path` is `portable_name(base)`, with a README
    that names the base it was trained on and says (`beside`) where its exact weights are."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[adapter])
    trained_on = config.base_model_name_or_path
    config.base_model_name_or_path = portable_name(base)
    directory.mkdir()
    config.save_pretrained(directory)
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    save_file({name: w.detach().cpu().contiguous() for name, w in weights.items()}, directory / "adapter_model.safetensors")
    (directory / "README.md").write_text(
        f"# LoRA adapter exported by jointrag {__version__}\n\n"
        f"Trained on the base model `{base}`, loaded from `{trained_on}`. Its `base_model_name_or_path` names it "
        f"`{config.base_model_name_or_path}` so that it means the same on another machine; where the base came from a GGUF "
        f"file, training saw its de-quantised weights, which the hub model's differ from slightly: {beside}.\n"
    )
    return {"directory": directory.name, "name": adapter, "base_model_name_or_path": config.base_model_name_or_path,
            "trained_on": trained_on}
