"""Q-Former: BERT blocks whose query positions cross-attend to image features (BLIP-2, Li et al. 2023,
https://arxiv.org/abs/2301.12597).

``num_query_token`` learned queries and the text share the self-attention of every layer; every
``cross_attention_freq``-th layer (0, 2, 4, ...) lets the queries attend to the image; queries and text
have separate feed-forward paths (``intermediate_query``/``output_query`` vs ``intermediate``/``output``).
Parameter names equal LAVIS's (lavis/models/blip2_models/Qformer.py), so ``Qformer.*`` keys of LAVIS
checkpoints load unchanged.

How we differ from LAVIS:
- attention is ``F.scaled_dot_product_attention`` with boolean masks (LAVIS adds -10000 to masked scores:
  the same probabilities unless a row masks every key, which our masks never do);
- no ``position_ids`` buffer (LAVIS checkpoints carry one; blip2_qformer's filter drops it), no
  ``token_type_embeddings`` (LAVIS drops BERT's too), no relative positions, head pruning, chunked FFN or
  HF ``generate``;
- ``text_branch=False`` builds no word/position embeddings, text FFN or LM head: LAVIS's stage-2 models
  delete them after construction;
- padding costs nothing: a pass computes only the query positions and the real text positions
  (``TokenLayout``), as rows of one [R, H] tensor, and lays them out padded only for attention, where
  padding is masked anyway; the outputs at padding positions are zero (LAVIS computes values there that
  nothing reads);
- the cross-attention keys/values of an image can be projected once (``BertModel.image_key_values``) and
  shared by several passes and pairs (ITM's negatives) instead of being projected per pass.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lavis_lite.models.base import load_state_dict_file

logger = logging.getLogger(__name__)

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (key, value), each [B, heads, L, head_dim]


# --------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class QFormerConfig:
    """BERT-base sizes (bert-base-uncased's config.json) plus the Q-Former's own fields."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    # bert-base-uncased's 30522 + [DEC]. None: the owning model sizes it to len(tokenizer).
    vocab_size: Optional[int] = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    cross_attention_freq: int = 2  # layer i has cross-attention when i % cross_attention_freq == 0
    num_query_token: int = 32
    # width of the image features; None: the owning model takes it from its image encoder
    encoder_width: Optional[int] = None
    text_branch: bool = True  # False: queries only (stage-2 models)


# ----------------------------------------------------------------------------------- submodules
def self_attention_mask(
    key_mask: Optional[torch.Tensor], num_rows: int, prefix_len: int, causal: bool
) -> Optional[torch.Tensor]:
    """Boolean self-attention mask (True: may attend) of shape [B, 1, rows or 1, keys], or None.

    Keys are ``[prefix (query positions, possibly cached); text]``, ``key_mask`` [B, keys] marks padding
    (1: real token); the rows are the last ``num_rows`` keys. Not causal: every row sees every real key.
    Causal (image-grounded generation, LAVIS's UniLM mask): a query row sees only the prefix, a text row
    sees the whole prefix and the text up to itself.
    """
    if not causal:
        return None if key_mask is None else key_mask.bool()[:, None, None, :]
    if key_mask is None:
        raise ValueError("a causal self-attention mask needs key_mask [B, keys]")
    num_keys = key_mask.shape[1]
    key_pos = torch.arange(num_keys, device=key_mask.device)
    row_pos = torch.arange(num_keys - num_rows, num_keys, device=key_mask.device)
    text_row = row_pos >= prefix_len
    allowed = (key_pos[None, :] < prefix_len) | (text_row[:, None] & (key_pos[None, :] <= row_pos[:, None]))
    return allowed[None, None] & key_mask.bool()[:, None, None, :]


class Embeddings(nn.Module):
    """Word + absolute position embeddings for text; queries are prepended; then LayerNorm + dropout."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.text_branch:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(
        self, input_ids: Optional[torch.Tensor], query_embeds: Optional[torch.Tensor], position_offset: int = 0
    ) -> torch.Tensor:
        if input_ids is None:
            embeddings = query_embeds
        else:
            if not hasattr(self, "word_embeddings"):
                raise ValueError("this Q-Former was built with text_branch=False and takes no input_ids")
            positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
            embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
            if query_embeds is not None:
                embeddings = torch.cat([query_embeds, embeddings], dim=1)
        return self.dropout(self.LayerNorm(embeddings))


class TokenLayout(NamedTuple):
    """The positions a pass computes, out of its padded [B, L] batch (L = Q queries + T text positions).

    A pass's hidden states are rows [R, H]: the B * Q query positions first (sample by sample), then the
    real text positions (sample by sample, in order). Padding positions are not rows: they would only
    ever be keys that the attention masks hide. ``index`` [R] gives each row's position in B * L; None
    when the rows are every position in padded order (no padding, and queries or text alone).
    """

    batch: int
    length: int
    query_length: int
    index: Optional[torch.Tensor]

    @classmethod
    def of(cls, text_mask: Optional[torch.Tensor], batch: int, query_length: int, text_length: int,
           device: torch.device) -> "TokenLayout":
        """``text_mask`` [B, T] (1: real token) or None (every text position is real)."""
        length = query_length + text_length
        all_real = text_mask is None or bool(text_mask.all())
        if all_real and (query_length == 0 or text_length == 0):
            return cls(batch, length, query_length, None)
        starts = torch.arange(batch, device=device)[:, None] * length
        queries = (starts + torch.arange(query_length, device=device)).flatten()
        text = starts + query_length + torch.arange(text_length, device=device)
        text = text.flatten() if all_real else text.masked_select(text_mask.bool())
        return cls(batch, length, query_length, torch.cat([queries, text]))

    @property
    def num_query_rows(self) -> int:
        return self.batch * self.query_length

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, C] -> [B, L, C], zeros at padding positions."""
        if self.index is None:
            return rows.reshape(self.batch, self.length, -1)
        padded = rows.new_zeros(self.batch * self.length, rows.shape[-1]).index_copy(0, self.index, rows)
        return padded.view(self.batch, self.length, -1)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [R, C]."""
        flat = padded.reshape(self.batch * self.length, -1)
        return flat if self.index is None else flat.index_select(0, self.index)


class ImageKeyValues(NamedTuple):
    """Every cross-attention layer's keys/values of ``n`` images (``BertModel.image_key_values``), and
    which image each row of a batch attends to.

    ``layers``: per Q-Former layer (key, value) [n, heads, N, H / heads], None where the layer has no
    cross-attention. ``index``: [B] image of each batch row (None: row i is image i); the rows' queries
    are grouped by image for cross-attention (``ImageGroups``), so every pair attends to the one
    projection of its image and its gradient sums there. ``mask``: [n, N] (1: real image token) or None.
    """

    layers: tuple[Optional[tuple[torch.Tensor, torch.Tensor]], ...]
    index: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    @property
    def num_images(self) -> int:
        return next(kv[0].shape[0] for kv in self.layers if kv is not None)

    @property
    def batch_size(self) -> int:
        return self.num_images if self.index is None else self.index.shape[0]

    def select(self, index: torch.Tensor) -> "ImageKeyValues":
        """Batch rows showing images ``index`` [B] of these rows."""
        return self._replace(index=index if self.index is None else self.index[index])

    def cat(self, other: "ImageKeyValues") -> "ImageKeyValues":
        """The images of both (neither may have an ``index`` yet)."""
        if self.index is not None or other.index is not None:
            raise ValueError("ImageKeyValues.cat joins image sets; select rows after joining")
        if (self.mask is None) != (other.mask is None):
            raise ValueError("ImageKeyValues.cat: give both image sets a mask or neither")
        layers = tuple(None if a is None else (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
                       for a, b in zip(self.layers, other.layers))
        return ImageKeyValues(layers, None, None if self.mask is None else torch.cat([self.mask, other.mask]))


class ImageGroups(NamedTuple):
    """Batch rows grouped by the image they attend to, for cross-attention without a copy of an image's
    keys/values per row. When every image has at least ``per_image`` rows, the first ``per_image`` rows
    of each image (``grouped``, image-major) attend to the n images' own keys/values as one sequence of
    ``per_image * Q`` queries per image (a query's attention does not depend on the other queries); only
    the remaining rows (``rest``, showing images ``rest_image``) gather keys/values. ITM's 3b pairs
    (image i twice, then a hard negative) thus gather for b rows, not 3b."""

    grouped: torch.Tensor  # [n * per_image] row numbers
    rest: torch.Tensor  # [B - n * per_image] row numbers
    rest_image: torch.Tensor  # [B - n * per_image]
    order: torch.Tensor  # [B]: row r's position in cat(grouped, rest)
    num_images: int
    per_image: int

    @classmethod
    def of(cls, index: torch.Tensor, num_images: int) -> Optional["ImageGroups"]:
        """``index`` [B]: the image of each row. None when some image has no row (gather for all)."""
        counts = torch.bincount(index, minlength=num_images)
        per_image = int(counts.min())
        if per_image == 0:
            return None
        by_image = torch.argsort(index, stable=True)
        image = index[by_image]
        first = torch.cumsum(counts, 0) - counts  # each image's first position in ``by_image``
        take = torch.arange(index.shape[0], device=index.device) - first[image] < per_image
        grouped, rest = by_image[take], by_image[~take]
        order = torch.argsort(torch.cat([grouped, rest]))
        return cls(grouped, rest, index[rest], order, num_images, per_image)

    def attend(self, attend: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``attend(query [b, L, H], key, value, mask) -> [b, L, H]`` for query [B, Q, H] with the
        images' key/value [n, heads, N, d] and mask [n, 1, 1, N] or None -> [B, Q, H]."""
        q, width = query.shape[1:]
        out = [attend(query[self.grouped].view(self.num_images, self.per_image * q, width), key, value, mask)
               .view(-1, q, width)]
        if self.rest.numel():
            image = self.rest_image
            out.append(attend(query[self.rest], key[image], value[image], None if mask is None else mask[image]))
        return torch.cat(out).index_select(0, self.order)


class MultiHeadAttention(nn.Module):
    """``query``/``key``/``value`` projections and SDPA: self-attention over the rows of a ``TokenLayout``,
    or cross-attention of the queries to keys/values projected beforehand (``key_value``)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"qformer.hidden_size={cfg.hidden_size} is not a multiple of "
                             f"qformer.num_attention_heads={cfg.num_attention_heads}")
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, heads, L, H / heads]
        return x.view(x.shape[0], x.shape[1], self.num_heads, x.shape[2] // self.num_heads).transpose(1, 2)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:  # heads in, [B, L, H] out
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        return out.transpose(1, 2).flatten(2)

    def key_value(self, source: torch.Tensor, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, N, kv_width] -> (key, value), each [n, heads, N, H / heads]. ``scale``/``shift`` [kv_width]:
        project ``source * scale + shift`` instead, folded into the weights (W diag(scale), W shift + b)."""
        if scale is None:
            return self._heads(self.key(source)), self._heads(self.value(source))
        key, value = (F.linear(source, proj.weight * scale, torch.addmv(proj.bias, proj.weight, shift))
                      for proj in (self.key, self.value))
        return self._heads(key), self._heads(value)

    def forward(
        self,
        hidden: torch.Tensor,
        layout: TokenLayout,
        mask: Optional[torch.Tensor] = None,
        past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention: rows [R, H] of ``layout`` -> ([R, H], (key, value) [B, heads, keys, H / heads]
        incl. ``past_kv``; zero at padding positions, which ``mask`` hides)."""
        query, key, value = (self._heads(layout.pad(proj(hidden))) for proj in (self.query, self.key, self.value))
        if past_kv is not None:
            key, value = torch.cat([past_kv[0], key], dim=2), torch.cat([past_kv[1], value], dim=2)
        return layout.unpad(self._attend(query, key, value, mask)), (key, value)

    def cross(self, queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: Optional[torch.Tensor] = None, groups: Optional[ImageGroups] = None) -> torch.Tensor:
        """Cross-attention: queries [B, Q, H] to (key, value) [B, heads, N, H / heads] -> [B, Q, H]; with
        ``groups``, key/value/mask are the n images' own and the rows attend grouped by image."""
        query = self.query(queries)
        if groups is None:
            return self._attend(self._heads(query), key, value, mask)
        return groups.attend(lambda q, k, v, m: self._attend(self._heads(q), k, v, m), query, key, value, mask)


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's ``attention.output`` and ``output``."""

    def __init__(self, cfg: QFormerConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg, kv_width)
        self.output = ResidualOutput(cfg, cfg.hidden_size)

    def forward(self, hidden, layout, mask=None, past_kv=None):
        """Self-attention block on the rows [R, H] of ``layout``."""
        out, present = self.self(hidden, layout, mask, past_kv)
        return self.output(out, hidden), present

    def cross(self, queries, key, value, mask=None, groups=None):
        """Cross-attention block: queries [B, Q, H] to projected image keys/values."""
        return self.output(self.self.cross(queries, key, value, mask, groups), queries)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """Self-attention over [queries; text] -> cross-attention for queries only (some layers) -> FFN,
    separate for queries (``*_query``) and text."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        if index % cfg.cross_attention_freq == 0:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        else:
            self.crossattention = None
        if cfg.text_branch:
            self.intermediate = Intermediate(cfg)
            self.output = ResidualOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = ResidualOutput(cfg, cfg.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        layout: TokenLayout,
        self_mask: Optional[torch.Tensor],
        image_kv: Optional[tuple[torch.Tensor, torch.Tensor]],
        image_rows: Optional[torch.Tensor | ImageGroups],
        image_mask: Optional[torch.Tensor],
        past_kv: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden [R, H]: the rows of ``layout`` (queries first) -> ([R, H], self-attention (key, value)).
        ``image_kv``: this layer's (key, value) [n, heads, N, H / heads] of the images; ``image_rows``: the
        image of each batch row, as the rows grouped by image (``ImageGroups``) or an index [B] to gather
        keys/values by (None: row i is image i); ``image_mask`` [n or B, 1, 1, N] (as keys/values) or None."""
        attended, present = self.attention(hidden, layout, self_mask, past_kv)
        num_queries = layout.num_query_rows
        if num_queries == 0:
            return self.output(self.intermediate(attended), attended), present
        queries = attended[:num_queries]
        if self.crossattention is not None:
            if image_kv is None:
                raise ValueError("query positions need image features (encoder_hidden_states) for cross-attention")
            key, value = image_kv
            groups = image_rows if isinstance(image_rows, ImageGroups) else None
            if image_rows is not None and groups is None:
                key, value = key[image_rows], value[image_rows]
            queries = queries.view(layout.batch, layout.query_length, -1)
            queries = self.crossattention.cross(queries, key, value, image_mask, groups).flatten(0, 1)
        out = self.output_query(self.intermediate_query(queries), queries)
        if attended.shape[0] > num_queries:
            text = attended[num_queries:]
            out = torch.cat([out, self.output(self.intermediate(text), text)])
        return out, present


class Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormerOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, queries + text, H]; zero at padding positions
    past_key_values: Optional[KVCache]  # with use_cache: every layer's self-attention keys/values


class BertModel(nn.Module):
    """``Qformer.bert``: embeddings + encoder; one call runs queries, text or both."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def image_key_values(self, image_embeds: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         norm: Optional[nn.LayerNorm] = None) -> ImageKeyValues:
        """Project image features [n, N, encoder_width] (``mask`` [n, N], 1: real) to every cross-attention
        layer's keys/values once; passes and pairs that show these images select them by index.

        ``norm``: a LayerNorm to apply to ``image_embeds`` first (BLIP-2's ``ln_vision``). When the features
        need no gradient (a frozen image encoder) but its affine part does, that affine part is folded into
        the projections (``MultiHeadAttention.key_value``): backward then computes the projections' weight
        gradients only, not the gradient with respect to their [n * N, encoder_width] input, which a
        frozen encoder does not use (``norm.weight``/``bias`` get theirs from the folded weights).
        """
        scale = shift = None
        if norm is not None:
            fold = (norm.elementwise_affine and norm.bias is not None and not image_embeds.requires_grad
                    and torch.is_grad_enabled() and norm.weight.requires_grad)
            if fold:
                image_embeds = F.layer_norm(image_embeds, norm.normalized_shape, eps=norm.eps)
                scale, shift = norm.weight, norm.bias
            else:
                image_embeds = norm(image_embeds)
        layers = tuple(None if layer.crossattention is None
                       else layer.crossattention.self.key_value(image_embeds, scale, shift)
                       for layer in self.encoder.layer)
        return ImageKeyValues(layers, None, mask)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        query_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        is_decoder: bool = False,
        image_key_values: Optional[ImageKeyValues] = None,
    ) -> QFormerOutput:
        """Run [query_embeds; input_ids] through the layers; only query and real text positions are computed.

        Args:
            input_ids: [B, T] text tokens (optional).
            attention_mask: [B, keys] with keys = cached + queries + text; 1 for real tokens. Default: ones.
            query_embeds: [B, Q, H] learned queries (optional); only they cross-attend to the image.
            encoder_hidden_states: [B, N, encoder_width] image features; encoder_attention_mask: [B, N].
            past_key_values: cache of a previous call whose first ``num_query_token`` keys are queries
                (LAVIS's ITG reuses the image pass's query keys/values this way); text positions then
                continue after the cached text.
            is_decoder: causal text (text sees the queries and earlier text; queries never see text).
            image_key_values: instead of ``encoder_hidden_states``: the images' keys/values projected
                beforehand (``image_key_values``), with the image of each row.
        """
        cfg = self.config
        if input_ids is None and query_embeds is None:
            raise ValueError("give input_ids, query_embeds or both")
        if past_key_values is not None and query_embeds is not None:
            raise ValueError("query_embeds with past_key_values: the cache already holds the queries")
        if encoder_hidden_states is not None:
            if image_key_values is not None:
                raise ValueError("give encoder_hidden_states or image_key_values, not both")
            image_key_values = self.image_key_values(encoder_hidden_states, encoder_attention_mask)
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if past_len and past_len < cfg.num_query_token:
            raise ValueError(f"the cache holds {past_len} positions, fewer than num_query_token={cfg.num_query_token}")
        position_offset = past_len - cfg.num_query_token if past_len else 0
        query_length = 0 if query_embeds is None else query_embeds.shape[1]

        hidden = self.embeddings(input_ids, query_embeds, position_offset)
        batch, length = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + length, dtype=torch.long, device=hidden.device)
        if attention_mask.shape != (batch, past_len + length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"({batch}, {past_len + length}) = (batch, cached + queries + text)")
        prefix_len = cfg.num_query_token if past_len else query_length
        self_mask = self_attention_mask(attention_mask, length, prefix_len, causal=is_decoder)
        image_rows = image_mask = None
        if image_key_values is not None and query_length:
            if image_key_values.batch_size != batch:
                raise ValueError(f"image keys/values for {image_key_values.batch_size} rows but {batch} rows of "
                                 "queries; select one image per row (ImageKeyValues.select)")
            if image_key_values.index is not None:  # rows grouped by image (an index to gather by if one has none)
                image_rows = (ImageGroups.of(image_key_values.index, image_key_values.num_images)
                              or image_key_values.index)
            if image_key_values.mask is not None:
                image_mask = image_key_values.mask.bool()
                gathered = image_rows is not None and not isinstance(image_rows, ImageGroups)
                image_mask = (image_mask[image_rows] if gathered else image_mask)[:, None, None, :]
        layout = TokenLayout.of(attention_mask[:, past_len + query_length:], batch, query_length,
                                length - query_length, hidden.device)

        hidden = layout.unpad(hidden)
        presents = []
        for i, layer in enumerate(self.encoder.layer):
            past_kv = past_key_values[i] if past_key_values is not None else None
            image_kv = image_key_values.layers[i] if image_key_values is not None and query_length else None
            hidden, present = layer(hidden, layout, self_mask, image_kv, image_rows, image_mask, past_kv)
            presents.append(present)
        return QFormerOutput(layout.pad(hidden), tuple(presents) if use_cache else None)


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """``cls.predictions``: transform, then ``decoder`` tied to the word embeddings, plus ``bias``
    (also registered as ``decoder.bias``, as in LAVIS, so both keys are in the state dict)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class OnlyMLMHead(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


# ---------------------------------------------------------------------------------------- model
class QFormer(nn.Module):
    """LAVIS's ``BertLMHeadModel`` as used by BLIP-2: ``bert`` (see ``BertModel.forward``) and ``cls``
    (LM head, ``lm_logits``). The query FFN starts as a copy of the text FFN, as LAVIS does."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.encoder_width is None:
            raise ValueError("qformer.encoder_width is None; set it to the image feature width")
        if cfg.text_branch and cfg.vocab_size is None:
            raise ValueError("qformer.vocab_size is None; set it to the tokenizer's size")
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = OnlyMLMHead(cfg) if cfg.text_branch else None
        self.apply(self._init_weights)
        self.tie_weights()
        self.copy_text_ffn_to_query()

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's: normal(0, initializer_range) weights, zero biases, LayerNorm (1, 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @torch.no_grad()
    def copy_text_ffn_to_query(self) -> None:
        """``intermediate_query``/``output_query`` <- ``intermediate``/``output`` (LAVIS Blip2Qformer.__init__)."""
        if not self.config.text_branch:
            return
        for layer in self.bert.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())

    def forward(self, *args, **kwargs) -> QFormerOutput:
        return self.bert(*args, **kwargs)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] text hidden states -> [B, T, vocab_size] next-token logits."""
        if self.cls is None:
            raise ValueError("this Q-Former was built with text_branch=False and has no LM head")
        return self.cls(hidden)


# ---------------------------------------------------------------------------- checkpoint filter
# BERT keys LAVIS's Q-Former has no use for (its BertEmbeddings has no token types; no pooler/NSP head).
_BERT_UNUSED = ("embeddings.token_type_embeddings.", "embeddings.position_ids", "pooler.", "cls.seq_relationship.")
# (QFormerConfig field, bert config.json key) that must agree
_BERT_SIZES = (
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("max_position_embeddings", "max_position_embeddings"),
)
_VOCAB_SIZED = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.bias",
                "cls.predictions.decoder.weight")


class BertInitReport(NamedTuple):
    loaded: list[str]  # Q-Former keys filled from the BERT file
    missing: list[str]  # Q-Former keys left at random init (cross-attention; LM head if the file has none)
    ignored: list[str]  # BERT keys the Q-Former does not use


def bert_checkpoint_filter(
    state: dict[str, torch.Tensor], qformer: QFormer
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Hugging Face BERT keys (``bert.encoder.layer.N...`` or ``encoder.layer.N...``, old ``gamma``/``beta``
    LayerNorm names too) -> Q-Former keys. Rows of vocab-sized tensors beyond BERT's vocabulary (the
    added ``[DEC]``) keep the Q-Former's current values. Returns (mapped, ignored, unexpected)."""
    own = qformer.state_dict()
    mapped, ignored, unexpected = {}, [], []
    for key, value in state.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.startswith(_BERT_UNUSED):
            ignored.append(key)
            continue
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        target = name if name.startswith("cls.") else f"bert.{name}"
        if target not in own:
            if not qformer.config.text_branch:  # stage-2 Q-Formers have no text parts
                ignored.append(key)
            else:
                unexpected.append(key)
            continue
        if target in _VOCAB_SIZED and value.shape[0] != own[target].shape[0]:
            if value.shape[0] > own[target].shape[0]:
                raise ValueError(f"BERT {key} has {value.shape[0]} rows but qformer.vocab_size="
                                 f"{own[target].shape[0]}; the tokenizer must extend BERT's vocabulary")
            value = torch.cat([value.to(own[target].dtype), own[target][value.shape[0]:]], dim=0)
        mapped[target] = value
    return mapped, ignored, unexpected


def init_from_bert(qformer: QFormer, path: str | Path) -> BertInitReport:
    """Initialise the Q-Former from a Hugging Face BERT directory, as LAVIS does from bert-base-uncased.

    ``path`` holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (``BertModel`` or
    ``BertForMaskedLM``). Text weights are copied, the query FFN is copied from the text FFN,
    cross-attention keeps its random init. Raises on size mismatches and unknown keys.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.bert_init_path={path}: no config.json there; point it at a local "
                                "Hugging Face BERT directory (config.json + model.safetensors or pytorch_model.bin)")
    bert_cfg = json.loads((path / "config.json").read_text())
    for field, key in _BERT_SIZES:
        ours = getattr(qformer.config, field)
        if key in bert_cfg and bert_cfg[key] != ours:
            raise ValueError(f"{path}/config.json has {key}={bert_cfg[key]} but qformer.{field}={ours}; "
                             f"set model.qformer.{field}={bert_cfg[key]} or use a matching BERT")
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"model.bert_init_path={path}: no model.safetensors or pytorch_model.bin there")
    mapped, ignored, unexpected = bert_checkpoint_filter(load_state_dict_file(weights, "model.bert_init_path"), qformer)
    if unexpected:
        raise KeyError(f"{weights}: {len(unexpected)} keys match no Q-Former parameter {unexpected[:10]}; "
                       "is this a BERT checkpoint?")
    # tied or shared tensors that a file may store under one name only
    for key, twin in (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
                      ("cls.predictions.decoder.bias", "cls.predictions.bias"),
                      ("cls.predictions.bias", "cls.predictions.decoder.bias")):
        if key not in mapped and twin in mapped and qformer.config.text_branch:
            mapped[key] = mapped[twin]
    result = qformer.load_state_dict(mapped, strict=False)
    qformer.tie_weights()
    qformer.copy_text_ffn_to_query()
    missing = [k for k in result.missing_keys if "_query." not in k]
    unexpected_bad = [k for k in missing if ".crossattention." not in k and not k.startswith("cls.")]
    if unexpected_bad:
        raise KeyError(f"{weights} lacks {len(unexpected_bad)} Q-Former weights {unexpected_bad[:10]}; "
                       "is it a complete BERT checkpoint?")
    if any(k.startswith("cls.") for k in missing):
        logger.warning("%s has no LM head (cls.predictions): the Q-Former's LM head stays randomly initialised",
                       weights)
    logger.info("Q-Former from BERT %s: %d tensors loaded, %d left random (cross-attention), %d BERT keys unused",
                path, len(mapped), len(missing), len(ignored))
    return BertInitReport(sorted(mapped), missing, ignored)
