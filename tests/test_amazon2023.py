"""Amazon Reviews 2023 -> LC-Rec conversion: the recipe on a hand-derived case, parity with the 2018 converter,
manifest reuse, bad input (file, line and field named) and the DataModule path.

The fixture is the 2018 test's 5x5 block of core users x core items (so the expected ids and sequences are the
ones derived there) plus everything the recipe must remove, in the 2023 format: items without a meta line or
with an empty title, a user whose repeated reviews only look like 5, exact repeats (the earlier line wins), and
a cascade that only iterated k-core removes: WEAKU has 4 reviews -> VICT drops to 4 reviewers -> CASCU drops to 4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from datamodules.amazon2023 import convert_amazon2023, fast_clean, find_amazon2023_files
from datamodules.amazon_raw import clean_text, convert_amazon_raw
from datamodules.artifacts import read_manifest
from datamodules.catalogue import DataFormatError
from tests.test_amazon_raw import BRUSH, CORE, CREAM, EXPECTED_SEQUENCES, GEL, MASK, SOAP, write_lines

NO_META, NO_TITLE, VICT, WEAKU, CASCU, DUPU = "B0NM", "B0NT", "B0VC", "AW9", "AB8", "AD7"
EXPECTED_TEXT = {
    0: {
        "title": "Rose & Honey Cream",
        "description": "Soft and rich. Daily use",
        "brand": "Acme",
        "categories": "Beauty, Skin & Care",
    },
    1: {"title": "Aloe Gel", "description": "Cooling gel", "brand": "", "categories": ""},
    2: {"title": "Brush", "description": "", "brand": "", "categories": ""},
    3: {"title": "Mask", "description": "Clay mask", "brand": "Mud Co", "categories": ""},
    4: {"title": "Soap", "description": "", "brand": "", "categories": "Bath"},
}
SPECIAL = {  # (user, item) -> (review title, text); the rest say "<user> likes <item>"
    ("AZ1", CREAM): ("Love it!", "Smells &amp; feels   <i>great</i>"),
    ("AA3", GEL): ("Fine", ""),
    ("AQ4", BRUSH): ("Okay", "Works."),
    ("AC5", MASK): ("", ""),
}


def review(user: str, item: str, time: int, title: str | None = None, text: str | None = None) -> dict:
    """One line of ``<Category>.jsonl`` in the 2023 layout (time in ms)."""
    title, text = SPECIAL.get((user, item), ("", f"{user} likes {item}")) if title is None else (title, text)
    return {
        "rating": 5.0,
        "title": title,
        "text": text,
        "images": [],
        "asin": item + "-V",
        "parent_asin": item,
        "user_id": user,
        "timestamp": time,
        "helpful_vote": 0,
        "verified_purchase": True,
    }


def reviews_2023(seed: int = 0) -> list[dict]:
    records = []
    for user, items in CORE.items():
        records += [review(user, item, 1000 + 100 * j) for j, item in enumerate(items) if (user, item) != ("AM2", GEL)]
        records += [review(user, extra, 1050) for extra in (NO_META, NO_TITLE)]
    records += [review(WEAKU, item, 1000 + j) for j, item in enumerate([VICT, CREAM, GEL, BRUSH])]
    records += [review(user, VICT, 1150) for user in ("AZ1", "AM2", "AA3")]
    records += [review(CASCU, item, 1000 + j) for j, item in enumerate([VICT, SOAP, BRUSH, CREAM, MASK])]
    records += [review(DUPU, item, 1000 + j) for j, item in enumerate([SOAP, SOAP, SOAP, BRUSH, BRUSH])]
    records.append(review("AZ1", CREAM, 9999, "Changed my mind", "meh"))  # a later repeat loses
    records = [records[k] for k in np.random.default_rng(seed).permutation(len(records))]
    # AM2's GEL ties with its MASK at 1300: MASK comes first in the file, so first in the sequence; AA3's second
    # GEL review has the same time as its first: the earlier line wins
    return records + [review("AM2", GEL, 1300), review("AA3", GEL, 1000, "Second copy", "ignored")]


def meta_2023() -> list[dict]:
    details = {"Item Form": "Cream", "Brand": "Ignored"}
    return [
        {
            "main_category": "All Beauty",
            "title": "  Rose &amp; Honey <b>Cream</b>  ",
            "average_rating": 4.5,
            "features": ["Rich"],
            "description": ["<p>Soft&nbsp;and   rich.</p>", "", "  Daily use "],
            "price": None,
            "images": [],
            "videos": [],
            "store": "Acme",
            "categories": ["Beauty", "Skin &amp; Care", "Beauty"],
            "details": details,
            "parent_asin": CREAM,
            "bought_together": None,
        },
        {"parent_asin": GEL, "title": "", "description": ["An untitled first line does not count"]},
        {"parent_asin": GEL, "title": "Aloe Gel", "description": ["Cooling\n gel"], "store": None, "categories": []},
        {"parent_asin": BRUSH, "title": "Brush", "description": [], "features": [], "categories": []},
        {"parent_asin": MASK, "title": "Mask", "description": ["<div>Clay\n\tmask</div>"], "store": "Mud Co"},
        {"parent_asin": SOAP, "title": "Soap", "categories": ["Bath"]},
        {"parent_asin": SOAP, "title": "Second soap line"},  # duplicate: the first titled line wins
        {"parent_asin": NO_TITLE, "title": "<br>"},
        {"parent_asin": VICT, "title": "Victim"},
        {"parent_asin": "B0UNREVIEWED", "title": "Never reviewed"},
    ]


def write_2023(
    directory: Path,
    gz: bool,
    category: str = "Beauty",
    reviews: list[dict] | None = None,
    meta: list[dict] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl.gz" if gz else ".jsonl"
    write_lines(directory / f"{category}{suffix}", [json.dumps(r) for r in (reviews or reviews_2023())])
    write_lines(directory / f"meta_{category}{suffix}", [json.dumps(m) for m in (meta or meta_2023())])
    return directory


@pytest.fixture(params=["gz", "plain"])
def raw_dir(request, tmp_path: Path) -> Path:
    return write_2023(tmp_path / "raw", gz=request.param == "gz")


def read(out: Path, name: str) -> dict:
    return json.loads((out / f"Beauty.{name}.json").read_text())


# ----------------------------------------------------------------------------------------- the recipe
def test_conversion_matches_hand_derived_output(raw_dir: Path, tmp_path: Path) -> None:
    out = convert_amazon2023(raw_dir, "Beauty", tmp_path / "out", threads=1)
    assert read(out, "inter") == {str(user): items for user, items in EXPECTED_SEQUENCES.items()}
    assert read(out, "item") == {str(item): text for item, text in EXPECTED_TEXT.items()}
    assert (out / "Beauty.user2id").read_text() == "AA3\t0\nAC5\t1\nAM2\t2\nAQ4\t3\nAZ1\t4\n"
    assert (out / "Beauty.item2id").read_text() == "0451\t0\n1234\t1\nB00A\t2\nB00B\t3\nB00C\t4\n"
    manifest = read_manifest(out)
    assert manifest["counts"] == {"users": 5, "items": 5, "interactions": 25}
    suffix = ".gz" if (raw_dir / "Beauty.jsonl.gz").exists() else ""
    assert manifest["raw_files"] == [f"Beauty.jsonl{suffix}", f"meta_Beauty.jsonl{suffix}"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no spill directory, no temp file


def test_reviews_keep_the_earliest_line_and_join_title_and_text(raw_dir: Path, tmp_path: Path) -> None:
    reviews = read(convert_amazon2023(raw_dir, "Beauty", tmp_path / "out"), "review")
    assert reviews["4"]["0"] == "Love it! Smells & feels great"  # AZ1's earliest CREAM review, not the repeat
    assert reviews["0"]["1"] == "Fine"  # AA3's GEL: the first of two lines with the same time
    assert reviews["3"]["2"] == "Okay. Works."
    assert "3" not in reviews["1"]  # AC5 on MASK had neither title nor text
    assert reviews["2"]["4"] == "AM2 likes B00C"
    assert sum(map(len, reviews.values())) == 24


def test_core_cascade_needs_iteration(tmp_path: Path) -> None:
    # at 4-core WEAKU keeps its 4 reviews, so VICT keeps 5 reviewers and CASCU its 5 items
    out = convert_amazon2023(write_2023(tmp_path / "raw", gz=False), "Beauty", tmp_path / "out", user_k=4, item_k=4)
    users = (out / "Beauty.user2id").read_text().split()[::2]
    assert users == ["AA3", CASCU, "AC5", "AM2", "AQ4", WEAKU, "AZ1"]
    assert "B0VC" in (out / "Beauty.item2id").read_text()


def write_2018_copy(directory: Path, reviews: list[dict], meta: list[dict]) -> Path:
    """The same reviews and meta in the 2018 layout (fields renamed; ``store`` is the 2018 ``brand``)."""
    to_2018 = {
        "user_id": "reviewerID",
        "parent_asin": "asin",
        "timestamp": "unixReviewTime",
        "title": "summary",
        "text": "reviewText",
    }
    old_reviews = [{to_2018[k]: v for k, v in r.items() if k in to_2018} for r in reviews]
    old_meta = [
        {
            "asin": m["parent_asin"],
            "title": m["title"],
            "description": m.get("description"),
            "brand": m.get("store"),
            "category": m.get("categories"),
        }
        for m in meta
    ]
    directory.mkdir(parents=True)
    write_lines(directory / "Beauty.json", [json.dumps(r) for r in old_reviews])
    write_lines(directory / "meta_Beauty.json", [json.dumps(m) for m in old_meta])
    return directory


def assert_same_output(new: Path, old: Path) -> None:
    for name in ("inter.json", "item.json", "review.json", "item2id", "user2id"):
        assert (new / f"Beauty.{name}").read_text() == (old / f"Beauty.{name}").read_text(), name


def test_same_content_as_2018_files_gives_identical_output(tmp_path: Path) -> None:
    """The 2018 converter on the same reviews and meta, written in the 2018 layout, writes the same files."""
    new = convert_amazon2023(write_2023(tmp_path / "raw", gz=True), "Beauty", tmp_path / "new")
    old = convert_amazon_raw(
        write_2018_copy(tmp_path / "raw2018", reviews_2023(), meta_2023()), "Beauty", tmp_path / "old"
    )
    assert_same_output(new, old)


@pytest.mark.parametrize(("seed", "gz"), [(1, True), (2, False), (3, True)])
def test_random_category_matches_the_2018_converter(seed: int, gz: bool, tmp_path: Path) -> None:
    """A few hundred random reviews with repeats, equal times, markup and items without a (usable) meta line: the
    2018 converter is the reference."""
    rng = np.random.default_rng(seed)
    users, items = [f"AG{n:03d}" for n in rng.permutation(60)], [f"B0{n:03d}" for n in rng.permutation(40)]
    pick_user = rng.power(0.6, 600)  # skewed activity, so that the core filter bites
    reviews = [
        review(
            users[int(u * 60)],
            items[int(rng.power(0.5) * 40)],
            int(rng.integers(0, 30)) * 1000,
            *rng.choice(["", "Good.", "ok", "A &amp; B"], 1).tolist(),
            *rng.choice(["", "fine  text", "<br />more", "x\ty"], 1).tolist(),
        )
        for u in pick_user
    ]
    meta = [
        {
            "parent_asin": item,
            "title": rng.choice(["", "<br>", f"Item {item}", f"<b>{item}</b> &amp; co"]),
            "description": [f"About {item}"],
            "store": rng.choice(["", "Shop", None]),
            "categories": ["A", "B"],
        }
        for item in items
        if rng.random() > 0.1
        for _ in range(int(rng.integers(1, 3)))
    ]
    raw = write_2023(tmp_path / "raw", gz, reviews=reviews, meta=meta)
    new = convert_amazon2023(raw, "Beauty", tmp_path / "new", user_k=3, item_k=3)
    old = convert_amazon_raw(
        write_2018_copy(tmp_path / "raw2018", reviews, meta), "Beauty", tmp_path / "old", user_k=3, item_k=3
    )
    assert 10 <= read_manifest(new)["counts"]["users"] < 60  # filtering removed some users, kept enough to compare
    assert_same_output(new, old)


def test_fast_cleaning_equals_the_2018_converters_clean_text() -> None:
    spaces = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    samples = [
        spaces,
        f"a{spaces}b",
        " \x1c tab\tand\u3000ideographic\xa0nbsp ",
        "x\u200by",
        "",
        "  plain  ",
        "a &amp; b",
        "<p>Soft&nbsp;and</p>  rich",
        "1 < 2",
        "caf\u00e9 \U0001f600",
        "trailing\u2029",
    ]
    cleaned = [fast_clean(text) for text in samples]
    assert cleaned == [clean_text(text) for text in samples]
    assert cleaned[:3] == ["", "a b", "tab and ideographic nbsp"] and fast_clean(None) == ""


# ------------------------------------------------------------------------------------ manifest reuse
def test_second_conversion_is_a_no_op_and_a_change_reconverts(tmp_path: Path) -> None:
    raw = write_2023(tmp_path / "raw", gz=True)
    out = convert_amazon2023(raw, "Beauty", tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    convert_amazon2023(raw, "Beauty", out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    changed = [
        {**r, "title": "Great"} if (r["user_id"], r["parent_asin"]) == ("AC5", MASK) else r for r in reviews_2023()
    ]
    write_2023(raw, gz=True, reviews=changed)
    convert_amazon2023(raw, "Beauty", out)
    assert read(out, "review")["1"]["3"] == "Great"


# -------------------------------------------------------------------------------------------- errors
def lines_with(bad: str, at: int) -> list[str]:
    """Good review lines with ``bad`` at line ``at`` (1-based), after a blank line DuckDB would not count."""
    good = [json.dumps(r) for r in reviews_2023()[:6]]
    return [good[0], ""] + good[1 : at - 2] + [bad] + good[at - 2 :]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"user_id": "A", "parent_asin": ', r"line 4 is not valid JSON"),
        ('["A", "B0", 1]', r"line 4 is a list, not an object"),
        (json.dumps({"user_id": "A", "parent_asin": "B0"}), r'line 4 misses the required field "timestamp"'),
        (
            json.dumps({"user_id": "", "parent_asin": "B0", "timestamp": 5}),
            r'line 4 misses the required field "user_id"',
        ),
        (
            json.dumps({"user_id": "A", "parent_asin": "B0", "timestamp": "soon"}),
            r'line 4: "timestamp" must be an integer',
        ),
    ],
)
def test_bad_review_line_names_file_line_and_field(tmp_path: Path, suffix: str, bad: str, message: str) -> None:
    write_lines(tmp_path / f"Beauty{suffix}", lines_with(bad, 4))
    write_lines(tmp_path / f"meta_Beauty{suffix}", [json.dumps(m) for m in meta_2023()])
    with pytest.raises(DataFormatError, match=rf"Beauty\{suffix}: {message}.*Fix or delete that line"):
        convert_amazon2023(tmp_path, "Beauty", tmp_path / "out")


def test_meta_line_without_parent_asin_is_named(tmp_path: Path) -> None:
    meta = meta_2023()
    meta[2] = {"title": "No key"}
    write_2023(tmp_path, gz=False, meta=meta)
    with pytest.raises(DataFormatError, match=r'meta_Beauty\.jsonl: line 3 misses the required field "parent_asin"'):
        convert_amazon2023(tmp_path, "Beauty", tmp_path / "out")


def test_truncated_gzip_is_named(tmp_path: Path) -> None:
    write_2023(tmp_path, gz=True)
    data = (tmp_path / "Beauty.jsonl.gz").read_bytes()
    (tmp_path / "Beauty.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"Beauty\.jsonl\.gz: unreadable after line \d+.*Re-download"):
        convert_amazon2023(tmp_path, "Beauty", tmp_path / "out")


def test_missing_meta_file(tmp_path: Path) -> None:
    write_lines(tmp_path / "Beauty.jsonl.gz", [json.dumps(r) for r in reviews_2023()])
    for call in (lambda: find_amazon2023_files(tmp_path), lambda: find_amazon2023_files(tmp_path, "Beauty", True)):
        with pytest.raises(DataFormatError, match=r"found Beauty\.jsonl\.gz but no meta_Beauty\.jsonl\[\.gz\]"):
            call()
    with pytest.raises(DataFormatError, match=r"meta_Beauty\.jsonl"):
        convert_amazon2023(tmp_path, "Beauty", tmp_path / "out")


def test_empty_after_k_core_suggests_smaller_k(raw_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"Beauty.*no interactions left.*smaller user_k/item_k"):
        convert_amazon2023(raw_dir, "Beauty", tmp_path / "out", user_k=6)


def test_discovery_infers_or_rejects_categories(tmp_path: Path) -> None:
    assert find_amazon2023_files(tmp_path) is None
    with pytest.raises(DataFormatError, match="no Amazon 2023 files"):
        find_amazon2023_files(tmp_path, required=True)
    write_2023(tmp_path, gz=True)
    assert find_amazon2023_files(tmp_path).reviews.name == "Beauty.jsonl.gz"
    write_2023(tmp_path, gz=False, category="All_Toys")
    with pytest.raises(DataFormatError, match="several categories.*All_Toys, Beauty"):
        find_amazon2023_files(tmp_path)
    assert find_amazon2023_files(tmp_path, "All_Toys").meta.name == "meta_All_Toys.jsonl"


# ------------------------------------------------------------------------------------ the DataModule
def test_sequence_datamodule_converts_a_2023_directory(raw_dir: Path) -> None:
    from datamodules.sequence import SequenceDataModule

    dm = SequenceDataModule(data_dir=str(raw_dir))
    dm.setup("fit")
    assert (dm.catalogue.num_users, dm.catalogue.num_items) == (5, 5)
    assert read_manifest(raw_dir / "lcrec" / "Beauty")["converter"].startswith("amazon2023/")


def test_datamodule_source_amazon2023_names_the_missing_meta_file(tmp_path: Path) -> None:
    from datamodules.sequence import SequenceDataModule

    write_lines(tmp_path / "Beauty.jsonl", [json.dumps(r) for r in reviews_2023()])
    with pytest.raises(DataFormatError, match=r"found Beauty\.jsonl but no meta_Beauty\.jsonl"):
        SequenceDataModule(data_dir=str(tmp_path), source="amazon2023").setup("fit")
    with pytest.raises(DataFormatError, match=r"found Beauty\.jsonl but no meta_Beauty\.jsonl"):
        SequenceDataModule(data_dir=str(tmp_path)).setup("fit")  # auto detection gives the same precise error
