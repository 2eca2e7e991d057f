"""Write a small, randomly initialised Llama with a real tokenizer as a local Hugging Face directory.

The CPU end-to-end run (experiments/industrial_e2e.sh) uses it in two places so that both stages talk
about the same LLM: stage 2 reads its input embedding matrix for the LLM alignment loss, stage 3
fine-tunes it. On GPUs point both configs at a real checkpoint (e.g. Llama-7B) instead.

    python experiments/make_tiny_llama.py --out artifacts/industrial/tiny_llama
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def make_tiny_llama(out: Path, tokenizer_dir: Path, hidden: int, layers: int, heads: int, seed: int, intermediate: int | None = None) -> Path:
    """Save a seeded ``LlamaForCausalLM`` (vocabulary = the tokenizer's) and the tokenizer into ``out``."""
    if (out / "config.json").is_file():
        print(f"{out} exists; delete it to rebuild")
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3 + 0.5),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # the directory appears complete or not at all
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/industrial/tiny_llama"))
    parser.add_argument("--tokenizer", type=Path, default=Path("../shared/tokenizers/llama2"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 8/3 x hidden, Llama's ratio)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_llama(args.out, args.tokenizer, args.hidden, args.layers, args.heads, args.seed, args.intermediate)


if __name__ == "__main__":
    main()
