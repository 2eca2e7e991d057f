"""The base DataModule: owns the catalogue (users, items, optional text) and the leave-last-out split.

Views (sequence samples now; graph, items and prompts for the later stages) subclass it and add their
datasets. Input resolution happens in :meth:`RecDataModule.prepare_data` (rank 0: synthetic generation,
raw Amazon conversion) and :meth:`RecDataModule.setup` (every rank: load, validate, split), so every input
error is raised before the first training step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.catalogue import Catalogue, DataFormatError, find_lcrec_name, lcrec_paths, load_lcrec
from datamodules.cold_items import cold_items_of, hold_out_items, read_cold_items
from datamodules.errors import require
from datamodules.split import LeaveLastOutSplit
from datamodules.synthetic import SyntheticSpec, write_synthetic

log = logging.getLogger(__name__)

Source = Literal["auto", "lcrec", "amazon_raw", "amazon2023", "synthetic"]


def _raw_amazon_present(data_dir: Path, category: str | None) -> bool:
    from datamodules.amazon_raw import find_raw_files

    try:
        return find_raw_files(data_dir, category) is not None
    except DataFormatError:
        return False


class UnrepeatedSampler(DistributedSampler):
    """Evaluation shards: rank ``r`` of ``W`` takes rows ``r, r + W, r + 2W, ...``, so every row is seen exactly once.

    torch's ``DistributedSampler`` pads the shards with repeated rows to equal length, which would count some users
    twice in the metrics. It subclasses ``DistributedSampler`` so Lightning does not shard it a second time.

    Args:
        dataset: the evaluation dataset (needs ``len``); rank and world size come from ``torch.distributed``.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


