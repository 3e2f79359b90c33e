"""BLIP-2 stage-1 losses as pure functions: ITC, ITM hard-negative mining, ITG (LM) labels and loss.

Nothing here talks to torch.distributed: the model gathers tensors with ``lavis_lite.dist`` and passes
the local and the gathered ("all", N = world_size * b rows) tensors plus its ``rank``. The math is
LAVIS's (lavis/models/blip2_models/blip2_qformer.py), written out:

- ITC: each local image (its Q query features) against all texts, similarity = max over queries, / temp;
  each local text against all images likewise. Targets: 1 on every pair with the same image id (just the
  pair itself without ids), normalised per row, smoothed: 0.9 * t + 0.1 / N (LAVIS's COCO fine-tuning
  targets; identical to ``F.cross_entropy(label_smoothing=0.1)`` when ids are unique).
- ITM negatives: ``softmax(sim)`` over all rows of the other modality with every positive (same image id,
  or the pair itself) at exactly zero weight, one draw per row.
- ITG: next-token cross-entropy with label smoothing 0.1, padding labels -100.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def image_ids_to_tensor(image_ids: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Image ids (ints, strings such as ``"coco_123456"``, or an int tensor) -> int64 codes [b].

    Integers are kept; strings become the first 8 bytes of their BLAKE2b digest, the same on every rank
    and in every process (Python's ``hash`` is salted per process), so codes can be gathered as a tensor
    and compared across ranks. Two distinct strings collide with probability about 2**-64.
    """
    if isinstance(image_ids, torch.Tensor):
        if image_ids.dtype.is_floating_point:
            raise TypeError(f"image_id tensor has dtype {image_ids.dtype}; use integer ids or strings")
        return image_ids.reshape(-1).to(device=device, dtype=torch.long)
    codes = []
    for image_id in image_ids:
        if isinstance(image_id, torch.Tensor):
            image_id = image_id.item()
        if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
            codes.append(int(image_id))
        elif isinstance(image_id, str):
            digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
            codes.append(int.from_bytes(digest, "little", signed=True))
        else:
            raise TypeError(f"image_id {image_id!r} is a {type(image_id).__name__}; use an int or a str")
    return torch.tensor(codes, dtype=torch.long, device=device)


def positive_mask(
    batch_size: int,
    rank: int,
    world_size: int,
    image_ids: Optional[torch.Tensor] = None,
    image_ids_all: Optional[torch.Tensor] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool [b, N]: local row i and global column j show the same image.

    With ids: equal codes; without: only the pair itself (column ``rank * b + i``).
    """
    if image_ids is not None:
        if image_ids_all is None:
            raise ValueError("image_ids given without image_ids_all (the ids gathered from every rank)")
        return image_ids[:, None] == image_ids_all[None, :]
    mask = torch.zeros(batch_size, batch_size * world_size, dtype=torch.bool, device=device)
    rows = torch.arange(batch_size, device=device)
    mask[rows, rank * batch_size + rows] = True
    return mask


def itc_similarities(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    image_feats_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    temp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim_i2t, sim_t2i), each [b, N]: max over the Q queries of cosine similarities, divided by temp.

    image_feats [b, Q, D] and text_feat [b, D] are this rank's (normalised); the ``_all`` versions
    [N, Q, D] / [N, D] are gathered from every rank.
    """
    sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_feat_all).amax(dim=-1) / temp
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feats_all).amax(dim=-1) / temp
    return sim_i2t, sim_t2i


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positive: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Mean of image->text and text->image soft-target cross-entropies over the b local rows."""
    targets = positive.float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    targets = (1.0 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def hard_negative_weights(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Sampling weights [b, N]: ``softmax(sim)`` over the non-positive columns; positives get exactly 0.

    Raises when a row has no negative (every sample in the global batch shows the same image), and
    FloatingPointError when the similarities are not finite (a diverging run), before sampling trips on it.
    """
    if not torch.isfinite(sim).all():
        raise FloatingPointError("ITM hard-negative mining: the image-text similarities are not finite")
    if positive.all(dim=1).any():
        row = int(positive.all(dim=1).nonzero()[0])
        raise ValueError(
            f"row {row} has no negative: all {positive.shape[1]} samples of the global batch share its "
            "image_id; ITM needs at least two different images per global batch (raise the batch size)"
        )
    return F.softmax(sim.detach().float().masked_fill(positive, float("-inf")), dim=1)


def sample_hard_negatives(
    sim: torch.Tensor, positive: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One negative column per row [b], drawn in proportion to ``hard_negative_weights``; never a positive."""
    weights = hard_negative_weights(sim, positive)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def hardest_negatives(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Deterministic alternative to ``sample_hard_negatives``: the most similar non-positive column [b]."""
    hard_negative_weights(sim, positive)  # same check for rows without negatives
    return sim.detach().masked_fill(positive, float("-inf")).argmax(dim=1)


def itm_loss(logits: torch.Tensor, num_positive: int) -> torch.Tensor:
    """Cross-entropy of ITM logits [num_positive + num_negative, 2]: the first ``num_positive`` rows
    are matches (label 1), the rest are not (label 0)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(logits.float(), labels)


def lm_inputs(input_ids: torch.Tensor, bos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input ids (first token, [CLS], replaced by ``bos_token_id`` = [DEC]) and labels [B, T]
    (padding -> -100)."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = bos_token_id
    return decoder_ids, decoder_ids.masked_fill(decoder_ids == pad_token_id, IGNORE_INDEX)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] at position t predict labels[:, t + 1]; mean over the
    labelled tokens of this rank (LAVIS)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


def lm_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicting [B, T] bool, targets [n]): the positions whose logits predict a label (position t
    predicts labels[:, t + 1]; the last position and those before padding predict none) and those labels,
    in order. ``lm_loss_on_targets`` of the logits at just these positions equals ``lm_loss``."""
    targets = labels[:, 1:]
    predicting = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)
    return predicting, targets[targets != IGNORE_INDEX]


def lm_loss_on_targets(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """``lm_loss`` given the logits [n, V] of the predicting positions and their targets [n] (``lm_targets``)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

