"""BLIP-2 stage 1: a frozen image encoder + Q-Former trained with ITC, ITM and ITG (Li et al., BLIP-2,
2023, https://arxiv.org/abs/2301.12597); LAVIS: lavis/models/blip2_models/blip2_qformer.py,
blip2_image_text_matching.py.

Archs: ``blip2`` (training: ``forward(batch)`` -> losses), ``blip2_feature_extractor``
(``extract_features``) and ``blip2_image_text_matching`` (``forward(samples, match_head)``), all one class
family sharing one config; model types ``pretrain`` (EVA-CLIP-g), ``pretrain_vitL`` (CLIP-L), ``coco``
(364 px, ViT trained) and ``tiny`` (tests, CPU demos). Any of them also loads a Hugging Face BLIP-2
directory as ``pretrained`` (``hf_blip2.py``: sizes from its config.json, as far as its heads exist).

How we differ from LAVIS:
- distributed ITC/ITM go through ``lavis_lite.dist`` (no process group needed in one process); the
  gathered "all" side of ITC is detached at every world size, as LAVIS's ``concat_all_gather`` is;
- image ids may be ints or strings (hashed to int64 codes, see ``losses.image_ids_to_tensor``); with ids,
  ITC targets and ITM negatives treat every pair with the same id as positive (LAVIS's COCO path);
- hard negatives are drawn in one vectorised ``torch.multinomial`` call; ``negative_sampler`` can be
  swapped (e.g. ``losses.hardest_negatives``) for deterministic tests;
- ``temp`` is clamped to [0.001, 0.5] under ``clamp_temp`` (as BLIP-1; LAVIS's BLIP-2 file has no clamp);
- config names: ``img_size`` (LAVIS ``image_size``), ``vit_use_checkpoint`` (``use_grad_checkpoint``),
  ``qformer.num_query_token`` / ``qformer.cross_attention_freq`` (top-level in LAVIS yamls);
- the tokenizer and BERT weights come from local directories (``tokenizer_path``, ``bert_init_path``);
- the training step does less work for the same losses and gradients: each image's cross-attention
  keys/values are projected once (``ln_vision`` folded in) for the image pass and all ITM pairs
  (``itm_images``; the pairs attend grouped by image, ``qformer.ImageGroups``, so only the b negative
  pairs copy keys/values), padding positions are never computed (``qformer.TokenLayout``) and the LM head runs
  only where a position predicts a label (LAVIS projects the image per pass and pair, and runs padding
  through every layer and the LM head).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizer

from lavis_lite import dist
from lavis_lite.config import CONFIG_ROOT
from lavis_lite.models import hf_blip2, losses
from lavis_lite.models.base import BaseModel, building_weightless
from lavis_lite.models.blocks import checkpoint_blocks, transformer_blocks
from lavis_lite.models.convert import convert_lavis_blip2
from lavis_lite.models.feature_cache import ImageFeatureCache
from lavis_lite.models.qformer import ImageKeyValues, QFormer, QFormerConfig, init_from_bert
from lavis_lite.models.vision import (
    VitArch,
    VitModel,
    VitPrecision,
    create_vision_encoder,
    load_vision_weights,
    set_vit_precision,
    vision_checkpoint_filter,
    vision_features,
)
from lavis_lite.registry import MODELS

logger = logging.getLogger(__name__)

# ``vit_model``s trained from scratch on purpose (tests, CPU demos): no "randomly initialised" warning
RANDOM_BY_DESIGN: tuple[str, ...] = ("tiny",)
VIT_WEIGHT_FILES = {"eva_clip_g": "LAVIS eva_vit_g.pth", "clip_L": "LAVIS clip_vit_L.pth",  # for that warning
                    "eva": "an EVA state dict; or a Hugging Face BLIP-2 directory as model.pretrained"}


# --------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class Blip2VisionConfig:
    """What every BLIP-2 model shares: the frozen image encoder and the Q-Former."""

    arch: str = "blip2"
    model_type: str = "pretrain"
    # image encoder (vision.py)
    vit_model: VitModel = "eva_clip_g"  # or "eva": the EVA layout with the sizes of vit_arch
    vit_arch: VitArch = dataclasses.field(default_factory=VitArch)  # used by vit_model "eva" only
    vit_depth: Optional[int] = None  # None: the encoder's own depth; a smaller value for reduced-depth tests
    img_size: int = 224  # LAVIS: image_size
    drop_path_rate: float = 0.0
    vit_use_checkpoint: bool = False  # LAVIS: use_grad_checkpoint; recompute the blocks in backward (blocks.py)
    vit_precision: VitPrecision = "fp16"
    freeze_vit: bool = True  # no gradients, always in eval mode
    vit_pretrained: Optional[str] = None  # LAVIS eva_vit_g.pth / clip_vit_L.pth (or a timm state dict)
    ln_vision_eps: float = 1e-5  # LAVIS's nn.LayerNorm default; Hugging Face BLIP-2 uses the ViT's layer_norm_eps
    # frozen encoder, unaugmented training images (train processor blip_image_eval): encode each image once
    cache_image_features: bool = False
    image_feature_cache_gb: float = 32.0  # per process, on the CPU; images beyond it are encoded every time
    # Q-Former (qformer.py); encoder_width comes from the image encoder, vocab_size must match the tokenizer
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    qformer_use_checkpoint: bool = False  # recompute the Q-Former layers in backward (blocks.py)
    pretrained: Optional[str] = None  # checkpoint (LAVIS, ours, a Hugging Face BLIP-2 dir) loaded after building
    finetuned: Optional[str] = None  # a second checkpoint loaded over it (LAVIS's name), e.g. stage 2 over stage 1


@dataclasses.dataclass
class Blip2QformerConfig(Blip2VisionConfig):
    bert_init_path: Optional[str] = None  # local HF bert-base-uncased dir; None: random init
    tokenizer_path: str = "bert-base-uncased"  # local dir with vocab.txt; relative: from cwd, then repo root
    embed_dim: int = 256  # ITC projection width
    max_txt_len: int = 32
    clamp_temp: bool = True


@dataclasses.dataclass
class Blip2Features:
    """``extract_features`` output (LAVIS BlipOutputFeatures); fields not computed in a mode are None."""

    image_embeds: Optional[torch.Tensor] = None  # [B, Q, H] query outputs (mode "image")
    image_embeds_proj: Optional[torch.Tensor] = None  # [B, Q, embed_dim], normalised
    text_embeds: Optional[torch.Tensor] = None  # [B, T, H] text outputs (mode "text")
    text_embeds_proj: Optional[torch.Tensor] = None  # [B, T, embed_dim], normalised
    multimodal_embeds: Optional[torch.Tensor] = None  # [B, Q, H] query outputs with text (mode "multimodal")


# ----------------------------------------------------------------------------------- submodules
def build_tokenizer(tokenizer_path: str) -> BertTokenizer:
    """BERT WordPiece tokenizer from a local directory, with ``[DEC]`` added as bos token (LAVIS)."""
    path = Path(tokenizer_path)
    if not path.is_absolute() and not path.is_dir() and (CONFIG_ROOT.parent / path).is_dir():
        path = CONFIG_ROOT.parent / path
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(
            f"model.tokenizer_path={tokenizer_path}: no vocab.txt there; point it at a local BERT tokenizer "
            "directory (e.g. a download of bert-base-uncased)"
        )
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def _image_inputs(image: torch.Tensor | ImageKeyValues) -> dict[str, Any]:
    """``Qformer.bert`` keyword for image features [B, N, C] or their projected keys/values."""
    return {"image_key_values": image} if isinstance(image, ImageKeyValues) else {"encoder_hidden_states": image}


def _rows(image: torch.Tensor | ImageKeyValues) -> int:
    return image.batch_size if isinstance(image, ImageKeyValues) else image.shape[0]


# ---------------------------------------------------------------------------------------- model
class Blip2Base(BaseModel):
    """Image encoder -> ``ln_vision`` -> Q-Former with ``query_tokens``: the part every BLIP-2 shares."""

    # Checkpoints of a frozen encoder hold no visual_encoder.* weights (LAVIS's and ours save trainable
    # ones only): allowed only once the encoder has weights from somewhere (``allow_missing``).
    vit_loaded: bool = False
    qformer_loaded: bool = False  # from model.bert_init_path or a checkpoint with Qformer.* weights
    image_feature_cache: Optional[ImageFeatureCache] = None
    path_keys = ("pretrained", "finetuned", "vit_pretrained", "bert_init_path", "tokenizer_path", "llm_path")

    def init_vision_and_qformer(self, cfg: Blip2VisionConfig, vocab_size: Optional[int]) -> int:
        """Build ``visual_encoder``, ``ln_vision``, ``Qformer`` and ``query_tokens``; return the Q-Former width.
        ``vocab_size``: the tokenizer's size, or None for a queries-only Q-Former (stage 2)."""
        self.visual_encoder = create_vision_encoder(cfg.vit_model, cfg.img_size, cfg.drop_path_rate,
                                                    depth=cfg.vit_depth, arch=cfg.vit_arch)
        if cfg.vit_pretrained:
            load_vision_weights(self.visual_encoder, cfg.vit_model, cfg.vit_pretrained)
            self.vit_loaded = True
        set_vit_precision(self.visual_encoder, cfg.vit_precision)
        width = self.visual_encoder.num_features
        self.ln_vision = nn.LayerNorm(width, eps=cfg.ln_vision_eps)
        if cfg.freeze_vit:
            for param in self.visual_encoder.parameters():
                param.requires_grad_(False)
            self.visual_encoder.eval()
        if cfg.cache_image_features:
            if not cfg.freeze_vit:
                raise ValueError("model.cache_image_features=true needs model.freeze_vit=true: a trained "
                                 "encoder's features change every step")
            self.image_feature_cache = ImageFeatureCache(cfg.image_feature_cache_gb)

        qcfg = dataclasses.replace(cfg.qformer, text_branch=vocab_size is not None)
        if qcfg.encoder_width is None:
            qcfg.encoder_width = width
        elif qcfg.encoder_width != width:
            raise ValueError(f"model.qformer.encoder_width={qcfg.encoder_width} but {cfg.vit_model} features are "
                             f"{width} wide; remove model.qformer.encoder_width (it is taken from the encoder)")
        if vocab_size is not None:
            if qcfg.vocab_size is None:
                qcfg.vocab_size = vocab_size
            elif qcfg.vocab_size != vocab_size:
                raise ValueError(f"model.tokenizer_path={cfg.tokenizer_path} has {vocab_size} tokens with [DEC] but "
                                 f"model.qformer.vocab_size={qcfg.vocab_size} (model type {cfg.model_type}: a "
                                 f"{qcfg.vocab_size - 1}-word BERT vocabulary, e.g. bert-base-uncased's). If that BERT "
                                 "is meant, point model.tokenizer_path (and model.bert_init_path) at its folder; to "
                                 "train with this tokenizer instead, set model.qformer.vocab_size=null")
        self.Qformer = QFormer(qcfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, qcfg.num_query_token, qcfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=qcfg.initializer_range)
        blocks = transformer_blocks(self)
        if cfg.vit_use_checkpoint:  # ours, not timm's set_grad_checkpointing: see blocks.py
            checkpoint_blocks(blocks["vision"])
        if cfg.qformer_use_checkpoint:
            checkpoint_blocks(blocks["qformer"])
        return qcfg.hidden_size

    def train(self, mode: bool = True) -> "Blip2Base":
        super().train(mode)
        if self.cfg.freeze_vit:
            self.visual_encoder.eval()  # LAVIS's disabled_train
        return self

    def no_decay_names(self) -> set[str]:
        return {"query_tokens"}

    @property
    def num_query_token(self) -> int:
        return self.query_tokens.shape[1]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] -> ``ln_vision`` output [B, 1 + patches, width], float32 (the encoder's part
        from ``image_feature_cache`` for images it has seen)."""
        return self.ln_vision(self.image_features(image))

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """``encode_image`` before ``ln_vision``: the encoder's output [B, 1 + patches, width] as float32."""
        def encode(images: torch.Tensor) -> torch.Tensor:
            return vision_features(self.visual_encoder, images, self.cfg.vit_precision)

        size = self.cfg.img_size
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"images are {image.shape[-2]}x{image.shape[-1]} px but model.img_size={size}: set the data "
                             f"sets' image processors to it (datasets.<name>.vis_processor.<train|eval>.image_size={size})")
        image = image.to(self.device)
        cache = self.image_feature_cache
        features = encode(image) if cache is None else cache.encode(image, encode)
        return features.float()

    def query_pass(self, image: torch.Tensor | ImageKeyValues, use_cache: bool = False):
        """Queries cross-attending to the image (no text): QFormerOutput with [B, Q, H]. ``image``: features
        [B, N, C] or their keys/values projected beforehand (``Qformer.bert.image_key_values``)."""
        queries = self.query_tokens.expand(_rows(image), -1, -1)
        return self.Qformer.bert(query_embeds=queries, use_cache=use_cache, **_image_inputs(image))

    def allow_missing(self, state: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """A checkpoint may lack the image encoder only if it already has weights (``vit_pretrained`` or
        an earlier checkpoint); otherwise it would silently stay random."""
        if not self.vit_loaded and not any(k.startswith("visual_encoder.") for k in state):
            raise KeyError("this checkpoint holds no visual_encoder.* weights and none were loaded before: the image "
                           "encoder would stay random. Set model.vit_pretrained (e.g. LAVIS's eva_vit_g.pth), or set "
                           "model.pretrained to a checkpoint that has them and model.finetuned to this one")
        return ("visual_encoder.",)

    def mark_loaded(self, state: dict[str, torch.Tensor]) -> None:
        if any(k.startswith("visual_encoder.") for k in state):
            self.vit_loaded = True
        if any(k.startswith("Qformer.") for k in state):
            self.qformer_loaded = True

    def untrained_parts(self) -> list[tuple[str, str]]:
        """The image encoder and the Q-Former need weights unless ``vit_model`` is in ``RANDOM_BY_DESIGN``
        (``tiny``); the LLM of stage 2 always comes from ``llm_path``."""
        vit = self.cfg.vit_model
        if vit in RANDOM_BY_DESIGN:
            return []
        parts = []
        if not self.vit_loaded:
            weights = VIT_WEIGHT_FILES.get(vit, f"a {vit} state dict")
            parts.append(("the image encoder", f"model.vit_pretrained ({weights})"))
        if not self.qformer_loaded:
            from_bert = hasattr(self.cfg, "bert_init_path")  # stage 2 has no text branch to start from BERT
            parts.append(("the Q-Former", "model.pretrained or model.bert_init_path" if from_bert
                          else "model.pretrained (a stage-1 checkpoint)"))
        return parts

    @classmethod
    def checkpoint_config(cls, path: str | Path, cfg: Blip2VisionConfig) -> dict[str, Any]:
        """A Hugging Face BLIP-2 directory gives the sizes of everything (``hf_blip2.model_config``)."""
        return hf_blip2.model_config(path, cfg) if hf_blip2.is_hf_blip2_dir(path) else {}

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face BLIP-2 keys are renamed to LAVIS's (``hf_blip2.convert_hf_blip2``); then, as for
        LAVIS checkpoints: drop ``position_ids``, map ``visual_encoder.*`` onto timm (see convert.py). A
        language projection is dropped where the model has none (stage 1)."""
        if hf_blip2.is_hf_blip2_state(state):
            state = hf_blip2.convert_hf_blip2(state)
            if not hasattr(self, "llm_proj"):
                state = {k: v for k, v in state.items() if not k.startswith("llm_proj.")}
        return convert_lavis_blip2(
            state, lambda visual: vision_checkpoint_filter(self.cfg.vit_model, visual, self.visual_encoder)
        )


@MODELS.register("blip2")
class Blip2Qformer(Blip2Base):
    """Image encoder -> ``ln_vision`` -> Q-Former with ``query_tokens``; ITC/ITM/ITG heads.

    Parameter names are LAVIS's: ``visual_encoder.*``, ``ln_vision``, ``Qformer.*``, ``query_tokens``,
    ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``.
    """

    config_class = Blip2QformerConfig

    def __init__(self, cfg: Blip2QformerConfig):
        super().__init__()
        self.cfg = cfg
        try:
            self.tokenizer: Optional[BertTokenizer] = build_tokenizer(cfg.tokenizer_path)
        except FileNotFoundError:
            if not building_weightless() or cfg.qformer.vocab_size is None:
                raise
            self.tokenizer = None  # keys and shapes only (on the meta device): the vocabulary size is the config's
        vocab_size = cfg.qformer.vocab_size if self.tokenizer is None else len(self.tokenizer)
        hidden = self.init_vision_and_qformer(cfg, vocab_size=vocab_size)
        if cfg.bert_init_path:
            init_from_bert(self.Qformer, cfg.bert_init_path)
            self.qformer_loaded = True
        self.vision_proj = nn.Linear(hidden, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # (sim [b, N], positive [b, N]) -> negative column per row [b]; swap for deterministic runs
        self.negative_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = losses.sample_hard_negatives

    # -------------------------------------------------------------------------------- building blocks
    def tokenize(self, texts: list[str], max_length: Optional[int] = None,
                 padding: Literal["max_length", "longest"] = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each [B, T]; T = ``max_length`` (default ``max_txt_len``) when
        padding to max_length, as LAVIS trains."""
        tokens = self.tokenizer(list(texts), padding=padding, truncation=True,
                                max_length=max_length or self.cfg.max_txt_len, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone, bidirectional: [B, T, H]."""
        return self.Qformer.bert(input_ids, attention_mask=attention_mask).last_hidden_state

    def multimodal_pass(
        self, image: torch.Tensor | ImageKeyValues, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Queries and text attend to each other (queries also to the image): [B, Q + T, H]. ``image``:
        features [B, N, C] or projected keys/values with one image per row."""
        batch = _rows(image)
        queries = self.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(batch, self.num_query_token, dtype=text_mask.dtype, device=text_mask.device)
        return self.Qformer.bert(text_ids, attention_mask=torch.cat([query_mask, text_mask], dim=1),
                                 query_embeds=queries, **_image_inputs(image)).last_hidden_state

    def itm_logits(self, image: torch.Tensor | ImageKeyValues, text_ids: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] (no match, match): the ITM head averaged over the multimodal query outputs."""
        hidden = self.multimodal_pass(image, text_ids, text_mask)
        return self.itm_head(hidden[:, : self.num_query_token]).mean(dim=1)

    def itm_images(self, image_kv: ImageKeyValues, image_embeds_all: torch.Tensor, negative_image: torch.Tensor,
                   rank: int, world_size: int) -> ImageKeyValues:
        """Keys/values of the 3b ITM pairs' images: (image i, hard negative of text i, image i).

        ``image_kv``: this rank's b images, projected once by the image pass; the pairs select from it,
        so the projections are not repeated and every pair's gradient sums into them. A negative from
        another rank (``negative_image`` [b] indexes the gathered ``image_embeds_all`` [N, P, C]) is
        projected here; its gradient returns to its rank through the gather's backward, which every rank
        therefore always joins (an empty selection when all negatives are local).
        """
        b = image_kv.num_images
        own = torch.arange(b, device=negative_image.device)
        local = negative_image - rank * b
        if world_size > 1:
            remote = (local < 0) | (local >= b)
            image_kv = image_kv.cat(self.Qformer.bert.image_key_values(image_embeds_all[negative_image[remote]]))
            local = local.masked_scatter(remote, b + torch.arange(int(remote.sum()), device=local.device))
        return image_kv.select(torch.cat([own, local, own]))

    # ------------------------------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """batch: image [b, 3, H, W], text_input list[str] (b), optional image_id (ints or strings).

        Returns {"loss", "loss_itc", "loss_itm", "loss_lm"}; losses are means over this rank's samples.
        """
        image, texts = batch["image"], batch["text_input"]
        b = image.shape[0]
        if len(texts) != b:
            raise ValueError(f"batch has {b} images but {len(texts)} texts in text_input")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if self.cfg.clamp_temp:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)

        features = self.image_features(image)  # [b, P, C]
        image_embeds = self.ln_vision(features)  # what other ranks' ITM negatives are projected from
        # every image's keys/values, projected once for the image pass and ITM, ln_vision folded in
        image_kv = self.Qformer.bert.image_key_values(features, norm=self.ln_vision)
        query_out = self.query_pass(image_kv, use_cache=True)
        image_feats = F.normalize(self.vision_proj(query_out.last_hidden_state), dim=-1)  # [b, Q, D]
        # dynamic padding: to the longest caption of any rank (ITM gathers the texts, so all ranks agree)
        text_ids, text_mask = self.tokenize(texts, padding="longest")
        missing = dist.max_over_ranks(text_ids.shape[1], self.device) - text_ids.shape[1]
        text_ids = F.pad(text_ids, (0, missing), value=self.tokenizer.pad_token_id)  # [b, T]
        text_mask = F.pad(text_mask, (0, missing), value=0)
        text_feat = F.normalize(self.text_proj(self.text_pass(text_ids, text_mask)[:, 0]), dim=-1)  # [b, D]

        # ITC: local rows with gradients against every rank's features without (LAVIS concat_all_gather)
        image_feats_all = dist.all_gather_no_grad(image_feats).detach()  # [N, Q, D]
        text_feat_all = dist.all_gather_no_grad(text_feat).detach()  # [N, D]
        sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feat, image_feats_all, text_feat_all, self.temp)
        image_ids = image_ids_all = None
        if batch.get("image_id") is not None:
            image_ids = losses.image_ids_to_tensor(batch["image_id"], self.device)
            if image_ids.shape[0] != b:
                raise ValueError(f"batch has {b} images but {image_ids.shape[0]} image_id values")
            image_ids_all = dist.all_gather_no_grad(image_ids)
        positive = losses.positive_mask(b, rank, world_size, image_ids, image_ids_all, self.device)
        loss_itc = losses.itc_loss(sim_i2t, sim_t2i, positive)

        # ITM: (text, image) positives, (text, hard negative image), (hard negative text, image)
        text_ids_all = dist.all_gather_no_grad(text_ids)
        text_mask_all = dist.all_gather_no_grad(text_mask)
        image_embeds_all = dist.all_gather_with_grad(image_embeds)  # negatives from other ranks keep grads
        with torch.no_grad():
            negative_image = self.negative_sampler(sim_t2i, positive)  # [b] global image index per text
            negative_text = self.negative_sampler(sim_i2t, positive)  # [b] global text index per image
        itm_logits = self.itm_logits(
            self.itm_images(image_kv, image_embeds_all, negative_image, rank, world_size),
            torch.cat([text_ids, text_ids, text_ids_all[negative_text]], dim=0),
            torch.cat([text_mask, text_mask, text_mask_all[negative_text]], dim=0),
        )
        loss_itm = losses.itm_loss(itm_logits, num_positive=b)

        # ITG: causal text over the cached query keys/values of the image pass
        decoder_ids, labels = losses.lm_inputs(text_ids, self.tokenizer.bos_token_id, self.tokenizer.pad_token_id)
        query_mask = torch.ones(b, self.num_query_token, dtype=text_mask.dtype, device=text_mask.device)
        lm_out = self.Qformer.bert(decoder_ids, attention_mask=torch.cat([query_mask, text_mask], dim=1),
                                   past_key_values=query_out.past_key_values, is_decoder=True)
        predicting, targets = losses.lm_targets(labels)  # the LM head skips positions that predict no label
        loss_lm = losses.lm_loss_on_targets(self.Qformer.lm_logits(lm_out.last_hidden_state[predicting]), targets)

        return {"loss": loss_itc + loss_itm + loss_lm, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}

    # ------------------------------------------------------------------------- retrieval / inference
    def compute_image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W] -> (image_embeds [N, P, C] for ``itm_score``, normalised projected query
        features [N, Q, embed_dim]); ITC similarity to a text = max over Q of the dot products."""
        image_embeds = self.encode_image(images)
        image_feats = F.normalize(self.vision_proj(self.query_pass(image_embeds).last_hidden_state), dim=-1)
        return image_embeds, image_feats

    def compute_text_features(self, texts: list[str], max_length: Optional[int] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """texts (N) -> (input_ids [N, T], attention_mask [N, T], normalised projected [CLS] features
        [N, embed_dim]); T = ``max_length`` (default ``max_txt_len``; LAVIS retrieval uses 35)."""
        text_ids, text_mask = self.tokenize(texts, max_length)
        text_feat = F.normalize(self.text_proj(self.text_pass(text_ids, text_mask)[:, 0]), dim=-1)
        return text_ids, text_mask, text_feat

    def itm_score(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match logit [N] of each (image_embeds[i], text i) pair: the ITM head's "match" logit averaged
        over queries (LAVIS ``compute_itm``; LAVIS retrieval adds the ITC similarity to it)."""
        return self.itm_logits(image_embeds, text_ids, text_mask)[:, 1]  # the mean commutes with [:, 1]

    @torch.no_grad()
    def extract_features(self, samples: dict[str, Any],
                         mode: Literal["image", "text", "multimodal"] = "multimodal") -> Blip2Features:
        """LAVIS ``extract_features``: "image" -> image_embeds(_proj); "text" -> text_embeds(_proj) (texts
        padded to the longest); "multimodal" -> multimodal_embeds (queries attending to image and text)."""
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode={mode!r}; choose 'image', 'text' or 'multimodal'")
        image, texts = samples.get("image"), samples.get("text_input")
        if mode in ("image", "multimodal") and image is None:
            raise ValueError(f"mode={mode!r} needs samples['image']")
        if mode in ("text", "multimodal") and texts is None:
            raise ValueError(f"mode={mode!r} needs samples['text_input']")
        features = Blip2Features()
        if mode == "image":
            query_out = self.query_pass(self.encode_image(image)).last_hidden_state
            features.image_embeds = query_out
            features.image_embeds_proj = F.normalize(self.vision_proj(query_out), dim=-1)
        elif mode == "text":
            text_ids, text_mask = self.tokenize(texts, self.Qformer.config.max_position_embeddings, padding="longest")
            text_out = self.text_pass(text_ids, text_mask)
            features.text_embeds = text_out
            features.text_embeds_proj = F.normalize(self.text_proj(text_out), dim=-1)
        else:
            image_embeds = self.encode_image(image)
            text_ids, text_mask = self.tokenize(texts, self.Qformer.config.max_position_embeddings, padding="longest")
            hidden = self.multimodal_pass(image_embeds, text_ids, text_mask)
            features.multimodal_embeds = hidden[:, : self.num_query_token]
        return features

    # ---------------------------------------------------------------------------- checkpoint filter
    def allow_missing(self, state: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """Beyond the image encoder (``Blip2Base.allow_missing``), two kinds of checkpoint leave parts at
        their initialisation, with a warning naming them: a queries-only Q-Former (Hugging Face
        ``Blip2Model`` / ``Blip2ForConditionalGeneration``, a stage-2 checkpoint) lacks the text branch and
        every head; Hugging Face ``Blip2ForImageTextRetrieval`` lacks ``temp`` and the LM head (ITG)."""
        allowed = super().allow_missing(state)
        if "Qformer.bert.embeddings.word_embeddings.weight" not in state:
            what = "the Q-Former's text branch and the ITC/ITM/ITG heads (a queries-only Q-Former)"
            layers = range(len(self.Qformer.bert.encoder.layer))
            partial = ("Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_embeddings.",
                       "Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.", "temp",
                       *(f"Qformer.bert.encoder.layer.{i}.{part}." for i in layers for part in ("intermediate", "output")))
        elif "temp" not in state and "Qformer.cls.predictions.transform.dense.weight" not in state:
            what = "temp and the LM head (ITG) (no such weights in an image-text retrieval model)"
            partial = ("temp", "Qformer.cls.predictions.transform.", "Qformer.cls.predictions.bias",
                       "Qformer.cls.predictions.decoder.bias")
        else:
            return allowed
        logger.warning("this checkpoint has no weights for %s: they keep their initialisation%s", what,
                       " (from model.bert_init_path where it has them)" if self.cfg.bert_init_path else "")
        return allowed + partial


# ------------------------------------------------------------------------- variant registrations
@MODELS.register("blip2_feature_extractor")
class Blip2FeatureExtractor(Blip2Qformer):
    """``forward(samples, mode)`` = ``extract_features`` (LAVIS registers this name on Blip2Qformer)."""

    def forward(self, samples: dict[str, Any], mode: Literal["image", "text", "multimodal"] = "multimodal"
                ) -> Blip2Features:  # type: ignore[override]
        return self.extract_features(samples, mode)


@MODELS.register("blip2_image_text_matching")
class Blip2ImageTextMatching(Blip2Qformer):
    """LAVIS Blip2ITM: score image/text pairs with the ITM head or by ITC similarity."""

    def forward(self, samples: dict[str, Any], match_head: Literal["itm", "itc"] = "itm"
                ) -> torch.Tensor:  # type: ignore[override]
        """samples: image [B, 3, H, W], text_input list[str] (B) -> "itm": logits [B, 2] (no match,
        match); "itc": cosine similarity [B] of each pair (max over queries)."""
        if match_head not in ("itm", "itc"):
            raise ValueError(f"match_head={match_head!r}; choose 'itm' or 'itc'")
        image_embeds = self.encode_image(samples["image"])
        text_ids, text_mask = self.tokenize(samples["text_input"], padding="longest")
        if match_head == "itm":
            return self.itm_logits(image_embeds, text_ids, text_mask)
        image_feats = F.normalize(self.vision_proj(self.query_pass(image_embeds).last_hidden_state), dim=-1)
        text_feat = F.normalize(self.text_proj(self.text_pass(text_ids, text_mask)[:, 0]), dim=-1)
        return torch.einsum("bqd,bd->bq", image_feats, text_feat).amax(dim=1)
