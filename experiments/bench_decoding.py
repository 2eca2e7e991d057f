"""Benchmark trie-constrained beam search on Games histories.

Measures, side by side in one run (the modes are interleaved batch by batch, so load drift hits all alike):

(a) end-to-end generation time, constrained (our :class:`TrieLogitsProcessor`) / unconstrained (target <= 1.10);
(b) time inside our processor / time inside transformers' ``PrefixConstrainedLogitsProcessor`` driven by the
    LC-Rec-style dict trie (target <= 0.25), timed around each processor's ``__call__``;
(c) evaluation throughput (users/s) at the chosen batch size vs batch 1;
(d) time per call of our processor with each user's history excluded inside the search (``mask_history``) / without,
    on the first ``--masked-histories`` users, and how many returned items were seen ones (must be 0).
(e) end-to-end time of the search over the code-vocabulary view (the default of ``generate_topk``:
    :mod:`lightning_modules.components.code_view`) / over the full vocabulary, with the model's own log-probs and
    with ``renormalize`` (models trained with the trie softmax), on the first ``--view-histories`` users, and how
    many users get the identical top-K list both ways.

Model: a randomly initialised 4-layer, 512-hidden Llama with the Llama-2 vocabulary plus the 4x256 code tokens.
Prompts: LC-Rec's sequential-recommendation prompt over each user's last 20 items before the test target.

    python experiments/bench_decoding.py [--num-histories 512] [--batch-size 16] [--num-beams 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessor, PrefixConstrainedLogitsProcessor

from lightning_modules.components import decoding
from lightning_modules.components.decoding import generate_topk
from lightning_modules.components.trie import CodeTrie, TrieLogitsProcessor

SHARED = Path(__file__).resolve().parents[2] / "shared"
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nThe user has interacted with items {history} in chronological order. Can you predict the next "
    "possible item that the user may expect?\n\n### Response:"
)


def dict_trie_prefix_fn(
    index: Sequence[Sequence[int]], prompt_len: int, eos_id: int
) -> Callable[[int, torch.Tensor], list[int]]:
    """The LC-Rec-style reference: a Python dict trie for transformers' ``PrefixConstrainedLogitsProcessor``.

    ``table[prefix]`` lists the allowed next tokens of every generated prefix (``[eos]`` after a full code);
    a prefix outside the trie may only end, as with :class:`TrieLogitsProcessor`.

    Args:
        index: code token-id tuples (one per item).
        prompt_len: length of the (padded) prompt; generated tokens start there.
        eos_id: end-of-sequence token id.
    """
    children: dict[tuple[int, ...], dict[int, None]] = {}
    for row in index:
        row = tuple(int(token) for token in row)
        for depth in range(len(row)):
            children.setdefault(row[:depth], {})[row[depth]] = None
        children.setdefault(row, {})[eos_id] = None
    table = {prefix: list(nxt) for prefix, nxt in children.items()}
    fallback = [eos_id]

    def prefix_allowed_tokens_fn(batch_id: int, sentence: torch.Tensor) -> list[int]:
        return table.get(tuple(sentence[prompt_len:].tolist()), fallback)

    return prefix_allowed_tokens_fn


def unshared_prompts():
    """Plain ``generate``: every prompt encoded once per beam, without the shared prompt KV cache."""
    return mock.patch.object(decoding, "prompt_cache_kwargs", lambda *args: {})


class Identity(LogitsProcessor):
    """No constraint: the unconstrained baseline runs the same code path with this in place of the trie mask."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores


class Timed(LogitsProcessor):
    """Accumulates the wall time spent in the wrapped processor's ``__call__`` (synchronising on CUDA)."""

    def __init__(self, inner: LogitsProcessor, clock: dict[str, float], key: str) -> None:
        self.inner, self.clock, self.key = inner, clock, key

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cuda = scores.is_cuda
        if cuda:
            torch.cuda.synchronize(scores.device)
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        if cuda:
            torch.cuda.synchronize(scores.device)
        self.clock[self.key] = self.clock.get(self.key, 0.0) + time.perf_counter() - start
        self.clock[self.key + "_calls"] = self.clock.get(self.key + "_calls", 0) + 1
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_histories(
    data_dir: Path, index: dict[str, list[str]], count: int, max_history: int = 20
) -> tuple[list[str], list[list[int]]]:
    """Prompts of the first ``count`` users (by user index): their last ``max_history`` items before the test item,
    and each user's whole history before it (what ``mask_history`` excludes)."""
    inter = json.loads((data_dir / "Games.inter.json").read_text())
    prompts, seen = [], []
    for user in sorted(inter, key=int)[:count]:
        history = inter[user][:-1][-max_history:]
        prompts.append(PROMPT.format(history=", ".join("".join(index[str(item)]) for item in history)))
        seen.append([int(item) for item in inter[user][:-1]])
    return prompts, seen


