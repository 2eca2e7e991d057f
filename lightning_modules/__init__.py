"""LightningModules: the ID-based recommenders, the codebook tokenizer and the LLM (LoRA SFT, then GRPO), the
encoder-decoder baselines (TIGER, P5)."""

from lightning_modules.base import CheckpointMismatchError, CountingRecommender, IDRecommender
from lightning_modules.bert4rec import BERT4Rec
from lightning_modules.codebook import AlignmentTokenizer
from lightning_modules.dccf import DCCF
from lightning_modules.fmlp import FMLPRec
from lightning_modules.llm import GenerativeRecommender
from lightning_modules.metrics import TopKMetrics, rank_in_list, rank_of_target
from lightning_modules.popularity import MostPopular
from lightning_modules.rl import PreferenceOptimizer
from lightning_modules.sasrec import SASRec
from lightning_modules.seq2seq import P5, TIGER, Seq2SeqRecommender
from lightning_modules.transitions import TransitionCounts

__all__ = [
    "AlignmentTokenizer",
    "BERT4Rec",
    "CheckpointMismatchError",
    "CountingRecommender",
    "DCCF",
    "FMLPRec",
    "GenerativeRecommender",
    "IDRecommender",
    "MostPopular",
    "P5",
    "PreferenceOptimizer",
    "SASRec",
    "Seq2SeqRecommender",
    "TIGER",
    "TopKMetrics",
    "TransitionCounts",
    "rank_in_list",
    "rank_of_target",
]
