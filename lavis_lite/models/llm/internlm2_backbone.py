"""InternLM2 registered as an LLM backbone; the loading code lives in ``internlm2.py``.

Official InternLM2 checkpoints load as transformers' ``LlamaForCausalLM`` (no remote code) with
their sentencepiece tokenizer. Conventions: bos "<s>" = 1 before the query tokens; pad = eos =
"</s>" = 2 (mask padding, never compare ids); "\\n" is the byte piece "<0x0A>", not the "▁" that
LAVIS's "first id of tokenizing '\\n'" picks.
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from lavis_lite.models.llm.base import LLMBackbone, check_llm_path
from lavis_lite.models.llm.internlm2 import InternLM2Tokenizer, load_internlm2, load_internlm2_tokenizer
from lavis_lite.registry import LLMS


@LLMS.register("internlm2")
class InternLM2Backbone(LLMBackbone):
    """internlm/internlm2-*, internlm2_5-*: [bos, queries, prompt, text], bf16."""

    def load_model(self, path: str, dtype: torch.dtype) -> LlamaForCausalLM:
        return load_internlm2(check_llm_path(path), dtype)

    def load_tokenizer(self, path: str) -> InternLM2Tokenizer:
        return load_internlm2_tokenizer(check_llm_path(path))
