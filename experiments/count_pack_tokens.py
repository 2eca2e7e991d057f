"""Token columns per training sample with and without prefix-tree packing (``pack_prompts``), from the real data.

On a GPU a step's compute grows with the token columns it runs (padding included), so the ratio of columns per
sample is the expected speed-up of packing where the model's per-token work dominates (a 7B model; not the tiny
CPU model, whose step is mostly its LM head). Uses the data set's LC-Rec index (collisions deduplicated) and the
first batches of an epoch, as the shipped stage-3 configs lay them out (1:3 negatives, every task).

    python experiments/count_pack_tokens.py --dataset Games --batches 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from datamodules import PromptDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared"


def count(dataset: str, pack: int, batch_size: int, batches: int) -> tuple[int, float, float]:
    """Samples, real tokens per sample and padded columns per sample over the first ``batches`` batches."""
    data = SHARED / "data" / dataset
    module = PromptDataModule(
        data_dir=str(data),
        dataset=dataset,
        index=str(data / f"{dataset}.index.json"),
        dedupe_collisions=True,
        negative_ratio=3,
        max_length=2048,
        batch_size=batch_size,
        pack_prompts=pack,
        seed=0,
    )
    module.setup("fit")
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama2"))
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(module.item_index.vocabulary())
    module.set_tokenizer(tokenizer)
    samples = real = padded = 0
    for n, batch in enumerate(module.train_dataloader()):
        if n == batches:
            break
        samples += len(batch["task"])
        real += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        padded += batch["input_ids"].numel()
    return samples, real / samples, padded / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="Games")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    for pack, batch_size in ((0, 32), (1, 8), (4, 2)):  # ~32 samples a step each
        samples, real, padded = count(args.dataset, pack, batch_size, args.batches)
        print(
            f"{args.dataset} pack_prompts={pack} batch={batch_size}: {samples} samples, "
            f"{real:.1f} tokens and {padded:.1f} padded columns per sample"
        )


if __name__ == "__main__":
    main()
