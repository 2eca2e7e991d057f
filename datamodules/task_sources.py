"""Source tables of the alignment tasks, read from a catalogue: item texts and the reviews that become queries.

Plain functions of the catalogue and its split, used by :class:`datamodules.prompt_tasks.PromptTasks` (and its
presets) to build the text-alignment pairs and the query-alignment samples once, before any epoch is planned.
"""

from __future__ import annotations

import numpy as np

from datamodules.catalogue import Catalogue
from datamodules.prompt_templates import TEXT_KINDS, clean_text
from datamodules.split import LeaveLastOutSplit


def text_pairs(catalogue: Catalogue, cold_items: np.ndarray) -> tuple[dict[str, list[str]], np.ndarray, np.ndarray]:
    """The items' cleaned titles and descriptions, and the text-alignment samples they give.

    Args:
        catalogue: the dataset (its ``item_text``, if any).
        cold_items: items that get no text (held out by the cold-start protocol, or coded by cold start).

    Returns:
        ``texts`` (``"title"``/``"description"`` -> one string per item, empty when missing), and per sample its
        item and its kind (an index into :data:`datamodules.prompt_templates.TEXT_KINDS`), both ``int64``.
    """
    texts: dict[str, list[str]] = {"title": [""] * catalogue.num_items, "description": [""] * catalogue.num_items}
    items, kinds = [], []
    cold = set(cold_items.tolist())
    for item, fields in (catalogue.item_text or {}).items():
        if item in cold:
            continue
        for kind, (_, prompt_field, response_field) in enumerate(TEXT_KINDS):
            name = prompt_field or response_field
            if not texts[name][item]:
                texts[name][item] = clean_text(fields.get(name, ""))
            if texts[name][item]:
                items.append(item)
                kinds.append(kind)
    return texts, np.array(items, dtype=np.int64), np.array(kinds, dtype=np.int64)


def training_queries(catalogue: Catalogue, split: LeaveLastOutSplit) -> tuple[np.ndarray, list[str], int]:
    """Reviews of training interactions only (``items[:-2]``, never a validation or test target), as queries.

    A review of an item the user also has as a held-out target may describe that interaction: it is left out.

    Args:
        catalogue: the dataset (its ``reviews``, keyed by ``(user, item)``, if any).
        split: its leave-last-out split.

    Returns:
        The reviewed item and the review text of each kept review, and the number of non-empty reviews (0: the
        dataset has none).
    """
    reviews = {key: text.strip() for key, text in (catalogue.reviews or {}).items() if text and text.strip()}
    num_items = catalogue.num_items
    if not reviews:
        return np.zeros(0, dtype=np.int64), [], 0
    pairs = np.array(list(reviews), dtype=np.int64)
    train_users, train_items = split.train_interactions()
    held_out = np.concatenate([split.valid.target_pos, split.test.target_pos])
    held_users = np.concatenate([split.valid.user, split.test.user])
    keys = pairs[:, 0] * num_items + pairs[:, 1]
    keep = np.isin(keys, train_users * num_items + train_items) & ~np.isin(
        keys, held_users * num_items + catalogue.items[held_out]
    )
    texts = list(reviews.values())
    return pairs[keep, 1], [texts[i] for i in np.flatnonzero(keep)], len(pairs)
