"""OPT (Zhang et al., 2022, "OPT: Open Pre-trained Transformer Language Models") as a frozen LLM.

``facebook/opt-*`` directories load with transformers' ``OPTForCausalLM`` and a byte-level BPE
``GPT2Tokenizer`` that prepends "</s>" (id 2) as bos; eos is "</s>" too, pad "<pad>" = 1, and "\\n"
is one token ("Ċ"), so LAVIS's stop id happens to be right for OPT. The layout keeps the bos after
the query tokens and the weights in fp16, as LAVIS's ``blip2_opt.py``, so its OPT stage-2
checkpoints load and mean the same thing.
"""
from __future__ import annotations

from lavis_lite.models.llm.base import LLMBackbone
from lavis_lite.registry import LLMS


@LLMS.register("opt")
class OPTBackbone(LLMBackbone):
    """facebook/opt-*: [queries, "</s>", prompt, text], fp16."""

    bos_before_queries = False
    default_dtype = "float16"
