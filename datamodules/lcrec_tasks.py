"""LC-Rec's task set (Zheng et al. 2023) as a task preset of :class:`datamodules.PromptDataModule`.

``data.init_args.task_preset: lcrec`` trains on LC-Rec's tasks instead of the paper's (public code ``data.py``,
``finetune.py --tasks``; wording in :mod:`datamodules.lcrec_templates`):

* **seqrec**: every training prefix's last ``max_history`` items (codes joined by ", ") -> the next item's codes
  (``SeqRecDataset``: ``items[:-2]``, every prefix);
* **item2index**: an item's title, description or both -> its codes, one sample per item (``ItemFeatDataset``);
* **index2item**: an item's codes -> its title, description or ``title\\n\\ndescription``, one sample per item;
* **fusionseqrec**: a training prefix's codes -> the next item's title or description, or the prefix's quoted
  titles -> the next item's codes (``FusionSeqRecDataset``);
* **itemsearch**: a query -> the item's codes. LC-Rec's queries are intentions GPT wrote from the users' reviews;
  here the query is the review itself, of a *training* interaction only: the source of the paper preset's query
  task (:meth:`PromptTasks._build_queries`). A dataset without reviews has no item-search sample (logged).

LC-Rec's sixth task, preference obtaining, has no data here (see :mod:`datamodules.lcrec_templates`). There is no
negative task. As in LC-Rec, every sample draws its template (and so its kind: title, description, both) uniformly
each epoch; a kind the item has no text for falls back to the first one it has. Items held out by the cold-start
protocol (``cold_items``, or coded by cold start) get no text: no item or fusion sample names them, and they are in
no training sequence anyway. Evaluation is LC-Rec's: seqrec template 0 (:meth:`PromptTasks.eval_batch`), which
is the paper preset's evaluation prompt verbatim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np

from datamodules.catalogue import Catalogue
from datamodules.item_index import ItemIndex
from datamodules.lcrec_templates import (
    FUSIONSEQREC,
    INDEX2ITEM,
    INDEX2ITEM_RESPONSES,
    ITEM2INDEX,
    ITEM_KINDS,
    ITEMSEARCH,
    SEQREC,
    TITLE_STRIP,
)
from datamodules.prompt_tasks import PromptTasks, _scaled, char_counts
from datamodules.prompt_templates import HISTORY_SEPARATOR, clean_text, frame
from datamodules.split import LeaveLastOutSplit

log = logging.getLogger(__name__)

LCREC_TASKS = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch")
SEQREC_TASK, ITEM2INDEX_TASK, INDEX2ITEM_TASK, FUSION_TASK, ITEMSEARCH_TASK = range(len(LCREC_TASKS))
#: kinds of the item <-> index and fusion tasks, two templates each
NUM_KINDS = len(ITEM_KINDS)
TITLES_TO_CODES = 2  # the fusion kind whose prompt lists the history's titles and whose response is codes


@dataclass(frozen=True)
class LCRecTaskWeights:
    """How much of each LC-Rec task an epoch holds: ``round(w * n)`` of the task's ``n`` natural samples.

    ``w < 1`` draws a fresh subset every epoch (LC-Rec's ``--train_data_sample_num``), ``w > 1`` repeats samples
    (its ``--train_prompt_sample_num``), ``0`` disables the task.

    Args:
        seqrec: next-item samples (every training prefix).
        item2index: item text -> codes (one per item with text).
        index2item: codes -> item text (one per item with text).
        fusionseqrec: history codes -> next title / description, history titles -> next codes (every prefix).
        itemsearch: review text -> the reviewed item's codes (datasets with reviews).
    """

    seqrec: float = 1.0
    item2index: float = 1.0
    index2item: float = 1.0
    fusionseqrec: float = 1.0
    itemsearch: float = 1.0

    def __post_init__(self) -> None:
        for field_ in fields(self):
            if getattr(self, field_.name) < 0:
                raise ValueError(f"task weight {field_.name} must be >= 0, got {getattr(self, field_.name)}")


def drawn_template(draw: int, available: np.ndarray) -> tuple[int, int]:
    """``(kind, template index)`` of a draw among a kinded task's ``2 x NUM_KINDS`` templates.

    The draw (``0 .. TEMPLATE_DRAW - 1``, a multiple of 6) picks template ``draw % 6`` of kind ``(draw % 6) // 2``;
    when the sample lacks that kind (``available[kind]`` false) it keeps the template's position within the first
    kind it has.
    """
    index = int(draw) % (2 * NUM_KINDS)
    kind = index // 2
    if not available[kind]:
        kind = int(np.argmax(available))
    return kind, 2 * kind + index % 2


class LCRecTasks(PromptTasks):
    """LC-Rec's tasks over the catalogue, the split and an item index (see the module docstring).

    Args:
        catalogue: the dataset.
        split: its leave-last-out split (training prefixes feed seqrec and fusionseqrec).
        item_index: the items' code tuples.
        weights: task weights (see :class:`LCRecTaskWeights`).
        max_length: training sequences longer than this (prompt + response + EOS) are dropped and counted.
        seed: base seed; epoch ``e`` draws from ``default_rng((seed, e))``.
    """

    TASK_NAMES = LCREC_TASKS

    def __init__(
        self,
        catalogue: Catalogue,
        split: LeaveLastOutSplit,
        item_index: ItemIndex,
        weights: LCRecTaskWeights,
        max_length: int,
        seed: int,
    ) -> None:
        super().__init__(catalogue, split, item_index, weights, 0, max_length, seed, pack=0)

    # ---------------------------------------------------------------------------------------- sources
    def _build_sources(self) -> None:
        n = self.catalogue.num_items
        titles, descriptions = [""] * n, [""] * n
        held_out = set(self.cold_items.tolist())
        for item, record in (self.catalogue.item_text or {}).items():
            if item < n and item not in held_out:
                titles[item] = clean_text(record.get("title")).strip(TITLE_STRIP).strip()
                descriptions[item] = clean_text(record.get("description"))
        self.texts = {"title": titles, "description": descriptions}
        has_title = np.array([bool(text) for text in titles] + [True], dtype=bool)  # the pad item counts as titled
        has_description = np.array([bool(text) for text in descriptions], dtype=bool)
        # per item, which kind it has text for: title, description, both
        self.item_kinds = np.stack([has_title[:n], has_description, has_title[:n] & has_description], axis=1)
        self.text_items = np.flatnonzero(self.item_kinds.any(1))
        # per training prefix: the next item's title, its description, every history item's title
        targets = self.train_targets
        histories = self.split.histories(self.split.train)
        self.fusion_kinds = np.stack(
            [has_title[targets], has_description[targets], has_title[histories].all(1)], axis=1
        )
        self.fusion_rows = np.flatnonzero(self.fusion_kinds.any(1))
        if not len(self.text_items):
            log.info("%s has no item text: item2index, index2item and fusionseqrec are skipped", self.catalogue.name)
        self._build_queries("itemsearch" if self.weights.itemsearch > 0 else None)

    # ------------------------------------------------------------------------------------------ plan
    def _plan_parts(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray, np.ndarray]]:
        weights = self.weights
        seqrec = _scaled(np.arange(len(self.split.train)), weights.seqrec, rng)
        item2index = _scaled(self.text_items, weights.item2index, rng)
        index2item = _scaled(self.text_items, weights.index2item, rng)
        fusion = _scaled(self.fusion_rows, weights.fusionseqrec, rng)
        search = _scaled(np.arange(len(self.query_item)), weights.itemsearch, rng)
        return [
            (SEQREC_TASK, seqrec, self.train_targets[seqrec]),
            (ITEM2INDEX_TASK, item2index, item2index),  # source = the item itself
            (INDEX2ITEM_TASK, index2item, index2item),
            (FUSION_TASK, fusion, self.train_targets[fusion]),
            (ITEMSEARCH_TASK, search, self.query_item[search]),
        ]

    def _task_source_lengths(self) -> tuple[np.ndarray, ...]:
        behaviour = self.behaviour_lengths()
        item_text = (char_counts(self.texts["title"]) + char_counts(self.texts["description"])) // 4
        return behaviour, item_text, item_text, behaviour, char_counts(self.query_text) // 4

    # ------------------------------------------------------------------------------------- rendering
    def titles_text(self, history: np.ndarray) -> str:
        """A left-padded history row as quoted titles, oldest first, joined by ", " (LC-Rec's ``inter_titles``)."""
        titles = self.texts["title"]
        return HISTORY_SEPARATOR.join(f'"{titles[item]}"' for item in history[history != self.catalogue.pad_item])

    def render(self, rows: np.ndarray) -> tuple[list[str], list[int | str]]:
        """Prompts and responses of plan rows; a response is an item id (its codes) or a text."""
        task, source, item, template = self.task[rows], self.source[rows], self.item[rows], self.template[rows]
        prompts: list[str] = [""] * len(rows)
        responses: list[int | str] = [int(value) for value in item]
        behaviour = np.flatnonzero((task == SEQREC_TASK) | (task == FUSION_TASK))
        histories = self.split.histories(self.split.train, source[behaviour]) if len(behaviour) else None
        for j, row in enumerate(behaviour):
            if task[row] == SEQREC_TASK:
                instruction = SEQREC[template[row] % len(SEQREC)].format(history=self.history_text(histories[j]))
            else:
                kind, index = drawn_template(template[row], self.fusion_kinds[source[row]])
                if kind == TITLES_TO_CODES:
                    instruction = FUSIONSEQREC[index].format(titles=self.titles_text(histories[j]))
                else:
                    instruction = FUSIONSEQREC[index].format(history=self.history_text(histories[j]))
                    responses[row] = self.texts[ITEM_KINDS[kind]][item[row]]
            prompts[row] = frame(instruction)
        for row in np.flatnonzero((task == ITEM2INDEX_TASK) | (task == INDEX2ITEM_TASK)):
            kind, index = drawn_template(template[row], self.item_kinds[item[row]])
            fill = {
                "title": self.texts["title"][item[row]],
                "description": self.texts["description"][item[row]],
                "item": self.code_text[item[row]],
            }
            if task[row] == ITEM2INDEX_TASK:
                prompts[row] = frame(ITEM2INDEX[index].format(**fill))
            else:
                prompts[row] = frame(INDEX2ITEM[index].format(**fill))
                responses[row] = INDEX2ITEM_RESPONSES[kind].format(**fill)
        for row in np.flatnonzero(task == ITEMSEARCH_TASK):
            prompts[row] = frame(ITEMSEARCH[template[row] % len(ITEMSEARCH)].format(query=self.query_text[source[row]]))
        return prompts, responses
