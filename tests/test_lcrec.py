"""LC-Rec's task preset (``task_preset: lcrec``): each task's prompt and label on hand-made data, the preset switch,
no held-out item in training prompts, and a tiny fit + test through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules import LCRecTaskWeights, PromptDataModule
from datamodules.errors import ConfigError
from datamodules.lcrec_tasks import (
    FUSION_TASK,
    INDEX2ITEM_TASK,
    ITEM2INDEX_TASK,
    ITEMSEARCH_TASK,
    LCREC_TASKS,
    SEQREC_TASK,
    LCRecTasks,
)
from datamodules.prompt_tasks import PromptTasks
from lightning_modules.cli import main
from tests.conftest import tiny_run_args, write_inter
from tests.test_prompts_llm import LC_REC_EVAL, load_tokenizer, synthetic_codes, write_index

FRAME = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Response:"
)
# Hand-made catalogue: item 4 is held out (cold), item 5 has no text; user 0 reviewed items 1 (its test target: left
# out) and 2, user 1 reviewed item 2 (its validation target: left out).
SEQUENCES = {"0": [0, 1, 2, 3, 1], "1": [3, 0, 5, 2, 1], "2": [1, 2, 4]}
ITEM_TEXT = {
    "0": {"title": "Red Pen.", "description": "A red ink pen"},
    "1": {"title": "Blue Ink", "description": ""},
    "2": {"title": "Green Pad", "description": "['Lined paper', 'Eighty sheets']"},
    "3": {"title": "Stapler", "description": "Heavy duty"},
    "4": {"title": "Cold Clip", "description": "A held-out clip"},
    "5": {"title": "", "description": ""},
}
REVIEWS = {"0": {"1": "smooth writing", "2": "great lined paper"}, "1": {"2": "the pad I wanted"}}
CODES = {item: f"<a_{item % 2}><b_{item // 2}><c_0>" for item in range(6)}


@pytest.fixture(scope="module")
def lcrec_dm(tmp_path_factory, tiny_tokenizer) -> PromptDataModule:
    directory = write_inter(tmp_path_factory.mktemp("lcrec"), "Tiny", SEQUENCES, ITEM_TEXT)
    (directory / "Tiny.review.json").write_text(json.dumps(REVIEWS))
    index = directory / "index.json"
    index.write_text(json.dumps({str(item): [f"<a_{item % 2}>", f"<b_{item // 2}>", "<c_0>"] for item in range(6)}))
    (directory / "cold.json").write_text("[4]")
    dm = PromptDataModule(
        data_dir=str(directory),
        dataset="Tiny",
        source="lcrec",
        index=str(index),
        cold_items=str(directory / "cold.json"),
        task_preset="lcrec",
        negative_ratio=0,
        seed=3,
    )
    dm.setup("fit")
    dm.set_tokenizer(load_tokenizer(tiny_tokenizer, dm.item_index.vocabulary()))
    return dm


def render_one(tasks: LCRecTasks, task: int, draw: int, source: int | None = None, item: int | None = None):
    """Prompt and response of the plan row of ``task`` with ``source`` (or ``item``), rendered with template draw
    ``draw``."""
    match = (tasks.task == task) & (tasks.source == source if source is not None else tasks.item == item)
    row = np.flatnonzero(match)[:1]
    assert len(row) == 1, f"no {LCREC_TASKS[task]} row"
    tasks.template[row] = draw
    prompts, responses = tasks.render(row)
    return prompts[0], responses[0]


def train_row(tasks: LCRecTasks, user: int, target: int) -> int:
    """The training prefix of catalogue user row ``user`` whose target is item ``target``."""
    train = tasks.split.train
    rows = np.flatnonzero((train.user == user) & (tasks.catalogue.items[train.target_pos] == target))
    assert len(rows) == 1
    return int(rows[0])


def test_counts_follow_lcrec_sources(lcrec_dm):
    tasks = lcrec_dm.prompts
    assert isinstance(tasks, LCRecTasks) and tasks.TASK_NAMES == LCREC_TASKS
    # prefixes of items[:-2]: user 0 -> 1, 2; user 1 -> 0, 5; user 2 has none. Items with text: 0-3 (4 is cold).
    assert tasks.counts == {"seqrec": 4, "item2index": 4, "index2item": 4, "fusionseqrec": 4, "itemsearch": 1}


def test_seqrec_prompt(lcrec_dm):
    tasks = lcrec_dm.prompts
    prompt, response = render_one(tasks, SEQREC_TASK, 1, source=train_row(tasks, 0, 2))
    assert prompt == FRAME.format(
        "I find the user's historical interactive items: <a_0><b_0><c_0>, <a_1><b_0><c_0>, and I want to know what "
        "next item the user needs. Can you help me decide?"
    )
    assert response == 2
    prompt, _ = render_one(tasks, SEQREC_TASK, 0, source=train_row(tasks, 0, 2))
    assert prompt == LC_REC_EVAL.format(history="<a_0><b_0><c_0>, <a_1><b_0><c_0>")


def test_item2index_prompts(lcrec_dm):
    tasks = lcrec_dm.prompts
    prompt, response = render_one(tasks, ITEM2INDEX_TASK, 4, item=2)  # title and description
    assert prompt == FRAME.format(
        'An item is called "Green Pad" and described as "Lined paper Eighty sheets", can you tell me which item it is?'
    )
    assert response == 2
    prompt, response = render_one(tasks, ITEM2INDEX_TASK, 1, item=0)  # LC-Rec strips the title's final period
    assert prompt == FRAME.format('An item is called "Red Pen", could you please let me know which item it is?')
    # item 1 has no description: a description template falls back to the title template at the same position
    prompt, response = render_one(tasks, ITEM2INDEX_TASK, 3, item=1)
    assert prompt == FRAME.format('An item is called "Blue Ink", could you please let me know which item it is?')
    assert response == 1


def test_index2item_prompts(lcrec_dm):
    tasks = lcrec_dm.prompts
    prompt, response = render_one(tasks, INDEX2ITEM_TASK, 4, item=0)
    assert prompt == FRAME.format("What is the title and description of item <a_0><b_0><c_0>?")
    assert response == "Red Pen\n\nA red ink pen"
    prompt, response = render_one(tasks, INDEX2ITEM_TASK, 9, item=3)  # draw 9 = template 3: a description
    assert prompt == FRAME.format("Briefly describe item <a_1><b_1><c_0>.")
    assert response == "Heavy duty"


def test_fusionseqrec_prompts(lcrec_dm):
    tasks = lcrec_dm.prompts
    source = train_row(tasks, 0, 2)
    prompt, response = render_one(tasks, FUSION_TASK, 0, source=source)
    assert prompt == FRAME.format(
        "The user has sequentially interacted with items <a_0><b_0><c_0>, <a_1><b_0><c_0>. Can you recommend the next "
        "item for him? Tell me the title of the item?"
    )
    assert response == "Green Pad"
    prompt, response = render_one(tasks, FUSION_TASK, 3, source=source)
    assert prompt == FRAME.format(
        "Here is the item interaction history of the user: <a_0><b_0><c_0>, <a_1><b_0><c_0>, please tell me what "
        "features he expects from his next item."
    )
    assert response == "Lined paper Eighty sheets"
    prompt, response = render_one(tasks, FUSION_TASK, 5, source=source)
    assert prompt == FRAME.format(
        'Considering the title sequence of user history interaction items: "Red Pen", "Blue Ink". What is the next '
        "recommendation for the user?"
    )
    assert response == 2
    # the next item (5) has no text: a title template falls back to the history's titles -> codes
    prompt, response = render_one(tasks, FUSION_TASK, 0, source=train_row(tasks, 1, 5))
    assert prompt == FRAME.format(
        'Given the title sequence of user historical interactive items: "Stapler", "Red Pen", can you recommend a '
        "suitable next item for the user?"
    )
    assert response == 5


def test_itemsearch_prompt(lcrec_dm):
    prompt, response = render_one(lcrec_dm.prompts, ITEMSEARCH_TASK, 0, source=0)
    assert prompt == FRAME.format(
        'Suppose you are a search engine, now a user searches that: "great lined paper", can you select an item to '
        "respond to the user's query?"
    )
    assert response == 2


def test_labels_are_the_response_only(lcrec_dm):
    tasks = lcrec_dm.prompts
    tokenizer = tasks.tokenizer
    rows = np.array([np.flatnonzero(tasks.task == task)[0] for task in range(len(LCREC_TASKS))])
    prompts, responses = tasks.render(rows)
    batch = tasks.sample_batch(rows)
    assert batch["dropped"].tolist() == [0] * len(LCREC_TASKS) and batch["task"].tolist() == list(range(5))
    for out, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if isinstance(response, str):
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        else:
            response_ids = tokenizer.convert_tokens_to_ids(list(CODES[response].replace("><", ">\0<").split("\0")))
        labels = batch["labels"][out]
        kept = labels[labels != -100].tolist()
        assert kept == response_ids + [tokenizer.eos_token_id]
        assert (labels[: len(prompt_ids)] == -100).all()
        assert batch["input_ids"][out, : len(prompt_ids)].tolist() == prompt_ids


def test_no_held_out_item_or_interaction_in_training_prompts(lcrec_dm):
    tasks = lcrec_dm.prompts
    catalogue, train = tasks.catalogue, tasks.split.train
    held_out_reviews = ("smooth writing", "the pad I wanted")  # reviews of a test / validation target
    for epoch in range(6):
        tasks.set_epoch(epoch)
        rows = np.arange(len(tasks.task))
        prompts, responses = tasks.render(rows)
        text = " ".join(prompts + [r for r in responses if isinstance(r, str)])
        assert "Cold Clip" not in text and "held-out clip" not in text and CODES[4] not in text
        assert 4 not in [r for r in responses if not isinstance(r, str)]
        assert not any(review in text for review in held_out_reviews)
        behaviour = np.isin(tasks.task, (SEQREC_TASK, FUSION_TASK))
        # behaviour samples are training prefixes only: targets before the user's last two items
        user, position = train.user[tasks.source[behaviour]], train.target_pos[tasks.source[behaviour]]
        assert (position < catalogue.offsets[user + 1] - 2).all()
    tasks.set_epoch(0)


def test_preset_switch_and_refused_combinations(synthetic_dir, tiny_tokenizer, tmp_path):
    index = write_index(tmp_path / "index.json", synthetic_codes())
    common = {"data_dir": str(synthetic_dir), "source": "lcrec", "dataset": "Synthetic", "index": str(index)}
    paper = PromptDataModule(**common)
    lcrec = PromptDataModule(**common, task_preset="lcrec", negative_ratio=0, lcrec_tasks=LCRecTaskWeights(seqrec=0.5))
    for dm in (paper, lcrec):
        dm.setup("fit")
        dm.set_tokenizer(load_tokenizer(tiny_tokenizer, dm.item_index.vocabulary()))
    assert type(paper.prompts) is PromptTasks and set(paper.prompts.counts) == {
        "sequential",
        "negative",
        "text",
        "query",
    }
    assert type(lcrec.prompts) is LCRecTasks and set(lcrec.prompts.counts) == set(LCREC_TASKS)
    assert lcrec.prompts.counts["seqrec"] == round(0.5 * len(lcrec.split.train))
    # evaluation is LC-Rec's seqrec prompt 0 under both presets: the same batches
    test, rows = paper.split.samples("test"), np.arange(5)
    assert torch.equal(
        paper.prompts.eval_batch(test, rows)["input_ids"], lcrec.prompts.eval_batch(test, rows)["input_ids"]
    )
    refused = [
        {"task_preset": "lcrec"},  # negative_ratio defaults to 3: LC-Rec has no negative task
        {"task_preset": "lcrec", "negative_ratio": 0, "preset": "all"},
        {"task_preset": "lcrec", "negative_ratio": 0, "pack_prompts": 1},
        {"lcrec_tasks": LCRecTaskWeights()},  # the paper preset
    ]
    for kwargs in refused:
        with pytest.raises(ConfigError):
            PromptDataModule(**common, **kwargs)


def test_lcrec_fit_and_test_through_the_cli(synthetic_dir, tiny_tokenizer, tmp_path):
    index = write_index(tmp_path / "index.json", synthetic_codes())
    root = tmp_path / "run"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/lcrec.yaml",
                synthetic_dir,
                root,
                f"--model.init_args.tokenizer_path={tiny_tokenizer}",
                "--model.init_args.llama_config.hidden_size=32",
                "--model.init_args.llama_config.intermediate_size=64",
                "--model.init_args.llama_config.num_hidden_layers=1",
                "--data.init_args.index",
                str(index),
                "--data.init_args.eval_max_users=6",
                "--data.init_args.test_all_users=false",
                "--trainer.callbacks.init_args.output_dir",
                str(tmp_path / "export"),
                "--trainer.enable_progress_bar=false",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
            ),
        ]
    )
    record = json.loads((root / "csv" / "version_0" / "test_metrics.json").read_text())
    assert set(record["metrics"]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"}
    assert 0 <= record["metrics"]["hr@1"] <= record["metrics"]["hr@10"] <= 1


def test_lcrec_configs_parse_with_the_lcrec_preset():
    from lightning_modules.cli import build_cli
    from tests.conftest import CONFIGS

    for config in ("industrial/lcrec.yaml", "synthetic/lcrec.yaml", "games/lcrec.yaml"):
        cli = build_cli(["--config", str(CONFIGS / config)], run=False)
        assert cli.datamodule.task_preset == "lcrec" and cli.datamodule.negative_ratio == 0
        assert cli.model.hparams.full_finetune and not cli.model.hparams.lora
    # Games: LC-Rec's run.sh recipe on the dataset's own (LC-Rec) index, a third of the fusion samples
    assert cli.datamodule.index is None and cli.datamodule.dedupe_collisions
    assert (cli.model.hparams.lr, cli.datamodule.lcrec_weights.fusionseqrec) == (5e-5, 0.33)
    cli = build_cli(["--config", str(CONFIGS / "industrial/codebook_lcrec.yaml")], run=False)
    hp = cli.model.hparams
    assert (hp.variant, hp.num_levels, hp.codebook_size, hp.rqvae_latent_dim) == ("rqvae", 4, 256, 32)
    assert hp.rqvae_latent_dim == 32 and hp.collision_mapping == "sinkhorn"
