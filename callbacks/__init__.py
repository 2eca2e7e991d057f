"""Callbacks: metric files, artifact export, k-means initialisation, collision logging, beam-search evaluation."""

from callbacks.beam_eval import BeamSearchEvaluator
from callbacks.collisions import CollisionLogger
from callbacks.embedding_export import ItemEmbeddingExporter
from callbacks.index_export import CodeIndexExporter, assign_codes, load_code_index
from callbacks.kmeans_init import KMeansInit
from callbacks.llm_export import LLMExporter, export_llm, load_exported_llm
from callbacks.predictions import TopKWriter
from callbacks.results import MetricsWriter, load_metrics

__all__ = [
    "BeamSearchEvaluator",
    "CodeIndexExporter",
    "CollisionLogger",
    "ItemEmbeddingExporter",
    "KMeansInit",
    "LLMExporter",
    "MetricsWriter",
    "TopKWriter",
    "assign_codes",
    "export_llm",
    "load_code_index",
    "load_exported_llm",
    "load_metrics",
]
