"""Activation checkpointing switches (``blocks.checkpoint_blocks``): ``vit_use_checkpoint`` (stage 1, image
encoder trained), ``qformer_use_checkpoint`` (stage 1) and ``llm_use_checkpoint`` (stage 2, gradients
through the frozen LLM to the queries; and with LoRA) each give the loss and gradients of the same model
without them, in train mode with dropout / drop-path active. Each test also proves the switch is on:
every block's first submodule runs twice per forward + backward (again in the recomputation), not once.

Tolerance: float32 on CPU, ``rtol=1e-5, atol=1e-6``; the recomputation replays the same ops with the
same dropout masks, so in practice the values are bitwise equal.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lavis_lite.models.blocks import checkpoint_blocks, transformer_blocks
from tests.fixtures.llm_checkpoints import LLMCheckpoint
from tests.models.test_blip2_llm import build, images
from tests.models.tiny_blip2 import make_batch, tiny_model

TOL = dict(rtol=1e-5, atol=1e-6)
DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}  # the tiny yaml has none
pytestmark = pytest.mark.usefixtures("one_thread")


def train_step(model: nn.Module, batch: dict[str, Any], part: str):
    """(loss, {name: grad} of every trainable parameter, calls of each ``part`` block's first submodule)."""
    calls = [0] * len(transformer_blocks(model)[part])
    handles = [next(block.children()).register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(transformer_blocks(model)[part])]
    model.train()
    torch.manual_seed(1)  # same dropout masks and ITM negatives in both runs
    loss = model(batch)["loss"]
    loss.backward()
    for handle in handles:
        handle.remove()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls


def assert_same_gradients_and_recomputed(plain: nn.Module, ckpt: nn.Module, batch: dict[str, Any], part: str) -> None:
    ckpt.load_state_dict(plain.state_dict())
    loss, grads, calls = train_step(plain, batch, part)
    loss_ckpt, grads_ckpt, calls_ckpt = train_step(ckpt, batch, part)
    torch.testing.assert_close(loss_ckpt, loss, **TOL)
    assert grads_ckpt.keys() == grads.keys()
    missing = [n for n, g in grads.items() if g is None or grads_ckpt[n] is None]
    assert not missing, f"trainable parameters without a gradient: {missing}"
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, **TOL, msg=name)
    assert calls and all(calls)
    assert calls_ckpt == [2 * c for c in calls], f"{part} blocks not recomputed in backward: {calls_ckpt} vs {calls}"


# ------------------------------------------------------------------------------------------ stage 1
def test_vit_use_checkpoint_same_gradients_with_the_encoder_trained():
    kw = dict(freeze_vit=False, drop_path_rate=0.1, qformer=DROPOUT)
    plain, ckpt = tiny_model(**kw), tiny_model(**kw, vit_use_checkpoint=True)
    assert any(n.startswith("visual_encoder.") for n, p in plain.named_parameters() if p.requires_grad)
    assert not ckpt.visual_encoder.grad_checkpointing  # ours, not timm's (see blocks.py)
    assert_same_gradients_and_recomputed(plain, ckpt, make_batch(4), "vision")


def test_qformer_use_checkpoint_same_gradients_with_dropout():
    plain, ckpt = tiny_model(qformer=DROPOUT), tiny_model(qformer=DROPOUT, qformer_use_checkpoint=True)
    assert_same_gradients_and_recomputed(plain, ckpt, make_batch(4), "qformer")


# ------------------------------------------------------------------------------------------ stage 2
@pytest.mark.parametrize("lora_r", [0, 4], ids=["frozen", "lora"])
def test_llm_use_checkpoint_same_gradients_through_the_llm(any_llm, lora_r):
    kw = dict(qformer=DROPOUT, lora_r=lora_r, lora_dropout=0.1)
    plain, ckpt = build(any_llm, **kw), build(any_llm, **kw, llm_use_checkpoint=True)
    batch = {"image": images(2), "text_input": ["a red circle", "a blue square"]}
    assert_same_gradients_and_recomputed(plain, ckpt, batch, "llm")
    if lora_r == 0:  # gradients reach the queries through frozen, checkpointed layers kept in eval mode
        assert not ckpt.llm_model.training
        assert not any(p.requires_grad for p in ckpt.llm_model.parameters())
        assert ckpt.query_tokens.grad.abs().sum() > 0


def test_checkpointed_llm_refuses_a_kv_cache_only_with_gradients(tiny_qwen2_dir):
    model = build(LLMCheckpoint("qwen2", tiny_qwen2_dir), llm_use_checkpoint=True)
    inputs = torch.randn(1, 3, model.llm_proj.out_features, requires_grad=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.llm_model(inputs_embeds=inputs, use_cache=True)
    with torch.no_grad():  # generation: no recomputation, the cache works
        assert model.llm_model(inputs_embeds=inputs, use_cache=True).past_key_values.get_seq_length() == 3


# ------------------------------------------------------------------------------------ checkpoint_blocks
def test_checkpoint_blocks_twice_wraps_once_and_copies_rebind():
    model = tiny_model(qformer_use_checkpoint=True)
    blocks = transformer_blocks(model)["qformer"]
    forwards = [block.forward for block in blocks]
    checkpoint_blocks(blocks)
    assert [block.forward for block in blocks] == forwards
    twin = copy.deepcopy(model)  # e.g. an EMA copy: its blocks must run its own weights
    for block in transformer_blocks(twin)["qformer"]:
        assert block.forward.__self__ is block and block._forward_without_checkpoint.__self__ is block
    _, _, calls = train_step(twin, make_batch(2), "qformer")
    _, _, calls_plain = train_step(tiny_model(), make_batch(2), "qformer")
    assert calls == [2 * c for c in calls_plain]
