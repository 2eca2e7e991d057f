"""A small Llama-like byte-level BPE tokenizer trained in code: LLM stages without a downloaded tokenizer.

The synthetic pipeline and the tests use it where a real LLM's tokenizer (e.g. ``../shared/tokenizers/llama2``) may
be absent: a model trained from scratch needs no particular vocabulary, and ~1k tokens instead of Llama-2's 32k make
the LM head and embeddings 30x smaller. ``experiments/make_tiny_tokenizer.py`` saves one from the command line.
"""

from __future__ import annotations

from pathlib import Path

TINY_TOKENIZER_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "### Instruction: ### Response: The user has interacted with items in chronological order. Can you predict the "
    "next possible item that the user may expect? Which item would the user like, title, description, category, "
    "not interested, recommend, purchase, history, query, search 0123456789 , . ? ! : ; ' \" ( ) - _ < > / & %"
)


def write_tiny_tokenizer(directory: str | Path) -> Path:
    """Save a small Llama-like fast tokenizer built in code (byte-level BPE, ~600 tokens) into ``directory``.

    It has ``<s>``/``</s>``/``<unk>`` and prepends ``<s>`` like Llama's, but no pad token (the LLM module adds one),
    so tests of the LLM stage run without the real tokenizer in ``../shared``. Byte-level: any text encodes. It is
    trained on the prompt templates, so their wording takes a few tokens as on Llama-2 and a prompt's length follows
    its history (what ``PromptTasks.approx_lengths`` assumes); item text falls back to short pieces and bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules import prompt_templates as templates

    wording = [templates.FRAME, *templates.SEQUENTIAL, *templates.NEGATIVE, *templates.QUERY]
    wording += [template for group, _, _ in templates.TEXT_KINDS for template in group]

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([TINY_TOKENIZER_TEXT, *wording] * 4, trainer=trainer)  # stops when no pair repeats
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory
