"""LC-Rec loading, dataset statistics and the bad-input errors of the data layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules import DataFormatError, SequenceDataModule, load_lcrec, write_lcrec
from datamodules.artifacts import atomic_write
from tests.conftest import shared_dataset, write_inter


def test_load_lcrec_round_trip(tmp_path):
    sequences = {0: [0, 1, 2, 3], 1: [3, 2, 4], 2: [4, 0, 1, 2, 3]}
    text = {i: {"title": f"t{i}", "description": f"d{i}"} for i in range(5)}
    write_lcrec(tmp_path, "Toy", sequences, item_text=text)
    catalogue = load_lcrec(tmp_path, "Toy")
    assert catalogue.num_users == 3 and catalogue.num_items == 5
    assert catalogue.offsets.tolist() == [0, 4, 7, 12]
    assert [catalogue.sequence(u).tolist() for u in range(3)] == list(sequences.values())
    assert catalogue.item_text[4]["title"] == "t4"
    stats = catalogue.statistics()
    assert (stats.num_interactions, stats.mean_length, stats.long_user_share) == (12, 4.0, 0.0)
    assert len(catalogue.content_hash) == 64


def test_user_keys_are_sorted_numerically(tmp_path):
    write_inter(tmp_path, "Toy", {"10": [0, 1, 2], "2": [2, 1, 0]})
    catalogue = load_lcrec(tmp_path, "Toy")
    assert catalogue.user_ids.tolist() == [2, 10]
    assert catalogue.sequence(0).tolist() == [2, 1, 0]


def test_games_statistics_match_paper_table_2():
    catalogue = load_lcrec(shared_dataset("Games"), "Games")
    stats = catalogue.statistics()
    assert stats.num_users == 50_546
    assert stats.num_items == 16_859
    assert stats.num_interactions == 452_989
    assert round(stats.mean_length, 3) == 8.962
    assert round(100 * stats.long_user_share, 2) == 4.80


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"0": [0, 1, 2', "malformed JSON at line 1"),
        ('{"0": [0, 1, "x"]}', 'user "0" must map to a list of integer item indices'),
        ('{"0": {"a": 1}}', 'user "0" must map to a list'),
        ('{"0": [0, 1.5, 2]}', "integer item indices"),
        ('{"u": [0, 1, 2]}', 'key "u" is not an integer user index'),
        ("{}", "dataset is empty"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('{"0": [0, 1, 2], "1": [1, 2]}', 'fewer than 3 interactions (first: user "1" with 2)'),
        ('{"0": [0, 1, -4]}', "item index -4 outside the catalogue"),
    ],
)
def test_bad_interaction_files_name_file_and_fix(tmp_path, content, needle):
    (tmp_path / "Toy.inter.json").write_text(content)
    with pytest.raises(DataFormatError) as error:
        load_lcrec(tmp_path, "Toy")
    message = str(error.value)
    assert needle in message
    assert "Toy.inter.json" in message


def test_item_outside_catalogue_defined_by_item_file(tmp_path):
    write_inter(tmp_path, "Toy", {"0": [0, 1, 7]}, item_text={str(i): {"title": "x"} for i in range(3)})
    with pytest.raises(
        DataFormatError,
        match=r"Toy.inter.json: user \"0\" has item index 7 outside the catalogue \(Toy.item.json defines 3 items",
    ):
        load_lcrec(tmp_path, "Toy")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFormatError, match=r"Toy.inter.json: file not found"):
        load_lcrec(tmp_path, "Toy")


def test_datamodule_rejects_directory_without_any_format(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    datamodule = SequenceDataModule(data_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match="holds neither an LC-Rec dataset .* nor raw Amazon 2018 files"):
        datamodule.setup("fit")


def test_datamodule_rejects_missing_directory(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        SequenceDataModule(data_dir=str(tmp_path / "nope")).setup("fit")


def test_datamodule_names_ambiguous_datasets(tmp_path):
    write_inter(tmp_path, "A", {"0": [0, 1, 2]})
    write_inter(tmp_path, "B", {"0": [0, 1, 2]})
    with pytest.raises(DataFormatError, match="several interaction files .*set `data.init_args.dataset`"):
        SequenceDataModule(data_dir=str(tmp_path)).setup("fit")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def explode(handle):
        handle.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]


def test_synthetic_dataset_is_seeded_and_reused(tmp_path):
    from datamodules import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(num_users=50, num_items=40, seed=7)
    first = json.loads((write_synthetic(tmp_path / "a", spec) / "Synthetic.inter.json").read_text())
    second = json.loads((write_synthetic(tmp_path / "b", spec) / "Synthetic.inter.json").read_text())
    assert first == second
    mtime = (tmp_path / "a" / "Synthetic.inter.json").stat().st_mtime_ns
    write_synthetic(tmp_path / "a", spec)
    assert (tmp_path / "a" / "Synthetic.inter.json").stat().st_mtime_ns == mtime
    catalogue = load_lcrec(tmp_path / "a", "Synthetic")
    assert catalogue.lengths.min() >= 5
    assert all(len(set(catalogue.sequence(u).tolist())) == catalogue.lengths[u] for u in range(catalogue.num_users))
    assert catalogue.item_text is not None and len(catalogue.item_text) == 40
    assert np.unique(catalogue.items).size > 30
