"""Cold start: codes for items the codebook never trained on, unique against an index whose codes never change.

A new item's codebook input is what training would have given it (:mod:`datamodules.text_grounding`): with text
and no behaviour, the text estimate of its behaviour embedding; with both, the same shrinkage mix as a trained
item (``interactions`` says how much behaviour its embedding saw); with a behaviour embedding alone, that
embedding. It takes its nearest codes; a new item whose tuple is taken (by an indexed item or a closer new one)
moves to a free last-level code of its prefix, exactly as at export (``code_assignment.make_unique`` with the
indexed items fixed).

Two uses share :func:`code_against`: ``CodeIndexExporter`` codes the cold-start protocol's held-out items after
the trained ones at export, and :func:`assign_codes` extends an exported index with new items (or re-codes some,
for the protocol's comparisons), writing a new complete artifact whose manifest records every cold-start batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.artifacts import Artifact, ArtifactWriter, read_artifact
from datamodules.code_index import (
    CODE_VECTORS_FILE,
    CODEBOOK_FILE,
    INDEX_FILE,
    KIND,
    codes_to_tokens,
    collision_rate,
    shared_mask,
    tokens_to_codes,
)
from datamodules.errors import SemConvError
from datamodules.items import check_embeddings, read_matrix
from datamodules.text_grounding import TextGrounding
from lightning_modules.components.code_assignment import last_level_costs, make_unique, pair_costs
from lightning_modules.components.quantizer import Quantized, ResidualCodebook, build_quantizer

log = logging.getLogger(__name__)


class ColdStartError(SemConvError):
    """New items that cannot be coded as given (clashing ids, no input, inputs of another codebook)."""


@dataclass
class Codebook:
    """An exported codebook: its artifact, index, quantiser and (optional) text grounding."""

    artifact: Artifact
    index: dict[str, list[str]]
    state: dict[str, Any]
    quantizer: ResidualCodebook
    grounding: TextGrounding | None

    @property
    def directory(self) -> Path:
        return self.artifact.directory


def load_codebook(directory: str | Path) -> Codebook:
    """Read and verify a ``code_index`` artifact with everything needed to code new items."""
    artifact = read_artifact(directory, KIND)
    index = json.loads(artifact.file(INDEX_FILE).read_text(encoding="utf-8"))
    state = torch.load(artifact.file(CODEBOOK_FILE), map_location="cpu", weights_only=True)
    quantizer = build_quantizer(**state["quantizer_config"])
    quantizer.load_state_dict(state["quantizer_state"])
    quantizer.eval()
    grounding = state.get("text_grounding")
    return Codebook(
        artifact, index, state, quantizer, None if grounding is None else TextGrounding.from_state(grounding)
    )


def code_against(
    existing: torch.Tensor,
    new: Quantized | None,
    new_codes: torch.Tensor,
    quantizer: ResidualCodebook,
    state: dict[str, Any],
    llm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Codes of new items, unique against ``existing`` ``[n, T]`` codes, which never change.

    Args:
        existing: the indexed items' codes (``T`` is ``L``, or ``L + 1`` with an extra level).
        new: the new items' quantiser output (None: raw codes without a geometry, e.g. random; ties broken by row).
        new_codes: ``[m, L]`` the new items' raw codes.
        quantizer: the codebook (its last levels score the alternatives).
        state: ``codebook.pt``'s cost terms (``behaviour_weight``, ``llm_projection``, ``llm_mean``, ...).
        llm: optional ``[m, D]`` LLM embeddings of the new items (zero rows: no text) for the LLM cost term.

    Returns:
        ``[m, T]`` unique codes, the raw collision rate of the new items, and how many moved.
    """
    n, m, levels = len(existing), len(new_codes), quantizer.num_levels
    books = quantizer.codebooks.detach().cpu()
    if new is None:
        new_cost, pair_cost = (lambda rows: torch.zeros(len(rows), quantizer.codebook_size)), None
    else:
        use_llm = llm is not None and state.get("llm_projection") is not None and llm.shape[1] > 0
        new_cost = last_level_costs(
            new,
            books[-1],
            quantizer.distance,
            state["behaviour_weight"],
            projection=state["llm_projection"] if use_llm else None,
            llm_target=(llm - state["llm_mean"]) if use_llm else None,
            has_text=(llm.abs().sum(1) > 0) if use_llm else None,
            llm_weight=state["llm_alignment_weight"],
        )
        pair_cost = pair_costs(new, books[-2:], quantizer.distance) if levels >= 2 else None
    codes = torch.cat([existing[:, :levels], new_codes.long()])
    fixed = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
    fixed_extra = (
        torch.cat([existing[:, levels], torch.zeros(m, dtype=torch.long)]) if existing.shape[1] > levels else None
    )
    raw_rate = float(shared_mask(codes)[n:].float().mean()) if m else 0.0
    resolution = make_unique(
        codes,
        lambda rows: new_cost(rows - n),
        quantizer.codebook_size,
        fixed,
        fixed_extra,
        pair_cost=(lambda rows: pair_cost(rows - n)) if pair_cost else None,
    )
    return resolution.codes[n:], raw_rate, resolution.reassigned


