"""LoRA adapters (peft) on a causal LM, with the new code tokens' embedding and LM-head rows trainable.

Stage 3 (:class:`lightning_modules.llm.GenerativeRecommender`) and stage 4 (:mod:`lightning_modules.rl`) wrap
their model with :func:`add_lora`: peft keeps the code tokens' rows as separate trainable parameters and swaps them
in (tied embeddings included), so the original vocabulary's rows stay frozen without a gradient-mask hook.
"""

from __future__ import annotations

from torch import nn

#: every Llama attention and MLP projection
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(
    model: nn.Module, code_token_ids: list[int], rank: int, alpha: int, dropout: float, target_modules: list[str]
) -> nn.Module:
    """``model`` under peft LoRA on ``target_modules``, with the code tokens' embedding and LM-head rows trainable.

    Args:
        model: the HF causal LM (code tokens already added to its vocabulary).
        code_token_ids: ids of the code tokens, whose input-embedding and LM-head rows are trained.
        rank: LoRA rank ``r``.
        alpha: LoRA scaling ``alpha``.
        dropout: dropout on the LoRA path.
        target_modules: names of the modules to adapt.

    Returns:
        The peft-wrapped model.

    Raises:
        ImportError: peft is older than 0.15 (no ``LoraConfig.trainable_token_indices``).
    """
    from peft import LoraConfig, get_peft_model

    if "trainable_token_indices" not in LoraConfig.__dataclass_fields__:
        raise ImportError("LoRA with trainable code-token rows needs peft>=0.15 (LoraConfig.trainable_token_indices)")
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    rows = {names[model.get_input_embeddings()]: code_token_ids, names[model.get_output_embeddings()]: code_token_ids}
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
