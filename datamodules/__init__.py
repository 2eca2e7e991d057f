"""DataModules shared by every stage: catalogue, leave-last-out split and per-model views."""

from datamodules.base import RecDataModule
from datamodules.catalogue import Catalogue, DataFormatError, DatasetStatistics, load_lcrec, write_lcrec
from datamodules.graph import GraphDataModule
from datamodules.item_index import ItemIndex, load_item_index
from datamodules.items import ItemDataModule, load_item_embeddings
from datamodules.lcrec_tasks import LCRecTaskWeights
from datamodules.p5_prompts import P5DataModule
from datamodules.prompt_tasks import TaskWeights
from datamodules.prompts import PromptDataModule
from datamodules.semantic_ids import SemanticIdDataModule
from datamodules.sequence import SequenceDataModule
from datamodules.split import LeaveLastOutSplit
from datamodules.synthetic import SyntheticSpec, write_synthetic

__all__ = [
    "Catalogue",
    "DataFormatError",
    "DatasetStatistics",
    "GraphDataModule",
    "ItemDataModule",
    "ItemIndex",
    "LCRecTaskWeights",
    "LeaveLastOutSplit",
    "P5DataModule",
    "PromptDataModule",
    "RecDataModule",
    "SemanticIdDataModule",
    "SequenceDataModule",
    "SyntheticSpec",
    "TaskWeights",
    "load_item_embeddings",
    "load_item_index",
    "load_lcrec",
    "write_lcrec",
    "write_synthetic",
]
