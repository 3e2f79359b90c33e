"""BLIP-2 stage 2: Q-Former query outputs -> linear projection -> prepended to a frozen LLM's input
embeddings, trained on captions (Li et al., BLIP-2, 2023; LAVIS: blip2_opt.py, blip2_t5.py, ...).

One class serves every LLM: whatever differs between families (loading, bos, end-of-answer token,
padding, dtype, a chat model's prompt template) comes from the registered ``LLMBackbone``
(lavis_lite/models/llm/). How we differ from LAVIS:
- the end of an answer is the one token that decodes to ``end_of_answer`` ("\\n"), not the first
  id of tokenizing "\\n" (which for sentencepiece LLMs is the bare "▁" piece);
- prompt and answer are tokenized separately (the loss mask is exact) and padding is found through
  the attention mask, never by id (InternLM2's and Qwen2's pad id is their eos id);
- batched generation left-pads the whole [bos, queries, prompt] sequence, with a fresh
  ``GenerationConfig`` (the checkpoint's own generation defaults never leak in), ``min_new_tokens``
  rather than ``min_length``, and answers cut at the first end-of-answer text;
- ``llm_proj`` is LAVIS's ``opt_proj`` (renamed when loading LAVIS checkpoints); ``llm_model`` its
  ``opt_model``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from lavis_lite.models.blip2_qformer import Blip2Base, Blip2VisionConfig
from lavis_lite.models.blocks import checkpoint_blocks, transformer_blocks
from lavis_lite.models.hf_blip2 import load_llm
from lavis_lite.models.llm import LLMBackbone, dtype_from_name
from lavis_lite.registry import LLMS, MODELS

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class Blip2LLMConfig(Blip2VisionConfig):
    arch: str = "blip2_opt"
    model_type: str = "pretrain_opt2.7b"
    llm: str = "opt"  # LLMS registry key
    llm_path: str = "facebook/opt-2.7b"  # a local checkpoint directory
    llm_dtype: Optional[Literal["bfloat16", "float16", "float32"]] = None  # None: the backbone's default
    prompt: str = ""  # text before every training caption (LAVIS: prompt)
    max_txt_len: int = 32  # prompt + answer tokens at most
    text_only: bool = False  # ablation: the LLM alone, no image queries (the "no image" VQA baseline)
    lora_r: int = 0  # > 0: train LoRA adapters of this rank on the LLM (peft)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    # recompute the LLM's decoder layers in backward (activation checkpointing): saves memory when gradients
    # flow through the frozen LLM to the queries (blocks.py; also in eval mode, unlike HF's own switch)
    llm_use_checkpoint: bool = False


# Stage-1 (ours or LAVIS's blip2_pretrained.pth) keys that a stage-2 model has no use for: the text
# branch of the Q-Former and the ITC/ITM heads.
STAGE1_ONLY_KEYS = re.compile(
    r"^(Qformer\.cls\.|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
    r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|vision_proj\.|text_proj\.|itm_head\.|temp$)"
)


# ---------------------------------------------------------------------------------------- model
@MODELS.register("blip2_opt")
@MODELS.register("blip2_internlm")
@MODELS.register("blip2_qwen2")
@MODELS.register("blip2_llm")
class Blip2LLM(Blip2Base):
    """Frozen image encoder + Q-Former + ``llm_proj`` + frozen ``llm_model`` (any LLMBackbone)."""

    config_class = Blip2LLMConfig
    # the frozen LLM comes from model.llm_path, never from our checkpoints (the encoder: allow_missing)
    ignore_missing_prefixes = ("llm_model.",)

    def __init__(self, cfg: Blip2LLMConfig):
        super().__init__()
        self.cfg = cfg
        hidden = self.init_vision_and_qformer(cfg, vocab_size=None)
        self.backbone: LLMBackbone = LLMS.get(cfg.llm)()
        dtype = dtype_from_name(cfg.llm_dtype or self.backbone.default_dtype)
        # llm_path: an LLM directory, or a Hugging Face BLIP-2 one (its language model); on meta: sizes only
        self.tokenizer, self.llm_model = load_llm(self.backbone, cfg.llm_path, dtype)
        self.llm_model.generation_config = GenerationConfig()
        self.llm_model.requires_grad_(False)
        if cfg.lora_r > 0:
            self._add_lora(cfg)
        if cfg.llm_use_checkpoint:
            checkpoint_blocks(transformer_blocks(self)["llm"])
        self.llm_proj = nn.Linear(hidden, self.llm_model.get_input_embeddings().embedding_dim)
        if self.tokenizer is None:  # built on the meta device to list keys and shapes: no token ids
            self.bos_id = self.stop_id = self.pad_id = None
            return
        self.bos_id = self.backbone.bos_token_id(self.tokenizer)
        self.stop_id = self.backbone.stop_token_id(self.tokenizer)
        self.pad_id = self.backbone.pad_token_id(self.tokenizer)
        template = sum(map(len, self.backbone.encode_prompt(self.tokenizer, "")))
        if template >= cfg.max_txt_len:  # every answer would be cut down to its stop token
            raise ValueError(f"model.max_txt_len={cfg.max_txt_len} leaves no room for answers: the prompt template of "
                             f"llm {cfg.llm!r} alone is {template} tokens; raise model.max_txt_len")

    def _add_lora(self, cfg: Blip2LLMConfig) -> None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules))
        self.llm_model = get_peft_model(self.llm_model, lora)
        for param in self.llm_model.parameters():
            if param.requires_grad:  # adapters train in float32 beside the half-precision LLM
                param.data = param.data.float()

    def train(self, mode: bool = True) -> "Blip2LLM":
        super().train(mode)
        if self.cfg.lora_r == 0:
            self.llm_model.eval()  # frozen: no dropout
        return self

    # ---------------------------------------------------------------------------- sequences
    def query_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] -> projected query outputs [B, Q, llm hidden] in the LLM's dtype
        ([B, 0, llm hidden] with ``text_only``: the LLM sees the prompt alone)."""
        if self.cfg.text_only:
            return image.new_zeros(image.shape[0], 0, self.llm_proj.out_features, dtype=self.llm_model.dtype)
        queries = self.query_pass(self.encode_image(image)).last_hidden_state
        return self.llm_proj(queries).to(self.llm_model.dtype)

    def build_inputs(self, queries: torch.Tensor, prompts: list[str], answers: Optional[list[str]] = None,
                     padding_side: Literal["left", "right"] = "right", truncate: bool = True):
        """(inputs_embeds [B, L, H], attention_mask [B, L], labels [B, L]) for
        ``[bos] + queries + prompt + answer + stop`` (or ``queries + [bos] + ...`` when the backbone
        says so), the prompt in the backbone's template: a chat backbone gives
        ``[bos] + head + queries + tail(prompt) + answer + stop`` (``LLMBackbone.format_prompt``).
        Labels are -100 everywhere but the answer tokens and the stop token, and, in LAVIS's OPT layout
        with no prompt, the bos after the queries (LAVIS Blip2OPT masks the prompt's tokens, bos included,
        and with no prompt leaves the bos a target: so its stage-2 loss and ours agree). With ``truncate``
        an answer is cut (keeping its stop token) so that the template's text, prompt and answer fit
        ``max_txt_len``."""
        embed = self.llm_model.get_input_embeddings()
        bos = [] if self.bos_id is None else [self.bos_id]
        first, after_queries = (bos, []) if self.backbone.bos_before_queries else ([], bos)
        seqs, n_befores, labels = [], [], []
        for i, prompt in enumerate(prompts):
            head, tail = self.backbone.encode_prompt(self.tokenizer, prompt)
            before, prompt_ids = first + head, after_queries + tail
            answer_ids = self.backbone.encode_answer(self.tokenizer, answers[i]) if answers is not None else []
            room = max(self.cfg.max_txt_len - len(head) - len(prompt_ids), 1)
            if truncate and len(answer_ids) > room:  # keep the stop token: the model must still learn to end
                answer_ids = answer_ids[: room - 1] + [self.stop_id]
            seqs.append(before + prompt_ids + answer_ids)
            n_before = len(before)
            n_befores.append(n_before)
            prompt_labels = [-100] * len(prompt_ids)
            if answers is not None and after_queries and prompt_ids == after_queries:  # LAVIS OPT, no prompt
                prompt_labels = after_queries
            labels.append([-100] * (n_before + queries.shape[1]) + prompt_labels + answer_ids)
        # one embedding call for the batch and the pad token (under FSDP: one gather of the embedding)
        flat = [t for seq in seqs for t in seq] + [self.pad_id]
        pieces = embed(torch.tensor(flat, dtype=torch.long, device=queries.device)).split([len(s) for s in seqs] + [1])
        rows = [torch.cat([tokens[:n], queries[i], tokens[n:]]) for i, (tokens, n) in enumerate(zip(pieces, n_befores))]
        return self._pad(rows, labels, padding_side, pad_embed=pieces[-1])

    def _pad(self, rows: list[torch.Tensor], labels: list[list[int]], side: str, pad_embed: torch.Tensor):
        length = max(len(r) for r in rows)
        inputs, masks, targets = [], [], []
        for row, label in zip(rows, labels):
            n = length - len(row)
            pad = pad_embed.expand(n, -1)
            inputs.append(torch.cat([pad, row]) if side == "left" else torch.cat([row, pad]))
            mask = [0] * n + [1] * len(row) if side == "left" else [1] * len(row) + [0] * n
            masks.append(mask)
            targets.append([-100] * n + label if side == "left" else label + [-100] * n)
        device = rows[0].device
        return torch.stack(inputs), torch.tensor(masks, device=device), torch.tensor(targets, device=device)

    # ------------------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any], return_outputs: bool = False) -> dict[str, torch.Tensor]:
        """batch: image [B, 3, H, W], text_input list of captions, optional prompt list.
        Returns {"loss"}: mean cross-entropy over the labelled tokens (answer and stop token; see
        ``build_inputs``); with ``return_outputs`` also "logits" [B, L, vocab] (float32) and "labels"
        [B, L] (position t's logits predict label t + 1)."""
        queries = self.query_embeds(batch["image"])
        inputs, mask, labels = self.build_inputs(queries, self.prompts(batch, len(queries)), batch["text_input"])
        # no KV cache in training: a checkpointed layer would write it again when backward recomputes it
        logits = self.llm_model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits.float()
        if not torch.isfinite(logits).all():
            dtype = self.llm_model.dtype
            hint = ("; float16 overflows easily: set model.llm_dtype=bfloat16" if dtype == torch.float16 else
                    f" from inputs of norm up to {float(inputs.float().norm(dim=-1).max()):.3g} (the LLM's weights are "
                    f"{str(dtype).removeprefix('torch.')})")
            raise FloatingPointError(f"the LLM produced non-finite logits{hint}")
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits, "labels": labels} if return_outputs else {"loss": loss}

    # ----------------------------------------------------------------------------- inference
    def generation_config(self, num_beams: int, max_new_tokens: int, min_new_tokens: int,
                          length_penalty: float, num_return_sequences: int = 1) -> GenerationConfig:
        """Everything explicit, so a checkpoint's generation_config.json cannot change the result. Ids past
        the tokenizer (padding rows of the embedding table: opt-2.7b has 50272 for 50265 tokens, Qwen2 151936
        for 151646) are suppressed: they decode to nothing, or fail to decode (sentencepiece)."""
        eos = [self.stop_id] + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])
        rows = self.llm_model.get_output_embeddings().weight.shape[0]
        return GenerationConfig(
            do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            length_penalty=length_penalty, num_return_sequences=num_return_sequences,
            eos_token_id=list(dict.fromkeys(eos)), pad_token_id=self.pad_id, bos_token_id=self.bos_id,
            suppress_tokens=list(range(len(self.tokenizer), rows)) or None,
        )

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], num_beams: int = 5, max_new_tokens: int = 30,
                 min_new_tokens: int = 1, length_penalty: float = 1.0) -> list[str]:
        """Captions (or answers) for ``batch["image"]``, continuing ``batch["prompt"]`` if given."""
        queries = self.query_embeds(batch["image"])
        inputs, mask, _ = self.build_inputs(queries, self.prompts(batch, len(queries)), padding_side="left")
        config = self.generation_config(num_beams, max_new_tokens, min_new_tokens, length_penalty)
        output = self.llm_model.generate(inputs_embeds=inputs, attention_mask=mask, generation_config=config)
        return [self.postprocess(text) for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def prompts(self, batch: dict[str, Any], n: int) -> list[str]:
        """Each sample's prompt: ``batch["prompt"]`` (a data set's, in its captions' language) where given,
        else ``model.prompt``."""
        given = batch.get("prompt") or [None] * n
        return [self.cfg.prompt if prompt is None else prompt for prompt in given]

    def postprocess(self, text: str) -> str:
        """Cut at the first end-of-answer text, strip. A special-token stop word ("<|im_end|>") is already
        gone from ``text`` (decoded with ``skip_special_tokens``), and generation ended at it."""
        return text.split(self.backbone.end_of_answer, 1)[0].strip()

    @torch.no_grad()
    def predict_answers(self, batch: dict[str, Any], prompt: str = "Question: {} Short answer:",
                        inference_method: Literal["generate", "rank"] = "generate", num_beams: int = 5,
                        max_new_tokens: int = 10, min_new_tokens: int = 1, length_penalty: float = 0.0,
                        answer_list: Optional[list[str]] = None, num_ans_candidates: int = 128) -> list[str]:
        """Answers to ``batch["text_input"]`` (questions) about ``batch["image"]``."""
        questions = batch["text_input"]
        prompts = [prompt.format(q) if "{}" in prompt else f"{prompt}{q}" for q in questions]
        if inference_method == "generate":
            return self.generate({"image": batch["image"], "prompt": prompts}, num_beams, max_new_tokens,
                                 min_new_tokens, length_penalty)
        if not answer_list:
            raise ValueError("inference_method=rank needs an answer_list")
        return self.rank_answers(batch["image"], prompts, answer_list, num_ans_candidates)

    @torch.no_grad()
    def rank_answers(self, image: torch.Tensor, prompts: list[str], answer_list: list[str],
                     num_ans_candidates: int) -> list[str]:
        """For each question the candidate with the highest total log-probability of its tokens
        (stop token included); candidates pre-selected by the log-probability of their first token."""
        queries = self.query_embeds(image)
        inputs, mask, _ = self.build_inputs(queries, prompts, padding_side="left")
        first_logp = self.llm_model(inputs_embeds=inputs, attention_mask=mask).logits[:, -1].float().log_softmax(-1)
        first_ids = torch.tensor([self.backbone.encode_answer(self.tokenizer, a)[0] for a in answer_list],
                                 device=first_logp.device)
        k = min(num_ans_candidates, len(answer_list))
        answers = []
        for i, prompt in enumerate(prompts):
            top = first_logp[i, first_ids].topk(k).indices.tolist()
            candidates = [answer_list[j] for j in top]
            seq, seq_mask, labels = self.build_inputs(queries[i : i + 1].expand(k, -1, -1), [prompt] * k, candidates,
                                                      truncate=False)
            logits = self.llm_model(inputs_embeds=seq, attention_mask=seq_mask).logits.float()
            logp = logits[:, :-1].log_softmax(-1)
            targets = labels[:, 1:]
            token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
            answers.append(candidates[int(token_logp.sum(1).argmax())])
        return answers

    # ---------------------------------------------------------------------- checkpoint filter
    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A stage-1 checkpoint (ours or LAVIS's) or a LAVIS stage-2 one (``opt_proj`` -> ``llm_proj``);
        ``visual_encoder.*`` goes through the image encoder's filter, as in stage 1."""
        out = {}
        for key, value in super().convert_state_dict(state).items():
            if STAGE1_ONLY_KEYS.match(key):
                continue
            out[key.replace("opt_proj.", "llm_proj.", 1) if key.startswith("opt_proj.") else key] = value
        return out

    def allow_missing(self, state: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """A stage-1 checkpoint has no projection yet: ``llm_proj`` keeps its fresh initialisation."""
        own = () if any(k.startswith("llm_proj.") for k in state) else ("llm_proj.",)
        return super().allow_missing(state) + own

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """As BaseModel's; a missing file suggests the newest stage-1 checkpoint under ./output."""
        if not Path(path).exists():  # a file, or a Hugging Face BLIP-2 directory
            found = sorted(Path("output").glob("**/checkpoint_*.pth"), key=lambda p: p.stat().st_mtime)
            hint = f"; the newest checkpoint under ./output is {found[-1]}" if found else (
                "; train stage 1 first (bash run_scripts/blip2/train_stage1_shapes.sh)")
            raise FileNotFoundError(f"model.pretrained={path}: no such file{hint}")
        super().load_checkpoint(path, strict)
