"""Retrieval metrics, the evaluation protocol, plots and reports."""
