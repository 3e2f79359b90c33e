"""``LLMBackbone``: everything BLIP-2 needs to know about one frozen LLM family.

A backbone says how to load the family from a local directory and which text conventions it has:
the text that ends every caption/answer (and the ONE token id that stops generation), where the
bos goes, which id pads, the template a prompt sits in. The stage-2 model (``blip2_llm.py``) talks
only to this interface, so a new LLM is a subclass setting a few class attributes, registered under
a name::

    @LLMS.register("qwen2")
    class Qwen2Backbone(LLMBackbone):
        '''Qwen/Qwen2-*: no bos, <|endoftext|> is eos and pad.'''

A chat model is its base family with a ``prompt_template`` and a special-token ``end_of_answer``
(``chat.py``).

How we differ from LAVIS (``blip2_opt.py``), and why:

- Stop token. LAVIS takes ``tokenizer("\\n", add_special_tokens=False).input_ids[0]``. That is
  right for OPT's byte-level BPE (one token, "Ċ") and wrong for a sentencepiece tokenizer, where
  "\\n" is ``["▁", "<0x0A>"]``: the model is trained to end answers with "<0x0A>", which then never
  stops generation, while "▁" (emitted before every digit, "2" is ``["▁", "2"]``) stops it
  before the answer. That swap scored 6.78 on zero-shot VQAv2. ``stop_token_id`` looks for the
  single token that *decodes* to ``end_of_answer`` and fails loudly when there is none.
- Padding. InternLM2 and base Qwen2 pad with their eos id, so padding must be masked with the attention
  mask and labels built from that mask, never found by comparing ids with ``pad_token_id``.
- Answers. ``tokenize(text + end_of_answer)`` may merge the end into the previous token (Qwen2's
  pre-tokenizer makes ".\\n" one token, ".Ċ"), so that target never contains the stop id;
  ``encode_answer`` appends the stop id to ``encode(text)`` instead.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import transformers

logger = logging.getLogger(__name__)

DtypeName = Literal["bfloat16", "float16", "float32"]
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (also float16, float32)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {list(DTYPES)}")
    return DTYPES[name]


def check_llm_path(path: str | Path) -> str:
    """``path`` as a string if it is a local directory holding ``config.json``; raises otherwise."""
    path = str(path)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model.llm_path={path!r}: no config.json there; point it at a local checkpoint directory "
            f"(no hub downloads here)"
        )
    return path


class LLMBackbone:
    """One LLM family: how to load it from a local directory and its text conventions.

    A new backbone = a subclass setting a few class attributes (+ load functions if the family does
    not load with ``AutoModelForCausalLM`` / ``AutoTokenizer``) + ``@LLMS.register("name")``.
    Tokenizers are duck-typed: ``__call__(list[str], add_special_tokens=False)`` returning
    ``{"input_ids": list[list[int]]}``, ``decode``, ``batch_decode``, ``pad_token_id``, ``eos_token_id``.
    """

    end_of_answer: ClassVar[str] = "\n"  # text ending every caption/answer in training; generation stops at its token
    # Sequence layout: [bos, queries, prompt, text] (True) or [queries, bos, prompt, text] (False: LAVIS's
    # OPT layout, needed to reuse LAVIS's OPT stage-2 checkpoints). Ignored when bos_token_id is None.
    bos_before_queries: ClassVar[bool] = True
    default_dtype: ClassVar[DtypeName] = "bfloat16"  # dtype of the frozen weights
    # The text a prompt sits in: "{prompt}" once, "{queries}" at most once (where the image queries go;
    # without it, before all text). "{prompt}" alone is the plain layout; chat models wrap it in a turn.
    prompt_template: ClassVar[str] = "{prompt}"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        template = cls.prompt_template
        if template.count("{prompt}") != 1 or template.count("{queries}") > 1 or (
                "{queries}" in template and template.index("{queries}") > template.index("{prompt}")):
            raise ValueError(
                f"{cls.__name__}.prompt_template={template!r}: it needs '{{prompt}}' exactly once and at most one "
                f"'{{queries}}' before it"
            )

    # -- loading -----------------------------------------------------------------------------------
    def load_model(self, path: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
        """The causal LM in ``path`` (a local directory), in eval mode, weights in ``dtype``."""
        model = transformers.AutoModelForCausalLM.from_pretrained(
            check_llm_path(path), dtype=dtype, local_files_only=True
        )
        logger.info("loaded %s from %s (%s)", type(model).__name__, path, dtype)
        return model.eval()

    def load_tokenizer(self, path: str) -> Any:
        """The tokenizer in ``path`` (a local directory)."""
        return transformers.AutoTokenizer.from_pretrained(check_llm_path(path), local_files_only=True)

    # -- text conventions --------------------------------------------------------------------------
    def encode(self, tokenizer: Any, text: str) -> list[int]:
        """Ids of ``text`` alone: no bos, no eos."""
        return list(tokenizer([text], add_special_tokens=False)["input_ids"][0])

    def format_prompt(self, prompt: str) -> tuple[str, str]:
        """(text before the image queries, text after them) of ``prompt`` in ``prompt_template``.

        Plain: ``("", prompt)``. A chat template puts the queries inside the user turn, where chat
        VLMs (LLaVA, InternVL, InternLM-XComposer2, Qwen-VL) put the image; an empty prompt still
        gets the whole turn.
        """
        head, _, tail = self.prompt_template.rpartition("{queries}")
        return head, tail.replace("{prompt}", prompt)

    def encode_prompt(self, tokenizer: Any, prompt: str) -> tuple[list[int], list[int]]:
        """Ids of ``format_prompt(prompt)``'s two texts (no bos); an empty text gives no ids."""
        head, tail = self.format_prompt(prompt)
        return (self.encode(tokenizer, head) if head else []), (self.encode(tokenizer, tail) if tail else [])

    def encode_answer(self, tokenizer: Any, text: str) -> list[int]:
        """Training target of a caption/answer: ``encode(text) + [stop_token_id]``.

        Not ``encode(text + end_of_answer)``, which can merge the end into the last token (Qwen2:
        "circle.\\n" ends with ".Ċ", not "Ċ") and then never teaches the model to stop.
        """
        return self.encode(tokenizer, text) + [self.stop_token_id(tokenizer)]

    def bos_token_id(self, tokenizer: Any) -> int | None:
        """The id this family puts at the start of a sequence, ``None`` if it uses none.

        Read off what the tokenizer itself prepends with ``add_special_tokens=True`` (that is the
        family's official convention, the one the LLM was trained with): OPT "</s>" = 2, InternLM2
        "<s>" = 1, Qwen2 none (its config's ``bos_token_id`` is never prepended). Override when a
        tokenizer config misstates it.
        """
        probe = "a"
        plain = self.encode(tokenizer, probe)
        full = list(tokenizer([probe], add_special_tokens=True)["input_ids"][0])
        if full[: len(plain)] == plain:
            return None
        if full[1 : len(plain) + 1] == plain:
            return int(full[0])
        raise ValueError(
            f"cannot tell the bos of {type(tokenizer).__name__}: {probe!r} encodes to {full} with special tokens and "
            f"{plain} without; override {type(self).__name__}.bos_token_id"
        )

    def stop_token_id(self, tokenizer: Any) -> int:
        """The ONE token id that decodes to ``end_of_answer``; generation stops at it.

        Candidates, in order: the trailing ids of ``encode("a" + end_of_answer)`` (the token that
        ends answers in training), the ids of ``encode(end_of_answer)`` (byte-level BPE: "Ċ"), then
        the byte-fallback piece of a one-byte ``end_of_answer`` (sentencepiece: "<0x0A>"). The
        first whose ``decode([id]) == end_of_answer`` wins. Never "the first id of tokenizing it"
        (see the module docstring). A chat stop word ("<|im_end|>") is a special token: decoded with
        its text, not skipped.
        """
        eoa = self.end_of_answer
        candidates = [*reversed(self.encode(tokenizer, "a" + eoa)), *self.encode(tokenizer, eoa)]
        raw = eoa.encode("utf-8")
        if len(raw) == 1 and hasattr(tokenizer, "convert_tokens_to_ids"):  # sentencepiece byte fallback
            i = tokenizer.convert_tokens_to_ids(f"<0x{raw[0]:02X}>")
            if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
                candidates.append(i)
        for i in candidates:
            if tokenizer.decode([i], skip_special_tokens=False) == eoa:
                return int(i)
        raise ValueError(
            f"{type(self).__name__}.end_of_answer={eoa!r}: no single token of {type(tokenizer).__name__} decodes to it "
            f"(tried ids {candidates}); choose an end_of_answer that is one token, e.g. '\\n'"
        )

    def pad_token_id(self, tokenizer: Any) -> int:
        """Id written into padded positions: the tokenizer's pad, else its eos.

        Padding is masked by the attention mask and labels are built from that mask, never by
        comparing ids with this value: for InternLM2 and Qwen2 it equals eos.
        """
        for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if i is not None:
                return int(i)
        raise ValueError(
            f"{type(tokenizer).__name__} has neither a pad nor an eos token; override {type(self).__name__}.pad_token_id"
        )

