"""Raw Amazon 2018 -> LC-Rec conversion: recipe, text cleaning, manifest reuse, errors and the DataModule path.

The fixture is a 5x5 block of core users x core items plus everything the recipe must remove: an item with no
meta line, an item whose title is empty after cleaning, a user whose repeated reviews only look like 5, and a
cascade (WEAK has 3 reviewers -> VICTIM drops to 4 -> CASCADE drops to 4) that only iterated k-core removes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.amazon_raw import RawFiles, convert_amazon_raw, find_raw_files, k_core
from datamodules.artifacts import read_manifest
from datamodules.catalogue import DataFormatError, load_lcrec, write_lcrec

# asins chosen so that sorted order (the id order) differs from the order below
CREAM, GEL, BRUSH, MASK, SOAP = "0451", "1234", "B00A", "B00B", "B00C"
NO_META, NO_TITLE, WEAK, CASCADE = "B0NM", "B0NT", "B0WK", "B0CS"
CORE = {  # chronological; AM2's last two share a timestamp (file order decides)
    "AZ1": [CREAM, SOAP, GEL, BRUSH, MASK],
    "AM2": [SOAP, BRUSH, CREAM, MASK, GEL],
    "AA3": [GEL, MASK, SOAP, CREAM, BRUSH],
    "AQ4": [BRUSH, CREAM, MASK, GEL, SOAP],
    "AC5": [MASK, GEL, BRUSH, SOAP, CREAM],
}
# ids by sorted original id: users AA3 AC5 AM2 AQ4 AZ1, items 0451 1234 B00A B00B B00C
EXPECTED_SEQUENCES = {
    0: [1, 3, 4, 0, 2],
    1: [3, 1, 2, 4, 0],
    2: [4, 2, 0, 3, 1],
    3: [2, 0, 3, 1, 4],
    4: [0, 4, 1, 2, 3],
}
EXPECTED_TEXT = {
    0: {
        "title": "Rose & Honey Cream",
        "description": "Soft and rich. Daily use",
        "brand": "Acme",
        "categories": "Beauty, Skin & Care",
    },
    1: {"title": "Aloe Gel", "description": "Cooling gel", "brand": "", "categories": "Beauty, Gels"},
    2: {"title": "Brush", "description": "", "brand": "", "categories": ""},
    3: {"title": "Mask", "description": "Clay mask", "brand": "", "categories": ""},
    4: {"title": "Soap", "description": "", "brand": "", "categories": ""},
}
SPECIAL_REVIEWS = {  # (user, item) -> (summary, reviewText); the rest say "<user> likes <item>"
    ("AZ1", CREAM): ("Love it!", "Smells &amp; feels   <i>great</i>"),
    ("AA3", GEL): ("Fine", ""),
    ("AQ4", BRUSH): ("Okay", "Works."),
    ("AC5", MASK): ("", ""),
}


def review(user: str, item: str, time: int, summary: str | None = None, text: str | None = None) -> dict:
    summary, text = (
        SPECIAL_REVIEWS.get((user, item), ("", f"{user} likes {item}")) if summary is None else (summary, text)
    )
    return {"reviewerID": user, "asin": item, "unixReviewTime": time, "summary": summary, "reviewText": text}


def raw_reviews(seed: int = 0) -> list[dict]:
    """All review records, shuffled (seeded) so that file order is not chronological."""
    records = []
    for user, items in CORE.items():
        records += [review(user, item, 1000 + 100 * j) for j, item in enumerate(items) if (user, item) != ("AM2", GEL)]
        records += [review(user, extra, 1050) for extra in (NO_META, NO_TITLE)]
    records += [review(user, WEAK, 1150) for user in ("AZ1", "AM2")]
    records += [review(user, CASCADE, 1250) for user in ("AZ1", "AM2", "AA3", "AQ4")]
    records += [review("AV6", item, 1000 + j) for j, item in enumerate([WEAK, CASCADE, SOAP, BRUSH, CREAM])]
    records += [review("AD7", item, 1000 + j) for j, item in enumerate([SOAP, SOAP, SOAP, BRUSH, BRUSH])]
    # the later repeat of AZ1's first item must lose to the earlier one
    records.append(review("AZ1", CREAM, 9999, "Changed my mind", "meh"))
    records = [records[k] for k in np.random.default_rng(seed).permutation(len(records))]
    # AM2's GEL ties with its MASK at time 1300; MASK comes first in the file, so first in the sequence
    return records + [review("AM2", GEL, 1300)]


def raw_meta() -> list[str]:
    lines = [
        {
            "asin": CREAM,
            "title": "  Rose &amp; Honey <b>Cream</b>  ",
            "brand": "Acme",
            "description": ["<p>Soft&nbsp;and   rich.</p>", "", "  Daily use "],
            "category": ["Beauty", "Skin &amp; Care", "Beauty"],
        },
        {"asin": BRUSH, "title": "Brush"},
        {"asin": MASK, "title": "Mask", "description": "<div>Clay\n\tmask</div>"},
        {"asin": SOAP, "title": "Soap"},
        {"asin": SOAP, "title": "Second soap line"},  # duplicate asin: the first line wins
        {"asin": NO_TITLE, "title": "<br>"},
        {"asin": WEAK, "title": "Weak"},
        {"asin": CASCADE, "title": "Cascade"},
        {"asin": "B0UNREVIEWED", "title": "Never reviewed"},
    ]
    # some Amazon meta dumps are Python literals, not JSON
    python_literal = (
        "{'asin': '1234', 'title': 'Aloe Gel', 'description': 'Cooling\\n gel', 'categories': [['Beauty', 'Gels']]}"
    )
    return [json.dumps(line) for line in lines[:2]] + [python_literal] + [json.dumps(line) for line in lines[2:]]


def write_lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_raw(directory: Path, gz: bool, category: str = "Beauty", reviews: list[dict] | None = None) -> RawFiles:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".json.gz" if gz else ".json"
    review_name = f"{category}{suffix}" if gz else f"{category}_5{suffix}"  # both naming schemes
    return RawFiles(
        category,
        write_lines(directory / review_name, [json.dumps(r) for r in (reviews or raw_reviews())]),
        write_lines(directory / f"meta_{category}{suffix}", raw_meta()),
    )


@pytest.fixture(params=["gz", "plain"])
def raw_dir(request, tmp_path: Path) -> Path:
    write_raw(tmp_path / "raw", gz=request.param == "gz")
    return tmp_path / "raw"


def mtimes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------------------- the recipe
def test_conversion_matches_hand_derived_output(raw_dir: Path, tmp_path: Path) -> None:
    out = convert_amazon_raw(raw_dir, "Beauty", tmp_path / "out")
    inter = json.loads((out / "Beauty.inter.json").read_text())
    assert inter == {str(user): items for user, items in EXPECTED_SEQUENCES.items()}
    item_text = json.loads((out / "Beauty.item.json").read_text())
    assert item_text == {str(item): text for item, text in EXPECTED_TEXT.items()}
    assert (out / "Beauty.user2id").read_text() == "AA3\t0\nAC5\t1\nAM2\t2\nAQ4\t3\nAZ1\t4\n"
    assert (out / "Beauty.item2id").read_text() == "0451\t0\n1234\t1\nB00A\t2\nB00B\t3\nB00C\t4\n"
    manifest = read_manifest(out)
    assert manifest["counts"] == {"users": 5, "items": 5, "interactions": 25}
    assert (manifest["user_k"], manifest["item_k"]) == (5, 5)


def test_reviews_are_cleaned_and_empty_ones_dropped(raw_dir: Path, tmp_path: Path) -> None:
    out = convert_amazon_raw(raw_dir, "Beauty", tmp_path / "out")
    reviews = json.loads((out / "Beauty.review.json").read_text())
    assert reviews["4"]["0"] == "Love it! Smells & feels great"  # AZ1's earliest CREAM review, not the repeat
    assert reviews["0"]["1"] == "Fine"
    assert reviews["3"]["2"] == "Okay. Works."
    assert "3" not in reviews["1"]  # AC5 on MASK had neither summary nor text
    assert reviews["2"]["4"] == "AM2 likes B00C"
    assert sum(map(len, reviews.values())) == 24


def test_load_lcrec_matches_directly_written_expected(raw_dir: Path, tmp_path: Path) -> None:
    converted = load_lcrec(convert_amazon_raw(raw_dir, "Beauty", tmp_path / "out"), "Beauty")
    write_lcrec(tmp_path / "expected", "Beauty", EXPECTED_SEQUENCES, EXPECTED_TEXT)
    expected = load_lcrec(tmp_path / "expected", "Beauty")
    assert converted.num_items == expected.num_items == 5
    for name in ("user_ids", "offsets", "items"):
        np.testing.assert_array_equal(getattr(converted, name), getattr(expected, name))
    assert converted.item_text == expected.item_text


def test_k_core_iterates_until_stable() -> None:
    # item 2 has one reviewer -> user 2 drops to 1 -> item 1 drops to 1; one pass would keep (2, 1) and (0, 1)
    users = np.array([0, 0, 1, 1, 2, 2, 0])
    items = np.array([0, 3, 0, 3, 2, 1, 1])
    assert k_core(users, items, 2, 2).tolist() == [True, True, True, True, False, False, False]


# ------------------------------------------------------------------------------------ manifest reuse
def test_second_conversion_is_a_no_op(raw_dir: Path, tmp_path: Path) -> None:
    out = convert_amazon_raw(raw_dir, "Beauty", tmp_path / "out")
    before = mtimes(out)
    convert_amazon_raw(raw_dir, "Beauty", out)
    assert mtimes(out) == before


def test_changed_raw_file_or_k_reconverts(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", gz=True)
    out = convert_amazon_raw(raw.reviews.parent, "Beauty", tmp_path / "out")
    old_hash = read_manifest(out)["raw_sha256"]
    reviews = [r if (r["reviewerID"], r["asin"]) != ("AA3", GEL) else {**r, "summary": "Great"} for r in raw_reviews()]
    write_raw(tmp_path / "raw", gz=True, reviews=reviews)
    convert_amazon_raw(raw.reviews.parent, "Beauty", out)
    assert read_manifest(out)["raw_sha256"] != old_hash
    assert json.loads((out / "Beauty.review.json").read_text())["0"]["1"] == "Great"
    # at 4-core the cascade stops before the victim user: AV6 keeps 4 interactions
    convert_amazon_raw(raw.reviews.parent, "Beauty", out, user_k=4, item_k=4)
    assert read_manifest(out)["counts"]["users"] == 6


# -------------------------------------------------------------------------------------------- errors
def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in raw_reviews()[:2]] + ['{"reviewerID": "A", "asin": ']
    write_lines(tmp_path / "Beauty.json", lines)
    write_lines(tmp_path / "meta_Beauty.json", raw_meta())
    with pytest.raises(DataFormatError, match=r"Beauty\.json: line 3 is not valid JSON"):
        convert_amazon_raw(tmp_path, "Beauty", tmp_path / "out")


def test_missing_required_field_names_the_field(tmp_path: Path) -> None:
    record = {k: v for k, v in raw_reviews()[0].items() if k != "unixReviewTime"}
    write_lines(tmp_path / "Beauty.json", [json.dumps(raw_reviews()[1]), json.dumps(record)])
    write_lines(tmp_path / "meta_Beauty.json", raw_meta())
    with pytest.raises(DataFormatError, match=r'line 2 misses the required field "unixReviewTime"'):
        convert_amazon_raw(tmp_path, "Beauty", tmp_path / "out")


def test_missing_meta_file(tmp_path: Path) -> None:
    write_lines(tmp_path / "Beauty.json.gz", [json.dumps(r) for r in raw_reviews()])
    for call in (lambda: find_raw_files(tmp_path), lambda: find_raw_files(tmp_path, "Beauty", required=True)):
        with pytest.raises(DataFormatError, match=r"found Beauty\.json\.gz but no meta_Beauty\.json"):
            call()
    with pytest.raises(DataFormatError, match="meta_Beauty"):
        convert_amazon_raw(tmp_path, "Beauty", tmp_path / "out")


def test_empty_after_k_core_suggests_smaller_k(raw_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"Beauty.*no interactions left.*smaller user_k/item_k"):
        convert_amazon_raw(raw_dir, "Beauty", tmp_path / "out", user_k=6)


def test_discovery_infers_or_rejects_categories(tmp_path: Path) -> None:
    assert find_raw_files(tmp_path) is None
    with pytest.raises(DataFormatError, match="no raw Amazon files"):
        find_raw_files(tmp_path, required=True)
    beauty = write_raw(tmp_path, gz=True)
    assert find_raw_files(tmp_path) == beauty
    write_raw(tmp_path, gz=False, category="Toys")
    with pytest.raises(DataFormatError, match="several categories.*Beauty, Toys"):
        find_raw_files(tmp_path)
    assert find_raw_files(tmp_path, "Toys").reviews.name == "Toys_5.json"


# ------------------------------------------------------------------------------------ the DataModule
def test_sequence_datamodule_converts_raw_directory(raw_dir: Path) -> None:
    from datamodules.sequence import SequenceDataModule

    dm = SequenceDataModule(data_dir=str(raw_dir))
    dm.setup("fit")
    assert dm.catalogue.num_users == 5
    assert dm.catalogue.num_items == 5
    assert read_manifest(raw_dir / "lcrec" / "Beauty")["category"] == "Beauty"  # one directory per category