def new_item_inputs(
    codebook: Codebook,
    count: int,
    embeddings: torch.Tensor | None = None,
    texts: list[str] | None = None,
    text_features: torch.Tensor | None = None,
    interactions: torch.Tensor | None = None,
    item_ids: list[int] | None = None,
) -> tuple[torch.Tensor, str]:
    """Codebook inputs ``[m, dim]`` of new items and what they came from (``text``, ``behaviour``, ``text+behaviour``).

    Raises:
        ColdStartError: an item with neither text nor a behaviour embedding, text given to a codebook fitted
            without text grounding, or inputs of another dimension than the codebook's.
    """
    dim = codebook.state["quantizer_config"]["dim"]
    ids = item_ids if item_ids is not None else list(range(count))
    if embeddings is not None:
        embeddings = check_embeddings(torch.as_tensor(embeddings), count, "new item embeddings")
        if embeddings.shape[1] != dim:
            raise ColdStartError(
                f"new item embeddings have dim {embeddings.shape[1]}, but {codebook.directory} was trained on "
                f"dim-{dim} behaviour embeddings: export them from the same ID model (stage 1)."
            )
    has_text = texts is not None or text_features is not None
    if not has_text:
        if embeddings is None:
            raise ColdStartError("new items need text (title/description) or a behaviour embedding; got neither.")
        return embeddings, "behaviour"
    grounding = codebook.grounding
    if grounding is None:
        raise ColdStartError(
            f"{codebook.directory} was fitted without text grounding, so it cannot code items from text: refit stage 2 "
            "with `data.init_args.text_grounding` set, or give the new items behaviour embeddings."
        )
    if text_features is None:
        text_features = grounding.features(texts)
    grounding.check_features(text_features)
    present = torch.tensor([bool(text) for text in texts]) if texts is not None else text_features.abs().sum(1) > 0
    missing = ~present if embeddings is None else torch.zeros(count, dtype=torch.bool)
    if bool(missing.any()):
        first = ids[int(torch.nonzero(missing)[0])]
        raise ColdStartError(
            f"new item {first}: no title/description and no behaviour embedding ({int(missing.sum())} such items). "
            "Give every new item text or an embedding (cold_start_embeddings)."
        )
    behaviour = embeddings if embeddings is not None else torch.zeros(count, dim)
    seen = torch.zeros(count) if interactions is None else torch.as_tensor(interactions).float()
    if embeddings is None:
        seen = torch.zeros(count)  # nothing behavioural to weigh: the text estimate alone
    source = "text" if embeddings is None else "text+behaviour"
    return grounding.inputs(behaviour, text_features, seen, present), source


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            continue
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


