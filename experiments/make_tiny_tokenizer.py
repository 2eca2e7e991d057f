"""Save the small BPE tokenizer trained in code (lightning_modules/components/tiny_tokenizer.py) into a directory:
stage 0 of the synthetic pipeline, so its tiny Llama needs no downloaded tokenizer.

    python experiments/make_tiny_tokenizer.py --out artifacts/synthetic/tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_modules.components.tiny_tokenizer import write_tiny_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to save the tokenizer into")
    print(f"wrote {write_tiny_tokenizer(parser.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
