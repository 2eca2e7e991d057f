"""The items view for the Alignment Tokenization stage: one sample per catalogue item.

Each batch holds the items' behaviour embeddings (exported by the ID-model stage, e.g. DCCF's
``ItemEmbeddingExporter``) and their LLM embeddings (mean LLM input embedding over title + description)::

    {"item": [B], "embedding": [B, d], "llm_embedding": [B, D] (zeros without text), "has_text": [B] bool}

Training batches are shuffled; validation serves every item once, in order (the collision statistics need the
whole catalogue); predict serves the catalogue, or the new items of ``cold_start_items`` (text) and/or
``cold_start_embeddings`` (behaviour).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.artifacts import read_artifact, sha256_file
from datamodules.base import RecDataModule, Source
from datamodules.catalogue import Catalogue, DataFormatError
from datamodules.cold_items import cold_items_of
from datamodules.llm_embeddings import compute_llm_embeddings, item_texts, model_fingerprint
from datamodules.new_items import NewItems, read_new_items
from datamodules.split import LeaveLastOutSplit
from datamodules.synthetic import SyntheticSpec
from datamodules.text_grounding import (
    TextGrounding,
    TextGroundingError,
    TextGroundingSpec,
    TfidfEncoder,
    training_interactions,
)

log = logging.getLogger(__name__)

KIND = "item_embeddings"
EMBEDDING_FILE = "item_embeddings.pt"


def read_matrix(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    value = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(value, dict):  # {"item_embeddings": tensor} / {"embeddings": tensor}
        tensors = [value[key] for key in ("item_embeddings", "embeddings", "weight") if key in value]
        if not tensors:
            raise DataFormatError(
                f"{path}: a dict without an 'item_embeddings' or 'embeddings' tensor (keys: {sorted(value)})."
            )
        value = tensors[0]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise DataFormatError(f"{path}: expected a [num_items, dim] tensor, got {type(value).__name__}.")
    return value


def check_embeddings(matrix: torch.Tensor, rows: int | None, what: str) -> torch.Tensor:
    """Validate a ``[rows, dim]`` embedding matrix (shape, finiteness) and return it as float32."""
    if matrix.dim() != 2:
        raise DataFormatError(f"{what}: expected a 2-D [num_items, dim] matrix, got shape {list(matrix.shape)}.")
    if rows is not None and matrix.shape[0] != rows:
        raise DataFormatError(
            f"{what}: {matrix.shape[0]} rows but the catalogue has {rows} items (row i must be item i). Export the "
            "embeddings from a model trained on this dataset."
        )
    matrix = matrix.float()
    bad = torch.nonzero(~torch.isfinite(matrix).all(1)).flatten()
    if len(bad):
        shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if len(bad) > 10 else "")
        raise DataFormatError(
            f"{what}: {len(bad)} row(s) contain NaN or inf (rows {shown}). The model that exported them diverged; "
            "retrain it (lower lr) and export again."
        )
    return matrix


def load_item_embeddings(source: str | Path, catalogue: Catalogue) -> tuple[torch.Tensor, dict]:
    """Behaviour embeddings ``[num_items, dim]`` of the catalogue from an artifact directory or a bare file.

    A directory must be an ``item_embeddings`` artifact (:func:`datamodules.artifacts.read_artifact`) of this
    catalogue's dataset; a bare ``.pt`` / ``.npy`` file is checked by row count only.

    Returns:
        The matrix and its provenance (path, sha256, manifest) for downstream manifests.
    """
    path = Path(source)
    if path.is_dir():
        artifact = read_artifact(
            path,
            KIND,
            {"dataset": catalogue.fingerprint()},
            fix=(f"this run uses {catalogue.name}: export the embeddings from a model trained on this dataset"),
        )
        manifest = artifact.manifest
        file = artifact.file(manifest.get("file", EMBEDDING_FILE))
        digest = manifest["files"][file.name]
    elif path.is_file():
        manifest, file, digest = {}, path, sha256_file(path)
    else:
        raise FileNotFoundError(
            f"embeddings {path} not found. Set `data.init_args.embeddings` to the directory written by the ID model's "
            "ItemEmbeddingExporter (e.g. artifacts/games/dccf_embeddings) or to a [num_items, dim] .pt/.npy file."
        )
    matrix = check_embeddings(read_matrix(file), catalogue.num_items, str(file))
    return matrix, {"path": str(file.resolve()), "sha256": digest, "manifest": manifest}


class ItemSamples(Dataset):
    """Item rows of precomputed tensors; batches gathered in one indexing op (``__getitems__``).

    ``ids`` are the item ids of the rows served (default: every row, numbered from ``first_id``).
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        llm: torch.Tensor,
        has_text: torch.Tensor,
        first_id: int = 0,
        ids: torch.Tensor | None = None,
    ) -> None:
        self.embeddings, self.llm, self.has_text, self.first_id = embeddings, llm, has_text, first_id
        self.ids = ids

    def __len__(self) -> int:
        return self.embeddings.shape[0] if self.ids is None else len(self.ids)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        if self.ids is not None:
            rows_t = self.ids[rows_t]
        return {
            "item": rows_t + self.first_id,
            "embedding": self.embeddings[rows_t],
            "llm_embedding": self.llm[rows_t],
            "has_text": self.has_text[rows_t],
        }