def assign_codes(
    codebook_dir: str | Path,
    embeddings: torch.Tensor | np.ndarray | str | Path | None = None,
    llm_embeddings: torch.Tensor | np.ndarray | None = None,
    output_dir: str | Path | None = None,
    raw_codes: torch.Tensor | None = None,
    texts: list[str] | None = None,
    text_features: torch.Tensor | None = None,
    interactions: torch.Tensor | None = None,
    items: list[int] | np.ndarray | None = None,
    codes: torch.Tensor | None = None,
    first_id: int | None = None,
    text_model: str | None = None,
) -> dict[str, list[str]]:
    """Give items codes without retraining, unique against the rest of the index, which never changes.

    New items get ids ``N .. N + M - 1`` after the ``N`` indexed ones. With ``items`` (indexed ids), those items
    are coded again instead (the cold-start protocol compares code sources for the same held-out items). The
    extended index and an updated manifest (``num_items``, a ``cold_start`` record) are written as a new complete
    artifact to ``output_dir`` (default: in place, replacing the old artifact whole once the new one is written).

    Args:
        codebook_dir: a ``CodeIndexExporter`` directory.
        embeddings: ``[M, dim]`` behaviour embeddings of the items (tensor, array or .pt/.npy path).
        llm_embeddings: optional ``[M, D]`` LLM embeddings (zero rows: no text); when the codebook was trained
            with LLM alignment they join the cost of re-assigning colliding items, as in training.
        output_dir: where to write the extended export (default: ``codebook_dir``).
        raw_codes: the items' nearest codes if already computed (``lightning predict``): checked, not trusted.
        texts: the items' text (title + description); needs a text-grounded codebook.
        text_features: the items' text features instead of ``texts`` (the ``llm`` encoder's embeddings).
        interactions: how many interactions each item's behaviour embedding saw (weighs it against the text).
        items: re-code these indexed items instead of adding new ones.
        codes: ``[M, L]`` raw codes to use as given (no input; e.g. random codes for a comparison).
        first_id: the id the caller numbered the first new item with; must be the index's next id.
        text_model: :func:`datamodules.llm_embeddings.model_fingerprint` of the LLM that made ``text_features``;
            must be the one the grounding was fitted with.

    Returns:
        The new index ``{"<item_idx>": [tokens]}`` (every item).
    """
    codebook = load_codebook(codebook_dir)
    out_dir = Path(output_dir or codebook_dir)
    manifest = dict(codebook.artifact.manifest)
    ids, existing = tokens_to_codes(codebook.index)
    n, quantizer = len(ids), codebook.quantizer
    if not torch.equal(ids, torch.arange(n)):
        raise ColdStartError(f"{codebook.directory / INDEX_FILE}: item ids must be 0..{n - 1}")
    if first_id is not None and items is None and first_id != n:
        raise ColdStartError(
            f"the new items are numbered from {first_id}, but {codebook.directory} already holds items 0..{n - 1}"
            + (" (it was extended before)" if first_id < n else "")
            + f": number them from {n}, or extend the index they were numbered against."
        )
    fitted = None if codebook.grounding is None else codebook.grounding.llm_fingerprint
    if text_features is not None and text_model is not None and fitted is not None and text_model != fitted:
        raise ColdStartError(
            f"the new items' text embeddings come from another LLM than {codebook.directory}'s text grounding was "
            "fitted with: set data.init_args.llm_path to the LLM the codebook used (its manifest's llm_path)."
        )
    if isinstance(embeddings, (str, Path)):
        embeddings = read_matrix(Path(embeddings))
    sizes = {len(v) for v in (embeddings, texts, text_features, codes) if v is not None}
    if len(sizes) != 1:
        raise ColdStartError(f"new items: give embeddings, texts, text_features or codes of one length (got {sizes}).")
    m = sizes.pop()
    targets = None if items is None else torch.as_tensor(np.asarray(items), dtype=torch.long)
    if targets is not None and (len(targets) != m or bool(((targets < 0) | (targets >= n)).any())):
        raise ColdStartError(f"items: {m} ids of indexed items (0..{n - 1}) expected to re-code, got {len(targets)}.")
    digest = _digest(embeddings if embeddings is None else torch.as_tensor(embeddings), texts, text_features, codes)
    for record in manifest.get("cold_start", []):
        if record.get("inputs_sha256") == digest and targets is None:
            raise ColdStartError(
                f"these items were already added as items {record['first_item']}..{record['last_item']} of "
                f"{codebook.directory}: an index is extended once per batch of new items (use that index, or start "
                "from the index before the first extension)."
            )
    if codes is None:
        x, source = new_item_inputs(codebook, m, embeddings, texts, text_features, interactions)
        with torch.no_grad():
            new = quantizer(x)
        new_codes = new.codes
        if raw_codes is not None and not torch.equal(raw_codes.cpu(), new_codes):
            raise ColdStartError(
                "predicted codes differ from the exported codebook's: predict with the checkpoint that was exported"
            )
    else:
        new, new_codes, source = None, torch.as_tensor(codes).long(), "given"
    keep = torch.ones(n, dtype=torch.bool)
    if targets is not None:
        keep[targets] = False
    llm = None if llm_embeddings is None else torch.as_tensor(llm_embeddings).float()
    coded, raw_rate, moved = code_against(existing[keep], new, new_codes, quantizer, codebook.state, llm)
    record: dict[str, Any] = {"count": m, "inputs_sha256": digest, "input": source}
    if targets is None:
        new_ids = list(range(n, n + m))
        record.update(first_item=n, last_item=n + m - 1)
        manifest["num_items"] = n + m
    else:
        new_ids = targets.tolist()
        record["items"] = new_ids
    record.update(raw_collision_rate=raw_rate, reassigned_items=moved)
    extended = dict(codebook.index)
    extended.update({str(item): tokens for item, tokens in zip(new_ids, codes_to_tokens(coded), strict=True)})
    all_codes = tokens_to_codes(extended)[1]
    manifest.pop("files")
    manifest["final_collision_rate"] = collision_rate(all_codes)
    manifest["cold_start"] = [
        *[r for r in manifest.get("cold_start", []) if targets is None or not set(r.get("items", [])) & set(new_ids)],
        record,
    ]
    with ArtifactWriter(out_dir, KIND) as writer:  # a new complete artifact, swapped in whole (also in place)
        writer.copy(CODEBOOK_FILE, codebook.artifact.file(CODEBOOK_FILE))
        writer.copy(CODE_VECTORS_FILE, codebook.artifact.file(CODE_VECTORS_FILE))
        writer.write_json(INDEX_FILE, {str(i): extended[str(i)] for i in range(len(extended))}, indent=None)
        writer.commit(manifest)
    log.info(
        "cold start: %d items coded from %s into %s (%.2f%% collided raw, %d re-assigned)",
        m,
        source,
        out_dir,
        100 * raw_rate,
        moved,
    )
    return extended
