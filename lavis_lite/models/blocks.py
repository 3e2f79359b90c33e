"""The repeated transformer blocks of a BLIP-2 model: the unit of FSDP sharding and of activation
checkpointing.

``transformer_blocks(model)`` names them per part: ``vision`` (the timm encoder's ``blocks``), ``qformer``
(``Qformer.bert.encoder.layer``) and ``llm`` (the decoder layers a Hugging Face model lists in its
``_no_split_modules``, found through a peft wrapper too). A part the model lacks maps to an empty list.

``checkpoint_blocks(blocks)`` makes blocks recompute their activations in backward (the config switches
``vit_use_checkpoint``, ``qformer_use_checkpoint``, ``llm_use_checkpoint``): one mechanism for the three
parts, in place of Hugging Face's ``gradient_checkpointing_enable`` (off outside ``training``: it would
skip the frozen LLM, kept in eval mode while gradients flow through it to the queries) and timm's
``set_grad_checkpointing`` (it checkpoints ``block.__call__``, so FSDP2's parameter all-gather hooks would
run again in the recomputation; and the environment variable ``TIMM_REENTRANT_CKPT`` makes it reentrant).
"""
from __future__ import annotations

import types
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _llm_blocks(llm: nn.Module) -> list[nn.Module]:
    names: set[str] = set()
    for module in llm.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in llm.modules() if type(m).__name__ in names]


def transformer_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """{"vision": [...], "qformer": [...], "llm": [...]}: each part's blocks in forward order."""
    vision = getattr(model, "visual_encoder", None)
    qformer = getattr(model, "Qformer", None)
    llm = getattr(model, "llm_model", None)
    return {
        "vision": list(getattr(vision, "blocks", None) or ()),
        "qformer": list(qformer.bert.encoder.layer) if qformer is not None else [],
        "llm": _llm_blocks(llm) if llm is not None else [],
    }


# ------------------------------------------------------------------------ activation checkpointing
def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Make each block keep only its inputs in forward and recompute the rest in backward.

    The instance's ``forward`` is replaced (a second call leaves a block as it is), so parameter names,
    state dicts and module hooks stay as they were: FSDP2's ``fully_shard(block)``, applied afterwards,
    gathers parameters in hooks around ``block.__call__``, outside the recomputed region (the layout of
    torch's ``checkpoint_wrapper``, without its ``_checkpoint_wrapped_module.`` key prefix). Checkpointing
    is non-reentrant with the RNG state restored, so dropout masks and gradients equal those without it;
    the block's own parameters may be frozen. Under ``torch.no_grad`` blocks run as before.
    """
    for block in blocks:
        if "_forward_without_checkpoint" in vars(block):
            continue
        block._forward_without_checkpoint = block.forward
        # bound to the block, so copy.deepcopy(model) rebinds it to the copy
        block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return self._forward_without_checkpoint(*args, **kwargs)
    if kwargs.get("past_key_values") is not None:  # a Hugging Face layer writes its KV cache in forward
        raise ValueError(f"{type(self).__name__} has activation checkpointing on and was given a KV cache: the "
                         "recomputation in backward would write to it a second time; call the LLM with "
                         "use_cache=False where gradients are on")
    return checkpoint(self._forward_without_checkpoint, *args, use_reentrant=False, **kwargs)
