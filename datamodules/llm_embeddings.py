"""Items' LLM embeddings: the mean of the LLM's input-embedding vectors over the tokens of title + description.

The paper's LLM alignment target ("average pooling of the LLM input layer embedding through the titles and
descriptions of items"). Only the tokenizer and the input embedding matrix are needed, so the matrix is read
straight from the checkpoint's safetensors file(s) (the tensor whose name ends in ``embed_tokens.weight`` and
similar): a 7B model is never materialised. Checkpoints without safetensors fall back to
``AutoModelForCausalLM.from_pretrained(path).get_input_embeddings()``. The result is cached as
``llm_embeddings.pt`` + ``manifest.json`` and reused while the model, the tokenizer and the text are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules.artifacts import MANIFEST_NAME, ArtifactWriter, read_artifact
from datamodules.errors import ArtifactError, SemConvError
from datamodules.text import clean_text

log = logging.getLogger(__name__)

#: Names of input embedding matrices in common HF causal LMs (Llama/Mistral/Qwen, GPT-2, BLOOM, GPT-NeoX).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
CACHE_FILE = "llm_embeddings.pt"
KIND = "llm_embeddings"


class LLMDirectoryError(SemConvError):
    """An LLM directory that lacks what the LLM embeddings need (tokenizer, input embedding matrix)."""


def item_texts(item_text: dict[int, dict[str, str]] | None, num_items: int, fields: list[str]) -> list[str]:
    """Text of every item (``""`` when it has none): the cleaned ``fields`` joined with a space."""
    records = item_text or {}
    return [clean_text([(records.get(item) or {}).get(field_) for field_ in fields]) for item in range(num_items)]


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(name for name in weight_map if name.endswith(EMBEDDING_SUFFIXES))
        if names:  # sharded: open only the shard that holds the embedding matrix
            return [path / weight_map[names[0]]]
    return sorted(path.glob("*.safetensors"))


def load_input_embeddings(path: str | Path) -> torch.Tensor:
    """The ``[vocab, hidden]`` input embedding matrix of the HF checkpoint in ``path`` (float32)."""
    path = Path(path)
    files = _weight_files(path)
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                names = sorted(name for name in handle.keys() if name.endswith(EMBEDDING_SUFFIXES))
                if names:
                    return handle.get_tensor(names[0]).float()
        raise LLMDirectoryError(
            f"{path}: no input embedding matrix in {[file.name for file in files]} (looked for tensors ending in "
            f"{', '.join(EMBEDDING_SUFFIXES)}). Point `data.init_args.llm_path` at a causal LM checkpoint."
        )
    if not any((path / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise LLMDirectoryError(
            f"{path}: no model weights (*.safetensors or pytorch_model.bin), so no input embedding matrix. "
            "Point `data.init_args.llm_path` at a local Hugging Face model directory (e.g. a Llama-7B download)."
        )
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach().float()


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise LLMDirectoryError(
            f"{path}: no tokenizer ({' / '.join(TOKENIZER_FILES)} missing). Save the model's tokenizer into the "
            "directory (tokenizer.save_pretrained(path)) or point `data.init_args.llm_path` at a full model directory."
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise LLMDirectoryError(f"{path}: the tokenizer cannot be loaded ({err}).") from err


def _fingerprint(path: Path) -> list:
    """Weight/tokenizer files by name, size and mtime: hashing 13 GB of weights on every run is too slow."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".model"))
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def model_fingerprint(path: str | Path) -> str:
    """SHA-256 over the LLM directory's weight and tokenizer file names and sizes: which model made a text embedding
    (a copied directory keeps it; mtimes do not survive a copy)."""
    files = _fingerprint(Path(path))
    return hashlib.sha256(json.dumps([[name, size] for name, size, _ in files]).encode()).hexdigest()


@torch.no_grad()
def mean_token_embeddings(
    texts: list[str], tokenizer, weight: torch.Tensor, batch_size: int, max_tokens: int
) -> torch.Tensor:
    """``[N, hidden]`` mean input embedding over each text's tokens (zeros for empty texts), in batches."""
    out = torch.zeros(len(texts), weight.shape[1])
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = tokenizer(chunk, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        lengths = torch.tensor([len(row) for row in ids])
        flat = torch.tensor([token for row in ids for token in row], dtype=torch.long)
        if flat.numel() and int(flat.max()) >= weight.shape[0]:
            raise LLMDirectoryError(
                f"tokenizer produced id {int(flat.max())} but the embedding matrix has {weight.shape[0]} rows"
            )
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        # embedding_bag(mean) is the masked mean over ragged token lists without padding; empty bags give zeros
        out[start : start + len(chunk)] = F.embedding_bag(flat, weight, offsets, mode="mean")
    return out


def compute_llm_embeddings(
    llm_path: str | Path,
    texts: list[str],
    cache_dir: str | Path,
    batch_size: int = 64,
    max_tokens: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM embeddings ``[N, hidden]`` and ``has_text`` ``[N]`` for ``texts``, from the cache when it matches.

    Args:
        llm_path: local Hugging Face model directory (tokenizer + weights).
        texts: one string per item (``""``: no text; excluded from the LLM loss).
        cache_dir: where ``llm_embeddings.pt`` and its manifest are kept.
        batch_size: items tokenised and pooled per batch.
        max_tokens: tokens per item beyond which the text is truncated.

    Raises:
        LLMDirectoryError: missing directory, tokenizer or input embedding matrix.
    """
    path = Path(llm_path)
    if not path.is_dir():
        raise LLMDirectoryError(f"llm_path {path} is not a directory; it must be a local Hugging Face model directory.")
    cache_dir = Path(cache_dir)
    text_hash = hashlib.sha256(json.dumps([texts, max_tokens]).encode()).hexdigest()
    expected = {"model_path": str(path.resolve()), "model_files": _fingerprint(path), "text_hash": text_hash}
    if (cache_dir / MANIFEST_NAME).is_file():
        try:
            artifact = read_artifact(cache_dir, KIND, expected)
            cached = torch.load(artifact.file(CACHE_FILE), weights_only=True)
            log.info("LLM embeddings: reusing %s (%s)", cache_dir / CACHE_FILE, artifact.manifest["embedding_shape"])
            return cached["embeddings"], cached["has_text"]
        except ArtifactError as err:
            log.info("LLM embeddings: the cache is not for these inputs; recomputing (%s)", err)
    tokenizer = load_tokenizer(path)
    weight = load_input_embeddings(path)
    has_text = torch.tensor([bool(text) for text in texts], dtype=torch.bool)
    embeddings = mean_token_embeddings(texts, tokenizer, weight, batch_size, max_tokens)
    try:
        with ArtifactWriter(cache_dir, KIND) as writer:
            writer.save_torch(CACHE_FILE, {"embeddings": embeddings, "has_text": has_text})
            writer.commit(
                {
                    **expected,
                    "tokenizer": type(tokenizer).__name__,
                    "tokenizer_vocab_size": len(tokenizer),
                    "embedding_shape": list(weight.shape),
                    "num_items": len(texts),
                    "items_with_text": int(has_text.sum()),
                }
            )
    except ArtifactError as err:  # another rank or run is writing the same cache: this run keeps its own result
        log.warning("LLM embeddings: not cached (%s)", err)
    log.info(
        "LLM embeddings: %d items (%d with text) from %s, cached in %s",
        len(texts),
        int(has_text.sum()),
        path,
        cache_dir,
    )
    return embeddings, has_text
