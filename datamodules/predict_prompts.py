"""Serving prompts for ``lightning predict``: every user's latest history, in the evaluation batch layout.

The cache a recommender serves is predicted from the user's WHOLE sequence: its last ``max_history`` items, the
test target included (evaluation holds the last items out; serving has nothing to hold out).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.catalogue import DataFormatError
from datamodules.prompt_tasks import PromptTasks
from datamodules.prompt_templates import eval_prompt
from datamodules.split import SampleIndex


class PredictPrompts(Dataset):
    """Serving prompts: each user's last ``max_history`` items of the WHOLE sequence (the test target included).

    Batches have the evaluation layout; ``target_item`` is -1 (nothing is held out) and ``seen_rows``/``seen_items``
    hold the whole sequence, so ``mask_history`` excludes everything the user already has.
    """

    def __init__(self, tasks: PromptTasks, rows: np.ndarray) -> None:
        offsets = tasks.catalogue.offsets
        self.tasks, self.rows = tasks, rows
        self.index = SampleIndex(np.arange(len(offsets) - 1), offsets[1:])  # "target" one past each sequence's end

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(rows, dtype=np.int64)]
        tasks, tokenizer = self.tasks, self.tasks._tokenizer()
        histories = tasks.split.histories(self.index, rows)
        prompt_ids = tokenizer([eval_prompt(tasks.history_text(row)) for row in histories], add_special_tokens=True)[
            "input_ids"
        ]
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for out, ids in enumerate(prompt_ids):
            input_ids[out, width - len(ids) :] = torch.tensor(ids)
            attention[out, width - len(ids) :] = 1
        seen_rows, seen_items = tasks.split.seen_items(self.index, rows)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "target_item": torch.full((len(rows),), -1),
            "user": torch.from_numpy(rows),
            "seen_rows": torch.from_numpy(seen_rows),
            "seen_items": torch.from_numpy(seen_items),
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
