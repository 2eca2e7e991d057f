"""Serving end to end on a tiny trained stage-3 model: the cache build (SQLite and Redis) through ``lightning
predict``, the live path over the export (the same lists as the cache), the service answering known and unknown
users, and cold-start items reaching the cache through an extended index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from callbacks.cache_writer import original_ids
from datamodules import load_item_index, load_lcrec
from datamodules.catalogue import DataFormatError
from datamodules.errors import SemConvError
from datamodules.recommendation_store import open_store
from lightning_modules.cli import main
from lightning_modules.live import UnknownItems, load_live_recommender
from lightning_modules.service import create_app
from tests import serving_fixtures
from tests.conftest import CONFIGS, tiny_run_args
from tests.test_prompts_llm import (
    _callbacks,
    synthetic_codes,
    write_export,
)

redis_url = serving_fixtures.redis_url  # fixture
K = 20  # configs/synthetic/llm.yaml: eval_top_k


def cold_start_codes(codes: np.ndarray) -> np.ndarray:
    """New items: every prefix of the catalogue's items with each last-level code they leave free (4..7)."""
    prefixes = np.unique(codes[:, :2], axis=0)
    return np.concatenate([np.column_stack([prefixes, np.full(len(prefixes), last)]) for last in range(4, 8)])


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory, tiny_tokenizer):
    """A tiny stage-3 run on a stage-2-style index: its checkpoint, export and the index."""
    tmp = tmp_path_factory.mktemp("live")
    catalogue = load_lcrec(str(synthetic_dir), "Synthetic")
    index = write_export(tmp / "codebook", catalogue)
    root, export = tmp / "fit", tmp / "llm"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/llm.yaml",
                synthetic_dir,
                root,
                "--config",
                str(_callbacks(tmp, export)),
                f"--model.init_args.tokenizer_path={tiny_tokenizer}",
                "--data.init_args.index",
                str(index),
                "--data.init_args.eval_max_users=4",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
                "--test_after_fit=false",
            ),
        ]
    )
    checkpoint = next((root / "csv" / "version_0" / "checkpoints").glob("*.ckpt"))
    return {
        "tmp": tmp,
        "catalogue": catalogue,
        "index": index,
        "export": export,
        "ckpt": checkpoint,
        "data": synthetic_dir,
    }


def build_cache(
    trained, store: str, index: Path, name: str, users: list[str] | None = None, export: bool = True
) -> None:
    """``lightning predict --config llm.yaml --config serving/cache.yaml --ckpt_path <ckpt>`` into ``store`` (recording
    the export's hash unless ``export`` is false: then the checkpoint's)."""
    selection = ["--trainer.callbacks.init_args.model_dir", str(trained["export"])] if export else []
    if users is not None:
        (trained["tmp"] / f"{name}.users").write_text("\n".join(users))
        selection += ["--data.init_args.predict_users", str(trained["tmp"] / f"{name}.users")]
    # after the cache piece: `--trainer.callbacks.init_args.*` sets the last callback listed so far
    main(
        [
            "predict",
            *tiny_run_args(
                "synthetic/llm.yaml",
                trained["data"],
                trained["tmp"] / name,
                "--config",
                str(CONFIGS / "serving/cache.yaml"),
                "--data.init_args.index",
                str(index),
                "--trainer.callbacks.init_args.store",
                store,
                *selection,
            ),
            "--ckpt_path",
            str(trained["ckpt"]),
        ]
    )


@pytest.fixture(scope="module")
def cached(trained):
    url = f"sqlite:///{trained['tmp'] / 'recommendations.sqlite'}"
    build_cache(trained, url, trained["index"], "predict")
    return url


def test_live_path_equals_the_cache_and_the_service_answers(trained, cached, redis_url):
    catalogue = trained["catalogue"]
    users, items = original_ids(catalogue)
    store = open_store(cached)
    record = store.current_version()
    assert (record.num_users, record.k, record.meta.num_items) == (catalogue.num_users, K, catalogue.num_items)
    live = load_live_recommender(trained["export"])
    assert live.decoding.num_beams == 20 and not live.decoding.do_sample and live.decoding.mask_history
    for row in (0, 7, 123, catalogue.num_users - 1):
        history = items[catalogue.sequence(row)].tolist()
        cached_list = store.lookup(users[row], K)
        answer, scores = live(history, K)
        assert answer == cached_list.items and not set(answer) & set(history) and len(answer) == K
        np.testing.assert_allclose(scores, cached_list.scores, rtol=1e-4)
    with pytest.raises(UnknownItems, match="unknown item id 'no-such-item'"):
        live(["0", "no-such-item"], 5)

    client = TestClient(create_app(store, live))
    user = users[7]
    known = client.get(f"/v1/users/{user}/recommendations?k=10").json()
    assert known["items"][0]["item"] == store.lookup(user, 1).items[0] and not known["fallback"]
    assert client.get("/v1/users/nobody/recommendations?k=3").json()["fallback"] is True
    posted = client.post("/v1/recommendations", json={"history": items[catalogue.sequence(7)].tolist(), "k": 10})
    assert [entry["item"] for entry in posted.json()["items"]] == store.lookup(user, 10).items
    refused = client.post("/v1/recommendations", json={"history": ["3", "x9"]})
    assert refused.status_code == 422 and "'x9'" in refused.json()["error"]

    rows = (0, 7, catalogue.num_users - 1)
    build_cache(trained, redis_url, trained["index"], "predict_redis", [users[row] for row in rows])  # into Redis
    redis_store = open_store(redis_url)
    for row in rows:
        assert redis_store.lookup(users[row], K).items == store.lookup(users[row], K).items


