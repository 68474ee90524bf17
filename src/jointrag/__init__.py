"""jointrag: train a dense retriever and a generator LM together, end to end.

The Python API (`jointrag.api`: `open`, `Pipeline`, `build_index`, `examples`, `train`, `evaluate`)
is imported on first use, so that `import jointrag` loads no model library.
"""

__version__ = "0.1.0"

API = ("open", "Pipeline", "Hit", "Answer", "StreamedAnswer", "build_index", "examples", "evaluate", "train")


def __getattr__(name: str):
    # `import jointrag.x`, not `from . import x`: the latter asks this module for `x` first, calling back here
    if name == "train":  # the package jointrag.train, which is callable as the API's train (see its docstring)
        import jointrag.train

        return jointrag.train
    if name in API:
        import jointrag.api

        return getattr(jointrag.api, name)
    raise AttributeError(f"module 'jointrag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