class ItemDataModule(RecDataModule):
    """Catalogue items with their behaviour and LLM embeddings, for the codebook (tokenizer) stage.

    Args:
        data_dir: LC-Rec / raw Amazon directory (see :class:`datamodules.base.RecDataModule`).
        dataset: dataset name; inferred when the directory holds exactly one.
        source: ``auto``, ``lcrec``, ``amazon_raw`` or ``synthetic``.
        processed_dir: where raw Amazon files are converted to LC-Rec format.
        synthetic: shape of the synthetic dataset (``source: synthetic`` only).
        max_history: unused by this view (it builds no split); accepted so every stage shares one data config.
        batch_size: training batch size (items).
        eval_batch_size: validation/predict batch size.
        num_workers: DataLoader workers.
        seed: seed of the RecDataModule (shuffling is Lightning's).
        cold_items: items held out of every fit (see :class:`datamodules.base.RecDataModule`).
        embeddings: behaviour embeddings: an artifact directory (``item_embeddings.pt`` + ``manifest.json``)
            or a bare ``[num_items, dim]`` ``.pt`` / ``.npy`` file (also the LLM embeddings' cache
            ``<llm_cache_dir>/llm_embeddings.pt``, computed first: a codebook over item text embeddings, as LC-Rec's).
        llm_path: local Hugging Face model directory (tokenizer + weights) for the LLM embeddings; None
            disables them (every item then counts as without text).
        llm_cache_dir: cache of the LLM embeddings (default ``artifacts/llm_embeddings/<dataset>``).
        llm_batch_size: items tokenised and pooled per batch.
        llm_max_tokens: tokens per item text beyond which it is truncated.
        text_fields: item text fields pooled into the LLM embedding (the paper: title and description).
        cold_start_embeddings: ``[M, dim]`` behaviour embeddings of new items; ``predict`` then codes these
            (item ids ``num_items .. num_items + M - 1``) instead of the catalogue.
        cold_start_items: new ``item.json`` entries (ids ``num_items ..``, :mod:`datamodules.new_items`);
            ``predict`` codes them from their text (needs ``text_grounding``), with ``cold_start_embeddings``
            rows (same order) mixed in when given.
        text_grounding: ground the codebook input in item text (:mod:`datamodules.text_grounding`): sparse items
            lean on a text estimate of their behaviour embedding. Null: behaviour embeddings alone (the paper).
    """

    uses_split = False

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 1024,
        eval_batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        embeddings: str = "artifacts/synthetic/dccf_embeddings",
        llm_path: str | None = None,
        llm_cache_dir: str | None = None,
        llm_batch_size: int = 64,
        llm_max_tokens: int = 512,
        text_fields: list[str] | None = None,
        cold_start_embeddings: str | None = None,
        cold_start_items: str | None = None,
        text_grounding: TextGroundingSpec | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            dataset,
            source,
            processed_dir,
            synthetic,
            max_history,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            cold_items=cold_items,
        )
        self.embeddings = embeddings
        self.llm_path = llm_path
        self.llm_cache_dir = llm_cache_dir
        self.llm_batch_size = llm_batch_size
        self.llm_max_tokens = llm_max_tokens
        self.text_fields = list(text_fields or ["title", "description"])
        self.cold_start_embeddings = cold_start_embeddings
        self.cold_start_items = cold_start_items
        self.text_grounding = text_grounding
        self.grounding: TextGrounding | None = None
        self.item_embeddings: torch.Tensor | None = None
        self.cold_start: NewItems | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.item_embeddings is not None:
            return
        catalogue = self.catalogue
        n = catalogue.num_items
        texts = item_texts(catalogue.item_text, n, self.text_fields)
        _, train_items = LeaveLastOutSplit(catalogue, self.max_history).train_interactions()
        self.interactions = training_interactions(train_items, n)
        self.held_out = torch.zeros(n, dtype=torch.bool)
        self.held_out[torch.from_numpy(cold_items_of(catalogue))] = True
        if self.llm_path is not None and any(texts):
            cache = (
                Path(self.llm_cache_dir)
                if self.llm_cache_dir
                else Path("artifacts") / "llm_embeddings" / catalogue.name
            )
            self.llm_embeddings, self.has_text = compute_llm_embeddings(
                self.llm_path, texts, cache, self.llm_batch_size, self.llm_max_tokens
            )
        else:
            if self.llm_path is not None:
                log.warning("%s has no item text; LLM embeddings are skipped (every item lacks text)", catalogue.name)
            self.llm_embeddings, self.has_text = torch.zeros(n, 0), torch.zeros(n, dtype=torch.bool)
        # read after the LLM embeddings: `embeddings` may be their cache file (LC-Rec quantises the text embeddings,
        # configs/industrial/codebook_lcrec.yaml), which a first run writes just above
        self.behaviour_embeddings, self.embedding_source = load_item_embeddings(self.embeddings, catalogue)
        without = n - int(self.has_text.sum())
        if self.llm_path is not None and without:
            log.info(
                "%s: %d of %d items have no title/description; they are excluded from the LLM alignment loss",
                catalogue.name,
                without,
                n,
            )
        self.item_embeddings = self.behaviour_embeddings
        if self.text_grounding is not None:
            self._ground_in_text(texts)
        if self.cold_start_embeddings is not None or self.cold_start_items is not None:
            self.cold_start = self._new_items()
        self.datasets = {
            "items": ItemSamples(self.item_embeddings, self.llm_embeddings, self.has_text),
            "train": ItemSamples(
                self.item_embeddings, self.llm_embeddings, self.has_text, ids=torch.nonzero(~self.held_out).flatten()
            ),
        }
        if self.cold_start is not None:
            m = len(self.cold_start)
            self.datasets["cold_start"] = ItemSamples(
                self.cold_start.inputs,
                torch.zeros(m, self.llm_embeddings.shape[1]),
                torch.zeros(m, dtype=torch.bool),
                first_id=n,
            )

    def _new_items(self) -> NewItems:
        """The new items of ``cold_start_items`` / ``cold_start_embeddings`` and their codebook input."""
        n, dim = self.catalogue.num_items, self.behaviour_embeddings.shape[1]
        texts = None if self.cold_start_items is None else read_new_items(self.cold_start_items, n, self.text_fields)
        embeddings = None
        if self.cold_start_embeddings is not None:
            path = Path(self.cold_start_embeddings)
            if not path.is_file():
                raise FileNotFoundError(
                    f"cold_start_embeddings {path} not found (a [num_new_items, dim] .pt/.npy file)."
                )
            embeddings = check_embeddings(read_matrix(path), None if texts is None else len(texts), str(path))
            if embeddings.shape[1] != dim:
                raise DataFormatError(
                    f"{path}: dim {embeddings.shape[1]} != the catalogue embeddings' dim {dim}; export the new items' "
                    "embeddings from the same ID model."
                )
        if texts is None:
            return NewItems(n, embeddings, embeddings=embeddings)
        present = torch.tensor([bool(text) for text in texts])
        if embeddings is None and not bool(present.all()):
            item = n + int(torch.nonzero(~present)[0])
            raise DataFormatError(
                f"{self.cold_start_items}: new item {item} has no {' / '.join(self.text_fields)} and no behaviour "
                "embedding; give it text or set data.init_args.cold_start_embeddings."
            )
        if self.grounding is None:
            raise DataFormatError(
                f"{self.cold_start_items}: coding new items from text needs a text-grounded codebook; set "
                "data.init_args.text_grounding as the codebook was fitted, or give behaviour embeddings only."
            )
        if self.grounding.encoder is not None:
            features = self.grounding.features(texts)
        else:
            cache = Path(self.llm_cache_dir or Path("artifacts") / "llm_embeddings" / self.catalogue.name) / "new_items"
            features = compute_llm_embeddings(self.llm_path, texts, cache, self.llm_batch_size, self.llm_max_tokens)[0]
        behaviour = embeddings if embeddings is not None else torch.zeros(len(texts), dim)
        inputs = self.grounding.inputs(behaviour, features, torch.zeros(len(texts)), present)
        return NewItems(n, inputs, texts, embeddings, None if self.grounding.encoder is not None else features)

    def _ground_in_text(self, texts: list[str]) -> None:
        """Fit the text-to-behaviour map and replace the codebook input by the grounded one."""
        spec, catalogue = self.text_grounding, self.catalogue
        present = torch.tensor([bool(text) for text in texts])
        encoder, fingerprint = None, None
        if spec.encoder == "tfidf":
            fit_texts = [text for text, held in zip(texts, self.held_out.tolist(), strict=True) if not held]
            encoder = TfidfEncoder.fit(fit_texts, spec.tfidf_dim, spec.seed)
            features = encoder.transform(texts)
        else:
            if self.llm_dim == 0:
                raise TextGroundingError(
                    f"data.init_args.text_grounding.encoder: llm needs `data.init_args.llm_path` and item text "
                    f"({catalogue.name}); set it, or use encoder: tfidf."
                )
            features, present = self.llm_embeddings, self.has_text
            fingerprint = model_fingerprint(self.llm_path)
        fit_rows = (self.interactions >= spec.min_interactions) & present & ~self.held_out
        self.grounding = TextGrounding.fit(spec, features, self.behaviour_embeddings, fit_rows, encoder, fingerprint)
        self.text_features, self.text_present = features.float(), present
        self.item_embeddings = self.grounding.inputs(self.behaviour_embeddings, features, self.interactions, present)
        log.info(
            "text grounding (%s, %d-dim): map fitted on %d items; %d items coded from text alone (no training "
            "interaction), %d lean on text (< %d interactions)",
            spec.encoder,
            features.shape[1],
            int(fit_rows.sum()),
            int(((self.interactions == 0) & present).sum()),
            int(((self.interactions > 0) & (self.interactions < spec.min_interactions) & present).sum()),
            spec.min_interactions,
        )

    @property
    def llm_dim(self) -> int:
        return int(self.llm_embeddings.shape[1])

    @property
    def training_embeddings(self) -> torch.Tensor:
        """Codebook inputs of the items the codebook fits on (every item but the held-out cold items)."""
        return self.item_embeddings[~self.held_out]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["items"], self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(
            self.datasets.get("cold_start", self.datasets["items"]), self.eval_batch_size, shuffle=False
        )