def test_cold_start_items_reach_the_cache(trained):
    catalogue, tmp = trained["catalogue"], trained["tmp"]
    base = synthetic_codes()
    new = cold_start_codes(base)
    record = {"first_item": len(base), "last_item": len(base) + len(new) - 1, "count": len(new)}
    extended = write_export(
        tmp / "extended", catalogue, np.concatenate([base, new]), num_items=len(base) + len(new), cold_start=[record]
    )
    index = load_item_index(extended, catalogue, new_items=True)
    assert index.new_items == len(new) and (index.codes[: len(base)] == base).all()  # existing codes never change
    assert index.trained_index_hash == load_item_index(trained["index"], catalogue).index_hash
    with pytest.raises(DataFormatError, match="new_items=True"):
        load_item_index(extended, catalogue)  # a reader that did not ask for new items gets a clear error

    url = f"sqlite:///{tmp / 'cold.sqlite'}"
    users, _ = original_ids(catalogue)
    build_cache(trained, url, extended, "predict_cold", users[:64].tolist())
    store = open_store(url)
    lists = [store.lookup(user, K).items for user in users[:64]]
    recommended_new = {int(item) for row in lists for item in row if int(item) >= len(base)}
    assert store.current_version().meta.num_items == len(base) + len(new) and recommended_new
    assert recommended_new <= set(range(len(base), len(base) + len(new)))
    # the live path over the same extended index ranks as the build did
    live = load_live_recommender(trained["export"], index_dir=extended)
    row = next(row for row, items in enumerate(lists) if any(int(item) >= len(base) for item in items))
    assert live([str(item) for item in catalogue.sequence(row)], K)[0] == lists[row]


def test_an_index_that_changes_trained_codes_is_refused(trained, capsys):
    catalogue, tmp = trained["catalogue"], trained["tmp"]
    base = synthetic_codes()
    moved = base.copy()
    moved[[0, 1]] = moved[[1, 0]]  # two existing items swap codes
    new = cold_start_codes(base)[:3]
    record = {"first_item": len(base), "last_item": len(base) + 2, "count": 3}
    changed = write_export(
        tmp / "changed", catalogue, np.concatenate([moved, new]), num_items=len(base) + 3, cold_start=[record]
    )
    with pytest.raises(SystemExit):
        build_cache(trained, f"sqlite:///{tmp / 'refused.sqlite'}", changed, "predict_refused")
    assert "first 120 items' codes are not the ones the checkpoint was trained on" in capsys.readouterr().err
    with pytest.raises(SemConvError, match="do not have the codes the model"):
        load_live_recommender(trained["export"], index_dir=changed)
    manifest = json.loads((trained["export"] / "manifest.json").read_text())
    # configs/synthetic/llm.yaml trains with code_softmax: trie, so the beam search ranks by the renormalised score
    assert manifest["decoding"] == {"num_beams": 20, "top_k": K, "renormalize": True}


def test_semconv_serve_with_model_checks_the_store_and_wires_the_live_path(trained, cached, monkeypatch, capsys):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app))
    main(["serve", "--store", cached, "--model", str(trained["export"])])
    catalogue = trained["catalogue"]
    users, items = original_ids(catalogue)
    history = items[catalogue.sequence(3)].tolist()
    posted = TestClient(served["app"]).post("/v1/recommendations", json={"history": history})
    assert [entry["item"] for entry in posted.json()["items"]] == open_store(cached).lookup(users[3], 10).items
    other = f"sqlite:///{trained['tmp'] / 'other.sqlite'}"  # a cache built from the checkpoint, not the export
    build_cache(trained, other, trained["index"], "other", users[:2].tolist(), export=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--store", other, "--model", str(trained["export"])])
    assert exit_info.value.code == 2 and "built for model hash" in capsys.readouterr().err
