"""Stage 4 (GRPO): advantages and the clipped objective by hand, the KL term, rollouts, rewards, the module's
loading of a stage-3 model, and a tiny ``lightning fit`` of configs/synthetic/rl.yaml through the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from datamodules.rollout_prompts import RolloutPromptDataModule
from lightning_modules import GenerativeRecommender, PreferenceOptimizer
from lightning_modules.cli import main
from lightning_modules.components.code_logprob import item_token_logprobs
from lightning_modules.components.decoding import generate_topk
from lightning_modules.components.grpo import group_advantages, grpo_loss, k3_kl
from lightning_modules.components.rewards import (
    RewardWeights,
    distance_reward,
    hit_reward,
    negative_reward,
    rank_reward,
    total_reward,
)
from lightning_modules.components.rollouts import beam_rollouts, sample_rollouts
from lightning_modules.rl import EXPORT_KIND
from tests.conftest import tiny_run_args
from tests.test_prompts_llm import TINY_LLAMA, _callbacks, llm_run_args, synthetic_codes, write_index


# ------------------------------------------------------------------------------------------ GRPO, by hand
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 5.0, 5.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    advantages = group_advantages(rewards, valid, eps=0.0)
    # row 0: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; row 2: mean 0.5, std sqrt(0.5 / 1)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [0.0] * 4, [math.sqrt(0.5), -math.sqrt(0.5), 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    unscaled = group_advantages(rewards, valid, scale=False)  # Dr. GRPO: centred only
    torch.testing.assert_close(unscaled, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [0.5, -0.5, 0, 0]]))
    lone = group_advantages(torch.tensor([[3.0, 1.0]]), torch.tensor([[True, False]]))
    assert lone.tolist() == [[0.0, 0.0]]  # one valid rollout: nothing to compare it with


def test_clipped_objective_by_hand():
    logp = torch.tensor([[-1.0], [-1.0], [-2.0]], requires_grad=True)
    old = torch.tensor([[-1.5], [-1.5], [-2.0]])
    advantages = torch.tensor([2.0, -1.0, 5.0])
    valid = torch.tensor([True, True, False])  # the third rollout is ignored
    out = grpo_loss(logp, old, logp.detach(), advantages, valid, clip_eps=0.2, kl_coef=0.1)
    ratio = math.exp(0.5)  # 1.6487: outside [0.8, 1.2]
    surrogate = (min(ratio * 2, 1.2 * 2) + min(ratio * -1, 1.2 * -1)) / 2  # (2.4 - 1.6487) / 2
    assert out.surrogate.item() == pytest.approx(surrogate) and out.kl.item() == pytest.approx(0.0)
    assert out.loss.item() == pytest.approx(-surrogate) and out.clip_fraction.item() == pytest.approx(1.0)
    out.loss.backward()
    # the clipped positive rollout has no gradient; the negative one keeps ratio * A (unclipped side of the min)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [ratio / 2], [0.0]]))

    # rho = 1 (logp_old = logp): the gradient is -A / N per rollout, and the KL adds beta * (1 - exp(ref - logp)) / N
    logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.5]])
    out = grpo_loss(logp, logp.detach(), ref, torch.tensor([2.0]), torch.tensor([True]), 0.2, 0.1)
    kl = (math.exp(-0.2) + 0.2 - 1) / 2
    assert out.kl.item() == pytest.approx(kl) and out.loss.item() == pytest.approx(-(2.0 - 0.1 * kl))
    out.loss.backward()
    expected = [(-2.0 + 0.1 * (1 - math.exp(-0.2))) / 2, -2.0 / 2]
    torch.testing.assert_close(logp.grad, torch.tensor([expected]))


def test_k3_is_zero_only_at_the_reference():
    logp = torch.tensor([-0.3, -2.0, -1.0])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    assert (k3_kl(logp, logp + torch.tensor([0.1, -0.4, 1.0])) > 0).all()


# ----------------------------------------------------------------------------------------------- rewards
def test_rewards_on_hand_made_groups():
    items = torch.tensor([[4, 7, 9, -1], [3, 5, 6, 8]])
    target = torch.tensor([7, 1])
    assert hit_reward(items, target).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    # by score row 0 ranks 4, 7 (the target), 9 (-1 > -2 > -3): the wrong rollouts at ranks 0 and 2 lose their NDCG
    # discount's share of the group's 4 discounts; the missing rollout, the target and row 1 (no hit) get 0
    scores = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -2.0, -3.0, -4.0]])
    rank = rank_reward(items, target, scores)
    total_discount = 1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    expected = [[-1 / total_discount, 0.0, -1 / math.log2(4) / total_discount, 0.0], [0.0] * 4]
    torch.testing.assert_close(rank, torch.tensor(expected))
    first = rank_reward(items, target, torch.tensor([[-5.0, -0.5, -3.0, 0.0], [0.0] * 4]))  # target first, 9, then 4
    expected = torch.tensor([-1 / math.log2(4), 0.0, -1 / math.log2(3), 0.0]) / total_discount
    torch.testing.assert_close(first[0], expected)
    negatives = torch.tensor([[9, 1, -1], [8, 3, 8]])
    assert negative_reward(items, negatives).tolist() == [[0, 0, -1, 0], [-1, 0, 0, -1]]
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    # row 0's history {0, 0} points to (1, 0); row 1 has no history
    distance = distance_reward(
        torch.tensor([[0, 1, 2, 3], [0, 1, 2, -1]]), torch.tensor([0, 0]), torch.tensor([0, 0]), embeddings
    )
    torch.testing.assert_close(distance, torch.tensor([[0.0, -1.0, -2.0, 1 / math.sqrt(2) - 1], [0.0] * 4]))
    weights = RewardWeights(hit=1.0, rank=0.5, negative=2.0)
    total = total_reward(
        {"hit": hit_reward(items, target), "rank": rank, "negative": negative_reward(items, negatives)}, weights
    )
    assert total[0].tolist() == pytest.approx([-0.5 / total_discount, 1, -2 - 0.5 / 2 / total_discount, 0])
    with pytest.raises(ValueError, match="rewards.rank must be >= 0"):
        RewardWeights(rank=-1.0)
    with pytest.raises(ValueError, match="every weight is 0"):
        RewardWeights(hit=0.0)


# ------------------------------------------------------------------------------------ the module, in process
def _rollout_dm(synthetic_dir, index) -> RolloutPromptDataModule:
    dm = RolloutPromptDataModule(
        data_dir=str(synthetic_dir), source="lcrec", dataset="Synthetic", index=str(index), batch_size=3
    )
    dm.setup("fit")
    return dm


def _attach(module, dm, **trainer):
    module._trainer = SimpleNamespace(datamodule=dm, callbacks=[], **trainer)
    return module


@pytest.fixture(scope="module")
def stage3(synthetic_dir, tiny_tokenizer, tmp_path_factory):
    """Two random tiny stage-3 checkpoints (trie softmax, vocabulary softmax) in the format Lightning writes."""
    root = tmp_path_factory.mktemp("stage3")
    index = write_index(root / "index.json", synthetic_codes())
    dm = _rollout_dm(synthetic_dir, index)
    paths = {}
    for softmax in ("trie", "vocabulary"):
        torch.manual_seed(0)
        sft = GenerativeRecommender(
            tokenizer_path=str(tiny_tokenizer), llama_config=TINY_LLAMA, lora=False, full_finetune=True,
            code_softmax=softmax,
        )  # fmt: skip
        _attach(sft, dm).setup("fit")
        sft.configure_model()
        checkpoint = {"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams)}
        sft.on_save_checkpoint(checkpoint)
        paths[softmax] = root / f"{softmax}.ckpt"
        torch.save(checkpoint, paths[softmax])
    return SimpleNamespace(index=index, dm=dm, tokenizer=tiny_tokenizer, **paths)


def _policy(stage3, softmax="trie", **args) -> PreferenceOptimizer:
    module = PreferenceOptimizer(
        init_from=str(getattr(stage3, softmax)), tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA,
        code_softmax=softmax, num_beams=12, eval_top_k=10, **args,
    )  # fmt: skip
    _attach(module, stage3.dm).setup("fit")
    module.configure_model()
    return module


def _batch(stage3) -> dict[str, torch.Tensor]:
    return next(iter(stage3.dm.train_dataloader()))


def test_rollouts_are_distinct_valid_items_scored_as_the_decoder_ranks(stage3):
    module = _policy(stage3, group_size=6, mask_history=True)
    module.eval()
    batch = _batch(stage3)
    items = module.rollouts(batch)
    assert items.shape == (3, 6) and (items >= 0).all() and (items < 120).all()
    assert all(len(set(row)) == 6 for row in items.tolist())
    for row in range(3):  # mask_history: no seen item is rolled out
        assert not set(batch["seen_items"][batch["seen_rows"] == row].tolist()) & set(items[row].tolist())
    codes = module.item_codes[items.reshape(-1)]
    assert torch.equal(module.code_trie.items_of(codes), items.reshape(-1))  # valid codes of those very items
    # the per-token log-probs sum to the beam search's own scores (the trie softmax it ranks by), best first
    top, scores = generate_topk(
        module.model, module.tokenizer, batch["input_ids"], batch["attention_mask"], module.code_trie, 6, 6,
        renormalize=True, exclude=(batch["seen_rows"], batch["seen_items"]),
    )  # fmt: skip
    assert torch.equal(top, items)
    with torch.no_grad():
        logp = item_token_logprobs(
            module.causal_lm(), batch["input_ids"].repeat_interleave(6, 0),
            batch["attention_mask"].repeat_interleave(6, 0), codes, module.code_trie, True,
        )  # fmt: skip
    assert logp.shape == (18, 3)
    torch.testing.assert_close(logp.sum(1).view(3, 6), scores, atol=1e-4, rtol=0)
    sampled = sample_rollouts(
        module.model, module.tokenizer, module.code_trie, batch["input_ids"], batch["attention_mask"], 5, True,
        temperature=1.0, top_k=0, top_p=1.0,
    )  # fmt: skip
    assert sampled.shape == (3, 5) and ((sampled >= 0) & (sampled < 120)).all()
    beams = beam_rollouts(
        module.model, module.tokenizer, module.code_trie, batch["input_ids"], batch["attention_mask"], 4, True
    )
    assert beams.shape == (3, 4) and all(len(set(row)) == 4 for row in beams.tolist())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_kl_is_zero_while_the_policy_is_the_reference(stage3, mode):
    args = {"lora": True, "full_finetune": False} if mode == "lora" else {}
    softmax = "vocabulary" if mode == "lora" else "trie"  # LoRA cannot read the trie's LM-head rows directly
    module = _policy(stage3, softmax, group_size=4, **args)
    assert (module.reference is None) == (mode == "lora")  # LoRA: the adapter-free base is the reference
    sft = torch.load(getattr(stage3, softmax), weights_only=False)["state_dict"]
    base = module.causal_lm().get_input_embeddings()
    embedding = base.original_module.weight if hasattr(base, "original_module") else base.weight  # peft wrapper
    assert torch.equal(embedding, sft["model.model.embed_tokens.weight"])  # started from the stage-3 weights
    batch = _batch(stage3)
    items = module.rollouts(batch)
    codes = module.item_codes[items.reshape(-1)]
    ids, mask = batch["input_ids"].repeat_interleave(4, 0), batch["attention_mask"].repeat_interleave(4, 0)
    module.eval()

    def both():
        with torch.no_grad():
            policy = item_token_logprobs(module.causal_lm(), ids, mask, codes, module.code_trie, softmax == "trie")
            with module.reference_lm() as reference:
                ref = item_token_logprobs(reference, ids, mask, codes, module.code_trie, softmax == "trie")
        return policy, ref

    policy, ref = both()
    assert k3_kl(policy, ref).abs().max().item() < 1e-6
    with torch.no_grad():  # move the policy: the reference stays where it was
        for name, param in module.model.named_parameters():
            if param.requires_grad and ("lora_B" in name or mode == "full"):
                param.add_(0.05 * torch.randn_like(param))
    moved, ref_after = both()
    torch.testing.assert_close(ref_after, ref)
    assert k3_kl(moved, ref_after).mean().item() > 1e-4


def test_training_step_logs_rewards_and_backpropagates(stage3, tmp_path):
    embeddings = tmp_path / "dccf.pt"
    torch.save(torch.randn(120, 8, generator=torch.Generator().manual_seed(1)), embeddings)
    rewards = RewardWeights(hit=1.0, rank=0.5, negative=0.5, distance=0.2)
    module = _policy(stage3, group_size=4, rewards=rewards, behaviour_embeddings=str(embeddings))
    module._trainer.global_step, module._trainer.global_rank = 0, 0
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    module.log = lambda name, value, **_: logged.update({name: value})
    loss = module.training_step(_batch(stage3), 0)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is None for p in module.reference.parameters())
    assert {f"train/reward_{name}" for name in ("hit", "rank", "negative", "distance")} <= set(logged)
    assert logged["train/kl"].item() == pytest.approx(0.0, abs=1e-6) and logged["train/valid_rollouts"] == 1.0


def test_a_lora_stage3_checkpoint_starts_rl_merged(stage3, tmp_path):
    """A stage-3 LoRA checkpoint: its adapter is rebuilt, loaded and merged; RL starts from the SFT scores."""
    torch.manual_seed(1)
    sft = GenerativeRecommender(
        tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA, lora=True, full_finetune=False,
        code_softmax="vocabulary", lora_rank=4,
    )  # fmt: skip
    _attach(sft, stage3.dm).setup("fit")
    sft.configure_model()
    with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
        for name, param in sft.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))
    checkpoint = {"state_dict": sft.state_dict(), "hyper_parameters": dict(sft.hparams)}
    sft.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "lora.ckpt")
    module = PreferenceOptimizer(
        init_from=str(tmp_path / "lora.ckpt"), tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA,
        code_softmax="vocabulary", group_size=4,
    )  # fmt: skip
    _attach(module, stage3.dm).setup("fit")
    module.configure_model()
    batch = _batch(stage3)
    sft.eval(), module.eval()
    with torch.no_grad():
        expected = sft.causal_lm()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = module.causal_lm()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not any("lora" in name for name, _ in module.model.named_parameters())  # merged into plain weights
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bad_starts_are_refused(stage3, tmp_path):
    with pytest.raises(ValueError, match="trainer.strategy: DeepSpeed ZeRO-3"):
        module = PreferenceOptimizer(
            init_from=str(stage3.trie), tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA,
            code_softmax="trie",
        )  # fmt: skip
        _attach(module, stage3.dm, strategy=SimpleNamespace(zero_stage_3=True)).configure_model()
    with pytest.raises(ValueError, match="code_softmax: .* was trained and ranks with code_softmax: trie"):
        _mismatched_softmax(stage3)
    other = torch.load(stage3.trie, weights_only=False)
    other["dataset_fingerprint"] = {**other["dataset_fingerprint"], "index_hash": "0" * 64}
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="init_from checkpoint .*index_hash"):
        module = PreferenceOptimizer(
            init_from=str(tmp_path / "other.ckpt"), tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA,
            code_softmax="trie",
        )  # fmt: skip
        _attach(module, stage3.dm).configure_model()
    with pytest.raises(ValueError, match="init_from: .* is neither"):
        module = PreferenceOptimizer(
            init_from=str(tmp_path / "nowhere"), tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA
        )
        _attach(module, stage3.dm).configure_model()
    with pytest.raises(ValueError, match="behaviour_embeddings"):
        PreferenceOptimizer(
            init_from="x", llama_config=TINY_LLAMA, tokenizer_path="t", rewards=RewardWeights(distance=1)
        )
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        PreferenceOptimizer(init_from="x", llama_config=TINY_LLAMA, tokenizer_path="t", group_size=1)


def _mismatched_softmax(stage3):
    module = PreferenceOptimizer(
        init_from=str(stage3.trie), tokenizer_path=str(stage3.tokenizer), llama_config=TINY_LLAMA,
        code_softmax="vocabulary",
    )  # fmt: skip
    _attach(module, stage3.dm).configure_model()


# ---------------------------------------------------------------------------------------------- the CLI
def test_fit_the_rl_stage_from_a_stage3_export(synthetic_dir, tiny_tokenizer, tmp_path):
    """Stage 3 (tiny, 2 steps) through the CLI, then configs/synthetic/rl.yaml from its export (fast_dev_run)."""
    index = write_index(tmp_path / "index.json", synthetic_codes())
    common = (
        "--data.init_args.index",
        str(index),
        "--data.init_args.eval_max_users=6",
        "--data.init_args.test_all_users=false",
    )
    stage3 = tmp_path / "llm"
    main(
        [
            "fit",
            *llm_run_args(
                synthetic_dir, tmp_path / "sft", tiny_tokenizer, "--config", str(_callbacks(tmp_path, stage3)), *common
            ),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
        ]
    )
    assert json.loads((stage3 / "manifest.json").read_text())["kind"] == EXPORT_KIND
    embeddings = tmp_path / "dccf.pt"
    torch.save(torch.randn(120, 8), embeddings)
    root, export = tmp_path / "rl", tmp_path / "rl_export"
    callbacks = tmp_path / "rl_callbacks"
    callbacks.mkdir()
    main(
        [
            "fit",
            *tiny_run_args(
                "synthetic/rl.yaml", synthetic_dir, root, "--config", str(_callbacks(callbacks, export)), *common,
                f"--model.init_args.init_from={stage3}", f"--model.init_args.tokenizer_path={tiny_tokenizer}",
                "--model.init_args.group_size=4", "--data.init_args.batch_size=2",
                "--model.init_args.rewards.negative=0.5", "--model.init_args.rewards.distance=0.2",
                f"--model.init_args.behaviour_embeddings={embeddings}", "--trainer.fast_dev_run=1",
            ),
        ]
    )  # fmt: skip
    metrics = json.loads(next(root.rglob("test_metrics.json")).read_text())["metrics"]
    assert {"hr@10", "ndcg@10"} <= set(metrics)
    assert json.loads((export / "manifest.json").read_text())["kind"] == EXPORT_KIND
