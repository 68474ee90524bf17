"""Evaluation: answering a QA set and scoring it (`evaluate`), and the plots of a run (`plot`)."""
