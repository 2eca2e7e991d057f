"""Serving prompts for ``lightning predict``: every user's latest history, in the evaluation batch layout.

The cache a recommender serves is predicted from the user's WHOLE sequence: its last ``max_history`` items, the
test target included (evaluation holds the last items out; serving has nothing to hold out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.catalogue import DataFormatError
from datamodules.prompt_batches import left_padded
from datamodules.prompt_tasks import PromptTasks
from datamodules.prompt_templates import HISTORY_SEPARATOR, eval_prompt


class PredictPrompts(Dataset):
    """Serving prompts: each user's last ``max_history`` items of the WHOLE sequence (the test target included).

    Batches have the evaluation layout; ``target_item`` is -1 (nothing is held out) and ``seen_rows``/``seen_items``
    hold the whole sequence, so ``mask_history`` excludes everything the user already has.
    """

    def __init__(self, tasks: PromptTasks, rows: np.ndarray) -> None:
        self.tasks, self.rows = tasks, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(rows, dtype=np.int64)]
        offsets, items = self.tasks.catalogue.offsets, self.tasks.catalogue.items
        sequences = [items[offsets[row] : offsets[row + 1]] for row in rows.tolist()]
        batch = serving_batch(self.tasks._tokenizer(), self.tasks.code_text, sequences, self.tasks.split.max_history)
        return {**batch, "target_item": torch.full((len(rows),), -1), "user": torch.from_numpy(rows)}


def serving_batch(
    tokenizer, code_text: Sequence[str], sequences: Sequence[np.ndarray], max_history: int
) -> dict[str, torch.Tensor]:
    """The evaluation-layout batch of whole item sequences: the cache build's and the live path's one prompt code.

    Args:
        tokenizer: the model's tokenizer (code tokens and a pad token added).
        code_text: per item row, its codes as one string (``PromptTasks.code_text``).
        sequences: per user, the item rows of the whole history, oldest first.
        max_history: items of each sequence's end that go into the prompt (the rest is only masked).

    Returns:
        Left-padded ``input_ids``/``attention_mask`` of LC-Rec's evaluation prompt, and ``seen_rows``/``seen_items``:
        every item of each sequence, for ``mask_history``.
    """
    texts = [eval_prompt(HISTORY_SEPARATOR.join(code_text[item] for item in seq[-max_history:])) for seq in sequences]
    prompt_ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    input_ids, attention = left_padded(prompt_ids, tokenizer.pad_token_id)
    lengths = [len(seq) for seq in sequences]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "seen_rows": torch.from_numpy(np.repeat(np.arange(len(sequences)), lengths)),
        "seen_items": torch.from_numpy(np.concatenate([np.asarray(seq, dtype=np.int64) for seq in sequences])),
    }


def read_user_list(path: str, user_ids: np.ndarray) -> np.ndarray:
    """Catalogue rows of the original user ids listed in ``path`` (one a line; blank lines ignored)."""
    row_of = {str(user): row for row, user in enumerate(user_ids.tolist())}
    try:
        with open(path, encoding="utf-8") as handle:
            wanted = [line.strip() for line in handle if line.strip()]
    except OSError as err:
        raise DataFormatError(
            f"{path}: cannot read the user list ({err}). Fix `data.init_args.predict_users`."
        ) from None
    unknown = [user for user in wanted if user not in row_of]
    if unknown or not wanted:
        raise DataFormatError(
            f"{path}: {len(unknown)} user id(s) not in the dataset (first: {unknown[:3]}); list "
            "original user ids, one a line"
            if unknown
            else f"{path}: the user list is empty"
        )
    return np.asarray(sorted({row_of[user] for user in wanted}), dtype=np.int64)
