"""Callbacks: metric files, artifact export, k-means initialisation, collision logging, beam-search evaluation."""

from callbacks.predictions import TopKWriter
from callbacks.results import MetricsWriter, load_metrics

__all__ = ["MetricsWriter", "TopKWriter", "load_metrics"]
