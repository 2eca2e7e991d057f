"""The LLM's evaluation paths: predict_step (the serving hook), and test/predict from a checkpoint through the CLI,
which must reproduce the final evaluation's top-K lists exactly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from datamodules import PromptDataModule
from lightning_modules import GenerativeRecommender
from lightning_modules.cli import main
from tests.conftest import tiny_run_args
from tests.test_prompts_llm import TINY_LLAMA, TOKENIZER, _callbacks, require_tokenizer, synthetic_codes, write_index


def tiny_module(synthetic_dir, tmp_path, **model_args) -> tuple[GenerativeRecommender, PromptDataModule]:
    require_tokenizer()
    index = write_index(tmp_path / "index.json", synthetic_codes())
    dm = PromptDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), eval_batch_size=6
    )
    dm.setup("test")
    torch.manual_seed(0)
    module = GenerativeRecommender(
        tokenizer_path=str(TOKENIZER),
        llama_config=TINY_LLAMA,
        lora=False,
        full_finetune=True,
        num_beams=12,
        eval_top_k=10,
        **model_args,
    )
    module._trainer = SimpleNamespace(datamodule=dm)
    module.setup("test")
    module.configure_model()
    module.eval()
    return module, dm


def test_predict_step_returns_the_users_top_items_without_their_history(synthetic_dir, tmp_path):
    module, dm = tiny_module(synthetic_dir, tmp_path, mask_history=True)
    batch = next(iter(dm.predict_dataloader()))
    out = module.predict_step(batch, 0)
    assert set(out) == {"user", "items", "scores"} and torch.equal(out["user"], batch["user"])
    assert out["items"].shape == out["scores"].shape == (6, 10) and out["items"].dtype == torch.long
    assert ((out["items"] >= 0) & (out["items"] < 120)).all()  # 120 items, a few seen: every slot filled
    assert (out["scores"][:, :-1] >= out["scores"][:, 1:]).all() and (out["scores"] <= 0).all()  # log-probs, best first
    for row in range(6):
        seen = set(batch["seen_items"][batch["seen_rows"] == row].tolist())
        assert seen and not seen & set(out["items"][row].tolist())
    unmasked = GenerativeRecommender(
        tokenizer_path=str(TOKENIZER),
        llama_config=TINY_LLAMA,
        lora=False,
        full_finetune=True,
        num_beams=12,
        eval_top_k=10,
    )
    assert not unmasked.decoding.mask_history and module.decoding.mask_history and module.decoding.num_beams == 12


def test_test_and_predict_from_a_checkpoint_reproduce_the_final_evaluation(synthetic_dir, tmp_path):
    """``lightning test --ckpt_path`` runs the callback's evaluation again; ``predict`` with the TopKWriter serves
    the same lists and scores."""
    require_tokenizer()
    index = write_index(tmp_path / "index.json", synthetic_codes())
    common = (
        "--data.init_args.index",
        str(index),
        "--data.init_args.eval_max_users=6",
        "--data.init_args.test_all_users=false",
    )
    root, export = tmp_path / "fit", tmp_path / "llm"
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/llm.yaml",
                synthetic_dir,
                root,
                "--config",
                str(_callbacks(tmp_path, export)),
                *common,
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=2",
            ),
        ]
    )
    fitted = root / "csv" / "version_0"
    checkpoint = next((fitted / "checkpoints").glob("*.ckpt"))
    main(
        [
            "test",
            *tiny_run_args("synthetic/llm.yaml", synthetic_dir, tmp_path / "test", *common),
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    writer = tmp_path / "writer.yaml"
    writer.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.TopKWriter\n")
    main(
        [
            "predict",
            *tiny_run_args("synthetic/llm.yaml", synthetic_dir, tmp_path / "predict", *common, "--config", str(writer)),
            "--ckpt_path",
            str(checkpoint),
        ]
    )

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    final, again = (
        lines(fitted / "topk_test.rank0.jsonl"),
        lines(tmp_path / "test" / "csv" / "version_0" / "topk_test.rank0.jsonl"),
    )
    served = lines(tmp_path / "predict" / "csv" / "version_0" / "top_k.rank0.jsonl")
    assert len(final) == 6 and [line["items"] for line in again] == [line["items"] for line in final]
    # predict serves every user from the WHOLE history (the test target included), so its lists are not the
    # test's; tests/test_live_serving.py checks them against the live path from the same history
    assert len(served) == 300 and all(len(set(line["items"])) == 20 for line in served) and len(final[0]["items"]) == 20
    tested = json.loads((tmp_path / "test" / "csv" / "version_0" / "test_metrics.json").read_text())["metrics"]
    assert tested == json.loads((fitted / "test_metrics.json").read_text())["metrics"]


def test_testing_without_the_evaluation_callback_is_refused():
    from datamodules.errors import ConfigError

    module = GenerativeRecommender(
        tokenizer_path=str(TOKENIZER), llama_config=TINY_LLAMA, lora=False, full_finetune=True
    )
    module._trainer = SimpleNamespace(callbacks=[])
    with pytest.raises(ConfigError, match="callbacks.BeamSearchEvaluator"):
        module.on_test_start()


def test_ddp_does_not_broadcast_the_trie_tables(synthetic_dir, tmp_path):
    """The trie's buffers are identical on every rank; DDP must not re-send them at every training forward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    module, _ = tiny_module(synthetic_dir, tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(module)
        synced = {id(buffer) for buffer in wrapped.modules_buffers}
        assert not any(id(buffer) in synced for buffer in module.code_trie.buffers())
        assert any(name.startswith("model.") for name in wrapped.named_module_buffers)  # other buffers still synced
    finally:
        dist.destroy_process_group()