def build(args: argparse.Namespace):
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama2"))
    tokenizer.add_tokens([f"<{level}_{code}>" for level in "abcd" for code in range(256)])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token
    index = json.loads((SHARED / "data" / "Games" / "Games.index.json").read_text())
    shared = Counter(tuple(codes) for codes in index.values())
    colliding = sum(n for n in shared.values() if n > 1)
    trie = CodeTrie.from_index(index, tokenizer, dedupe=True)
    print(
        f"index: {len(index)} items; {colliding} items share {sum(n > 1 for n in shared.values())} code tuples. The "
        "trie "
        f"keeps the first (lowest id) item per tuple and drops {len(index) - trie.num_items} colliding items -> "
        f"{trie.num_items} items, {trie.num_states} prefix states, next_state table {tuple(trie.next_state.shape)}"
    )
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = torch.device(args.device)
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    prompts, seen = load_histories(SHARED / "data" / "Games", index, args.num_histories)
    return tokenizer, trie.to(device), model, prompts, seen, [tuple(row) for row in _trie_codes(index, tokenizer, trie)]


def _trie_codes(index, tokenizer, trie: CodeTrie) -> list[list[int]]:
    """The code tuples the trie kept (first item per tuple), for the dict-trie reference."""
    kept = set(trie.item_of_leaf.tolist())
    return [tokenizer.convert_tokens_to_ids(index[str(item)]) for item in sorted(kept)]


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, trie, model, prompts, seen, codes = build(args)
    device = next(model.parameters()).device
    bs, beams = args.batch_size, args.num_beams
    batches = [
        tokenizer(prompts[i : i + bs], return_tensors="pt", padding=True).to(device) for i in range(0, len(prompts), bs)
    ]
    prefix_fns: dict[int, object] = {}  # dict tries built once per prompt length, outside the timed region
    clock: dict[str, float] = {}

    def unconstrained(batch):
        return generate_topk(
            model, tokenizer, batch["input_ids"], batch["attention_mask"], trie, beams, beams, processor=Identity()
        )

    def ours(batch, timed: bool):
        processor = TrieLogitsProcessor(trie, batch["input_ids"].shape[1])
        return generate_topk(
            model,
            tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            trie,
            beams,
            beams,
            processor=Timed(processor, clock, "ours") if timed else processor,
        )

    def ours_masked(batch, start: int):
        """``mask_history``: the users' histories excluded inside the search (timed processor)."""
        users = seen[start : start + batch["input_ids"].shape[0]]
        rows = torch.tensor([row for row, items in enumerate(users) for _ in items], device=device)
        items = torch.tensor([item for items in users for item in items], device=device)
        processor = TrieLogitsProcessor(
            trie, batch["input_ids"].shape[1], blocked=trie.blocked_nodes(rows, items, len(users))
        )
        out, _ = generate_topk(
            model,
            tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            trie,
            beams,
            beams,
            processor=Timed(processor, clock, "masked"),
        )
        return sum(len(set(out[row].tolist()) & set(history)) for row, history in enumerate(users))

    def search(batch, renormalize: bool, view: bool):
        """Constrained search over the full vocabulary (``view=False``) or the code-vocabulary view."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return generate_topk(model, tokenizer, ids, mask, trie, beams, beams, renormalize=renormalize, code_view=view)

    def dict_trie(batch):
        plen = batch["input_ids"].shape[1]
        if plen not in prefix_fns:
            prefix_fns[plen] = dict_trie_prefix_fn(codes, plen, tokenizer.eos_token_id)
        processor = Timed(PrefixConstrainedLogitsProcessor(prefix_fns[plen], beams), clock, "dict")
        return generate_topk(
            model, tokenizer, batch["input_ids"], batch["attention_mask"], trie, beams, beams, processor=processor
        )

    def timed(key: str, fn, *fn_args):
        sync(device)
        start = time.perf_counter()
        out = fn(*fn_args)
        sync(device)
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - start
        return out

    # Warm-up (allocator, kernels, the first dict trie) on one batch of each mode, then forget its timings.
    unconstrained(batches[0]), ours(batches[0], True), dict_trie(batches[0]), search(batches[0], True, True)
    clock.clear()
    same, valid, total = 0, 0, 0
    for batch in batches:
        timed("e2e_unconstrained", unconstrained, batch)
        # On CUDA the probe synchronises, so end-to-end time comes from a separate, unprobed call.
        items, _ = timed("e2e_constrained", ours, batch, device.type != "cuda")
        if device.type == "cuda":
            ours(batch, True)
        reference, _ = dict_trie(batch)
        same += int((items == reference).all(dim=1).sum())
        valid += int((items >= 0).sum())
        total += items.numel()
    view_same = {False: 0, True: 0}
    view_batches = batches[: max(1, args.view_histories // bs)]
    for batch in view_batches:
        for renormalize in (False, True):
            suffix = "_renormalized" if renormalize else ""
            full_items, _ = timed("full" + suffix, search, batch, renormalize, False)
            view_items, _ = timed("view" + suffix, search, batch, renormalize, True)
            view_same[renormalize] += int((full_items == view_items).all(dim=1).sum())
    clock["view_users"] = sum(batch["input_ids"].shape[0] for batch in view_batches)
    clock["view_same"], clock["view_same_renormalized"] = view_same[False], view_same[True]
    seen_returned = sum(
        ours_masked(batch, n * bs) for n, batch in enumerate(batches[: max(1, args.masked_histories // bs)])
    )
    clock["seen_returned"] = seen_returned
    single = prompts[: args.batch1_histories or len(prompts)]
    for prompt in single:
        encoded = tokenizer([prompt], return_tensors="pt").to(device)
        timed("e2e_batch1", ours, encoded, False)
    report(args, clock, len(prompts), len(single), same, valid, total)


def report(args, clock: dict[str, float], users: int, users_b1: int, same: int, valid: int, total: int) -> None:
    ratio_a = clock["e2e_constrained"] / clock["e2e_unconstrained"]
    ratio_b = clock["ours"] / clock["dict"]
    throughput = users / clock["e2e_constrained"]
    throughput_b1 = users_b1 / clock["e2e_batch1"]
    rows = [
        ("unconstrained generate, total s", f"{clock['e2e_unconstrained']:.3f}"),
        ("constrained (ours) end-to-end, total s", f"{clock['e2e_constrained']:.3f}"),
        (
            "our processor __call__, total s",
            f"{clock['ours']:.4f}  ({1e3 * clock['ours'] / clock['ours_calls']:.3f} ms/call)",
        ),
        (
            "dict trie PrefixConstrained __call__, total s",
            f"{clock['dict']:.4f}  ({1e3 * clock['dict'] / clock['dict_calls']:.3f} ms/call)",
        ),
        (f"throughput batch {args.batch_size}, users/s", f"{throughput:.2f}  ({users} users)"),
        ("throughput batch 1, users/s", f"{throughput_b1:.2f}  ({users_b1} users)"),
        ("valid items among returned", f"{valid}/{total}"),
        ("users with identical top-K (ours vs dict trie)", f"{same}/{users}"),
        (
            "our processor with mask_history exclusion",
            f"{1e3 * clock['masked'] / clock['masked_calls']:.3f} ms/call; "
            f"seen items returned: {int(clock['seen_returned'])}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print(
        f"\ndevice={args.device} dtype={args.dtype} threads={torch.get_num_threads()} histories={users} "
        f"batch={args.batch_size} beams={args.num_beams} shared prompt cache={not args.no_share_prompt}"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        f"(a) constrained / unconstrained time   = {ratio_a:.3f}  target <= 1.10  "
        f"{'PASS' if ratio_a <= 1.10 else 'FAIL'}"
    )
    print(
        f"(b) our processor / dict-trie processor = {ratio_b:.3f}  target <= 0.25  "
        f"{'PASS' if ratio_b <= 0.25 else 'FAIL'}"
    )
    print(f"(c) throughput batch {args.batch_size} / batch 1     = {throughput / throughput_b1:.2f}x")
    per_call = (clock["masked"] / clock["masked_calls"]) / (clock["ours"] / clock["ours_calls"])
    print(f"(d) processor with / without history exclusion, per call = {per_call:.2f}")
    users_v = int(clock["view_users"])
    for suffix, label in (("", "model log-probs"), ("_renormalized", "renormalized")):
        print(
            f"(e) code view / full vocabulary, {label:15s} = {clock['view' + suffix] / clock['full' + suffix]:.3f}  "
            f"({clock['view' + suffix]:.2f} s vs {clock['full' + suffix]:.2f} s; identical top-K for "
            f"{int(clock['view_same' + suffix])}/{users_v} users)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-histories", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch1-histories", type=int, default=0, help="histories for the batch-1 run (0: all)")
    parser.add_argument(
        "--masked-histories", type=int, default=64, help="histories decoded again with mask_history exclusion"
    )
    parser.add_argument(
        "--view-histories", type=int, default=64, help="histories decoded with and without the code view"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-share-prompt", action="store_true", help="plain generate: encode each prompt once per beam"
    )
    args = parser.parse_args()
    with unshared_prompts() if args.no_share_prompt else contextlib.nullcontext():
        run(args)


if __name__ == "__main__":
    main()
