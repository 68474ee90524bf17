"""Training: the shared loop (`loop.py`), the builders that turn a config into its parts (`build.py`),
the stages lent to multi-stage methods (`pipeline.py`), training from Python (`settings.py`), and the
gradient-variance analysis (`variance.py`).

Calling this package, `jointrag.train(config, **settings)`, trains (`jointrag.api.train`): the name
`jointrag.train` is both the Python API's function and this package, and importing the package binds
the name to it, so the package itself is made callable rather than one of the two shadowing the other.
"""

import sys
from types import ModuleType

from .loop import Trainer, load_trained, load_trained_index
from .run import train
from .settings import train_with

__all__ = ["Trainer", "load_trained", "load_trained_index", "train", "train_with"]


class _CallablePackage(ModuleType):
    def __call__(self, config=None, *, resume: bool = False, **settings) -> dict:
        """Train and return the final metrics: see `jointrag.api.train`."""
        return train_with(config, resume=resume, **settings)


sys.modules[__name__].__class__ = _CallablePackage
