"""Cold items: catalogue items held out of every fit, for the cold-start protocol (``experiments/cold_start.py``).

``data.init_args.cold_items`` names a JSON file listing item ids (``[3, 17, ...]`` or ``{"items": [...]}``).
Every stage that reads the data sees the catalogue with those items removed from every user's sequence except
where one is the user's last item, the test target. So, under LC-Rec's leave-last-out split, no held-out item is in
a training sequence, a training interaction or a validation target, and a test user whose target is held out
keeps a history of ordinary items. Users left with fewer than three items are dropped (leave-last-out needs a
history, a validation and a test item). The items stay in the catalogue (their ids and text are unchanged): the
codebook codes them by cold start from their text, and the decoders can return them.

Negative samplers never draw them either (:func:`datamodules.negatives.sample_negatives`'s ``allowed``): a negative
is a training signal about the item.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from datamodules.catalogue import MIN_SEQUENCE_LENGTH, Catalogue, DataFormatError


def read_cold_items(path: str | Path, num_items: int) -> np.ndarray:
    """Sorted unique item ids of a cold-items file, each checked against the catalogue size."""
    path = Path(path)
    fix = 'a JSON list of catalogue item ids ([3, 17, ...]) or {"items": [...]}'
    if not path.is_file():
        raise DataFormatError(f"data.init_args.cold_items: {path} not found ({fix}).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err}); expected {fix}.") from None
    values = raw.get("items") if isinstance(raw, dict) else raw
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DataFormatError(f"{path}: expected {fix}.")
    items = np.unique(np.asarray(values, dtype=np.int64))
    bad = items[(items < 0) | (items >= num_items)]
    if len(bad):
        raise DataFormatError(
            f"{path}: item {int(bad[0])} is not a catalogue item (ids 0..{num_items - 1}); held-out items must "
            "exist in the item file."
        )
    return items


def hold_out_items(catalogue: Catalogue, items: np.ndarray) -> Catalogue:
    """The catalogue with ``items`` removed from every sequence except as a user's last item (see module doc)."""
    lengths = np.diff(catalogue.offsets)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    last = np.zeros(len(catalogue.items), dtype=bool)
    last[catalogue.offsets[1:][lengths > 0] - 1] = True
    keep = ~np.isin(catalogue.items, items) | last
    kept_lengths = np.bincount(owner[keep], minlength=len(lengths))
    users = kept_lengths >= MIN_SEQUENCE_LENGTH
    keep &= users[owner]
    new_lengths = kept_lengths[users]
    digest = hashlib.sha256(f"{catalogue.content_hash}|cold:{items.tolist()}".encode()).hexdigest()
    row_map = np.full(len(lengths), -1, dtype=np.int64)
    row_map[users] = np.arange(int(users.sum()))
    reviews = catalogue.reviews
    if reviews:  # a review of a held-out item would train its codes (the query task): dropped with the item
        cold = set(items.tolist())
        reviews = {(int(row_map[u]), i): text for (u, i), text in reviews.items() if row_map[u] >= 0 and i not in cold}
    return replace(
        catalogue,
        user_ids=catalogue.user_ids[users],
        offsets=np.concatenate([[0], np.cumsum(new_lengths)]).astype(catalogue.offsets.dtype),
        items=catalogue.items[keep],
        reviews=reviews,
        content_hash=digest,
        extras={**catalogue.extras, "cold_items": items, "cold_dropped_users": int((~users).sum())},
    )


def cold_items_of(catalogue: Catalogue) -> np.ndarray:
    """The catalogue's held-out item ids (empty when none)."""
    return np.asarray(catalogue.extras.get("cold_items", np.zeros(0, dtype=np.int64)), dtype=np.int64)


def allowed_items(catalogue: Catalogue) -> np.ndarray | None:
    """Items a negative sampler may draw: every item but the held-out ones (None: every item)."""
    cold = cold_items_of(catalogue)
    return None if cold.size == 0 else np.setdiff1d(np.arange(catalogue.num_items), cold)
