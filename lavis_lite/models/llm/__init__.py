"""Frozen LLM backbones. Importing this package registers each shipped one in ``LLMS`` (explicit
imports, no ``*``); a new family is a module defining a registered ``LLMBackbone`` subclass."""
from __future__ import annotations

from lavis_lite.models.llm import chat, internlm2_backbone, opt, qwen2  # noqa: F401  (registers each backbone)
from lavis_lite.models.llm.base import LLMBackbone, check_llm_path, dtype_from_name
from lavis_lite.models.llm.chat import InternLM2ChatBackbone, Qwen2InstructBackbone
from lavis_lite.models.llm.internlm2_backbone import InternLM2Backbone
from lavis_lite.models.llm.opt import OPTBackbone
from lavis_lite.models.llm.qwen2 import Qwen2Backbone

__all__ = ["InternLM2Backbone", "InternLM2ChatBackbone", "LLMBackbone", "OPTBackbone", "Qwen2Backbone",
           "Qwen2InstructBackbone", "check_llm_path", "dtype_from_name"]
