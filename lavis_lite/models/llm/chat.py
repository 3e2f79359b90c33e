"""Chat-format backbones: a base family's loading and conventions, plus the chat model's prompt
template and stop word (the ChatML turn of InternLM2-chat and Qwen2-Instruct).

Each template is what the checkpoint's own ``chat_template`` (tokenizer_config.json) renders for one
user message with ``add_generation_prompt=True``, with ``{queries}`` marking where BLIP-2's image
queries go: inside the user turn, before the prompt, where chat VLMs put the image (LLaVA,
InternVL, InternLM-XComposer2, Qwen-VL). Training sequences are therefore
``[bos] + template head + queries + template tail(prompt) + answer + <|im_end|>``, labels on the
answer and ``<|im_end|>`` only; generation stops at ``<|im_end|>`` (the stop id). The stop word is
one special token: InternLM2-chat's 92542 (the sentencepiece piece "[UNUSED_TOKEN_145]", renamed by
``added_tokens_decoder``), Qwen2-Instruct's 151645 (its tokenizer's eos; "<|endoftext|>" 151643
stays pad). The base families keep the plain layout ``"{prompt}"``.
"""
from __future__ import annotations

from lavis_lite.models.llm.internlm2_backbone import InternLM2Backbone
from lavis_lite.models.llm.qwen2 import Qwen2Backbone
from lavis_lite.registry import LLMS

IM_END = "<|im_end|>"


@LLMS.register("internlm2_chat")
class InternLM2ChatBackbone(InternLM2Backbone):
    """internlm/internlm2-chat-*: a ChatML user turn, no system message (as its chat_template)."""

    prompt_template = "<|im_start|>user\n{queries}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    end_of_answer = IM_END


@LLMS.register("qwen2_instruct")
class Qwen2InstructBackbone(Qwen2Backbone):
    """Qwen/Qwen2-*-Instruct: a ChatML user turn after its chat_template's default system message (Qwen2.5's
    differs: a subclass with its own ``prompt_template``)."""

    prompt_template = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\n{queries}{prompt}<|im_end|>\n<|im_start|>assistant\n")
    end_of_answer = IM_END
