"""Evaluation: answering a QA set and scoring it (`evaluate`), the plots of a run (`plot`), and paired
comparisons of evaluated runs (`compare`)."""