class RecDataModule(L.LightningDataModule):
    """Catalogue + split shared by every model.

    Args:
        data_dir: directory with an LC-Rec dataset (``<Name>.inter.json`` ...), raw Amazon 2018 files
            (``<Category>.json[.gz]`` or ``<Category>_5.json[.gz]`` plus ``meta_<Category>.json[.gz]``), Amazon
            Reviews 2023 files (``<Category>.jsonl[.gz]`` plus ``meta_<Category>.jsonl[.gz]``),
            or, for ``source: synthetic``, where the synthetic dataset is written.
        dataset: dataset name (``<Name>`` / ``<Category>``); inferred when the directory holds exactly one.
        source: ``auto`` detects LC-Rec, raw Amazon 2018 or 2023 files; ``synthetic`` generates the embedded default.
        processed_dir: where raw Amazon files are converted to LC-Rec format (default ``<data_dir>/lcrec/<Category>``:
            one directory per category, so categories downloaded side by side do not overwrite each other).
        synthetic: shape of the synthetic dataset (``source: synthetic`` only).
        max_history: history cap of every sample (20 as in LC-Rec).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        num_workers: DataLoader workers.
        seed: seed for anything the view samples (negatives, shuffling is Lightning's).
        cold_items: JSON file of item ids held out of every fit (the cold-start protocol,
            :mod:`datamodules.cold_items`): they stay only as test targets and are coded by cold start.
    """

    #: Whether the view needs the leave-last-out split (the items view of the tokenizer stage does not).
    uses_split = True

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
    ) -> None:
        super().__init__()
        require(max_history >= 1, "data.init_args.max_history", ">= 1", max_history)
        require(batch_size >= 1, "data.init_args.batch_size", ">= 1", batch_size)
        require(eval_batch_size >= 1, "data.init_args.eval_batch_size", ">= 1", eval_batch_size)
        require(num_workers >= 0, "data.init_args.num_workers", ">= 0", num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.dataset = dataset
        self.source = source
        self.processed_dir = Path(processed_dir) if processed_dir else None
        self.synthetic = synthetic or SyntheticSpec()
        self.max_history = max_history
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cold_items = cold_items
        self.catalogue: Catalogue | None = None
        self.split: LeaveLastOutSplit | None = None

    # ----------------------------------------------------------------------------------- input resolution
    def _resolve(self) -> tuple[Path, str, str]:
        """Return (LC-Rec directory, dataset name, detected source) without loading anything."""
        if self.source == "synthetic":
            return self.data_dir, self.dataset or "Synthetic", "synthetic"
        if not self.data_dir.is_dir():
            raise DataFormatError(
                f"data_dir {self.data_dir} does not exist. Set `data.init_args.data_dir` to an LC-Rec or raw Amazon "
                "directory, or use `data.init_args.source: synthetic` for the embedded default."
            )
        if self.source in ("auto", "lcrec"):
            name = self.dataset or find_lcrec_name(self.data_dir)
            if name is not None and lcrec_paths(self.data_dir, name)["inter"].is_file():
                return self.data_dir, name, "lcrec"
            if self.source == "lcrec":
                raise DataFormatError(
                    f"{lcrec_paths(self.data_dir, name or '<Name>')['inter']}: file not found. Check "
                    "`data.init_args.data_dir` and `data.init_args.dataset`."
                )
        if self.source in ("auto", "amazon_raw") and _raw_amazon_present(self.data_dir, self.dataset):
            from datamodules.amazon_raw import find_raw_files

            category = find_raw_files(self.data_dir, self.dataset).category
            return self._converted_dir(category), category, "amazon_raw"
        if self.source == "amazon_raw":
            from datamodules.amazon_raw import find_raw_files

            find_raw_files(self.data_dir, self.dataset, required=True)  # raises the precise error
        if self.source in ("auto", "amazon2023"):
            from datamodules.amazon2023 import find_amazon2023_files

            raw = find_amazon2023_files(self.data_dir, self.dataset, required=self.source == "amazon2023")
            if raw is not None:
                return self._converted_dir(raw.category), raw.category, "amazon2023"
        raise DataFormatError(
            f"data_dir {self.data_dir} holds neither an LC-Rec dataset (<Name>.inter.json) nor raw Amazon 2018 files "
            "(<Category>.json[.gz] or <Category>_5.json[.gz] with meta_<Category>.json[.gz]) nor Amazon 2023 files "
            "(<Category>.jsonl[.gz] with meta_<Category>.jsonl[.gz]). Point "
            "`data.init_args.data_dir` at one of those, or set `data.init_args.source: synthetic`."
        )

    def _converted_dir(self, category: str) -> Path:
        return self.processed_dir if self.processed_dir is not None else self.data_dir / "lcrec" / category

    def prepare_data(self) -> None:
        """Rank-0 work: generate the synthetic dataset or convert raw Amazon (2018 or 2023) files, once, atomically."""
        directory, name, source = self._resolve()
        if source == "synthetic":
            write_synthetic(directory, self.synthetic, name=name)
        elif source == "amazon_raw":
            from datamodules.amazon_raw import convert_amazon_raw

            convert_amazon_raw(self.data_dir, name, directory)
        elif source == "amazon2023":
            from datamodules.amazon2023 import convert_amazon2023

            convert_amazon2023(self.data_dir, name, directory)

    def load_catalogue(self) -> Catalogue:
        """Resolve, prepare (if needed) and load the catalogue; usable outside a Trainer."""
        directory, name, source = self._resolve()
        if source in ("synthetic", "amazon_raw", "amazon2023"):
            single_process = not (torch.distributed.is_available() and torch.distributed.is_initialized())
            # Single process: (re)convert when inputs changed (a no-op when the manifest matches). Under DDP the
            # Trainer already ran prepare_data on rank 0 behind a barrier; other ranks must not write concurrently.
            if single_process or not lcrec_paths(directory, name)["inter"].is_file():
                self.prepare_data()
        catalogue = load_lcrec(directory, name)
        if self.cold_items is None:
            return catalogue
        held_out = hold_out_items(catalogue, read_cold_items(self.cold_items, catalogue.num_items))
        log.info(
            "%s: %d items held out of training (%s); %d users left with < 3 items dropped",
            catalogue.name,
            len(cold_items_of(held_out)),
            self.cold_items,
            held_out.extras["cold_dropped_users"],
        )
        return held_out

    def setup(self, stage: str | None = None) -> None:
        if self.catalogue is None:
            self.catalogue = self.load_catalogue()
            stats = self.catalogue.statistics()
            log.info("dataset %s: %s", self.catalogue.name, stats.as_dict())
            self.statistics = stats
            if self.uses_split:
                self.split = LeaveLastOutSplit(self.catalogue, self.max_history)
                self._log_repeated_targets()

    def _log_repeated_targets(self) -> None:
        """Count held-out targets that also occur earlier in the user's history (masked at full ranking)."""
        catalogue, split = self.catalogue, self.split
        for stage in ("valid", "test"):
            index = split.samples(stage)
            rows, items = split.seen_items(index, np.arange(len(index)))
            repeats = np.unique(rows[items == catalogue.items[index.target_pos][rows]]).size
            if repeats:
                log.warning(
                    "%s: %d %s targets also occur earlier in the user's history (history masking scores them as "
                    "misses; "
                    "set model `mask_history: false` to rank them).",
                    catalogue.name,
                    repeats,
                    stage,
                )

    # ---------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        if not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads with repeated samples; evaluation must see each user once.
            sampler = UnrepeatedSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity_collate,
            persistent_workers=self.num_workers > 0,
        )


def _identity_collate(batch):
    """Datasets here implement ``__getitems__`` and return a ready batch."""
    return batch
