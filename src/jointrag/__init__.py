"""jointrag: train a dense retriever and a generator LM together, end to end."""

__version__ = "0.1.0"
