"""Training: the shared loop (`loop.py`), the builders that turn a config into its parts (`build.py`),
the stages lent to multi-stage methods (`pipeline.py`), and the gradient-variance analysis (`variance.py`)."""

from .loop import Trainer, load_trained, load_trained_index
from .run import train

__all__ = ["Trainer", "load_trained", "load_trained_index", "train"]
