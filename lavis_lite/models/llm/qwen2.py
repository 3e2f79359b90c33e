"""Qwen2 / Qwen2.5 (Yang et al., 2024, "Qwen2 Technical Report") as a frozen LLM.

``Qwen/Qwen2-*`` and ``Qwen/Qwen2.5-*`` directories load with transformers' ``Qwen2ForCausalLM``
and byte-level BPE ``Qwen2Tokenizer``. No bos is prepended (the config's ``bos_token_id`` is never
used by the tokenizer), "<|endoftext|>" is both eos and pad (mask padding, never compare ids), and
the pre-tokenizer glues punctuation to a following newline (".\\n" is one token), which is why
targets are built with ``LLMBackbone.encode_answer``.
"""
from __future__ import annotations

from lavis_lite.models.llm.base import LLMBackbone
from lavis_lite.registry import LLMS


@LLMS.register("qwen2")
class Qwen2Backbone(LLMBackbone):
    """Qwen/Qwen2-*, Qwen/Qwen2.5-*: no bos; "<|endoftext|>" is eos and pad; bf16."""
