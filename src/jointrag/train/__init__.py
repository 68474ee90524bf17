"""Training: the shared loop (`loop.py`) and the builders that turn a config into its parts (`build.py`)."""

from .loop import Trainer, load_trained, train

__all__ = ["Trainer", "load_trained", "train"]
