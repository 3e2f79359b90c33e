"""Image-text retrieval as BLIP-2 evaluates it: rank by ITC similarity, re-rank the top ``k_test``
candidates with ITM (score = ITM match logit + ITC similarity), report recall@1/5/10 both ways.

Distributed without copying every image embedding to every rank: each rank keeps the cross-
attention embeddings of its own images; only the small projected query features, the text
tokens and the final (pair, score) entries cross ranks.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader

from lavis_lite import dist
from lavis_lite.registry import TASKS
from lavis_lite.tasks.base import BaseTask

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RetrievalConfig:
    k_test: int = 128  # ITM re-ranks this many ITC candidates per query (LAVIS: 128 on COCO)
    itm_batch_size: int = 64


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: list[list[int]],
                   txt2img: list[int]) -> dict[str, float]:
    """Recall@K in percent. An image counts as found at the best rank of any of its captions."""
    positions_i2t = _positions(scores_i2t)
    ranks_i2t = np.array([positions_i2t[i, gts].min() for i, gts in enumerate(img2txt)])
    positions_t2i = _positions(scores_t2i)
    ranks_t2i = positions_t2i[np.arange(len(txt2img)), np.asarray(txt2img)]
    metrics = {}
    for prefix, ranks in (("txt", ranks_i2t), ("img", ranks_t2i)):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * float((ranks < k).mean())
        metrics[f"{prefix}_r_mean"] = sum(metrics[f"{prefix}_r{k}"] for k in (1, 5, 10)) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["txt_r_mean"]  # as LAVIS
    return metrics


def _positions(scores: np.ndarray) -> np.ndarray:
    """positions[q, c]: 0-based rank of candidate c for query q, best score first (ties: lower index)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    positions = np.empty_like(order)
    np.put_along_axis(positions, order, np.arange(scores.shape[1])[None].repeat(len(scores), 0), axis=1)
    return positions


@TASKS.register("retrieval")
class RetrievalTask(BaseTask):
    """The model provides ``compute_image_features(images) -> (image_embeds [B,L,C], query_feats
    [B,Q,D] normalised)``, ``compute_text_features(texts) -> (ids [B,T], mask [B,T], text_feats [B,D]
    normalised)`` and ``itm_score(image_embeds [N,L,C], ids [N,T], mask [N,T]) -> [N]``. The eval data
    set has ``text``, ``img2txt`` and ``txt2img`` and yields ``{"image", "index"}``."""

    config_class = RetrievalConfig

    @classmethod
    def metric_names(cls, cfg: RetrievalConfig) -> set[str]:
        recalls = {f"{side}_r{k}" for side in ("txt", "img") for k in (1, 5, 10, "_mean")}
        return recalls | {"r_mean", "agg_metrics"}

    @torch.no_grad()
    def evaluation(self, model: torch.nn.Module, loader: DataLoader, split: str, output_dir: str | None = None) -> dict:
        data = loader.dataset
        device = next(model.parameters()).device
        local_index, local_embeds, local_feats = [], [], []
        for batch in loader:
            embeds, feats = model.compute_image_features(batch["image"].to(device))
            local_index.extend(int(i) for i in batch["index"])
            local_embeds.append(embeds)
            local_feats.append(feats.float().cpu())
        image_embeds = torch.cat(local_embeds)
        image_feats = _gather_rows(local_index, torch.cat(local_feats), len(data.image))
        text_ids, text_mask, text_feats = self._text_features(model, data.text, loader.batch_size)

        sim_i2t = torch.einsum("iqd,td->iqt", image_feats, text_feats).amax(dim=1)  # [Ni, Nt]
        k = min(self.cfg.k_test, sim_i2t.shape[1], sim_i2t.shape[0])
        entries_i2t, entries_t2i = [], []
        # image -> text: each rank re-ranks the candidates of its own images
        top_sim, top_txt = sim_i2t[local_index].topk(k, dim=1)
        pairs = [(row, int(t), float(s)) for row in range(len(local_index))
                 for t, s in zip(top_txt[row], top_sim[row])]
        for (row, t, s), itm in zip(pairs, self._itm(model, image_embeds, pairs, text_ids, text_mask, device)):
            entries_i2t.append((local_index[row], t, itm + s))
        # text -> image: of every text's candidates, each rank scores those that are its images
        row_of = {image: row for row, image in enumerate(local_index)}
        top_sim, top_img = sim_i2t.t().topk(k, dim=1)
        pairs = [(row_of[int(i)], t, float(s)) for t in range(len(data.text))
                 for i, s in zip(top_img[t], top_sim[t]) if int(i) in row_of]
        for (row, t, s), itm in zip(pairs, self._itm(model, image_embeds, pairs, text_ids, text_mask, device)):
            entries_t2i.append((t, local_index[row], itm + s))

        scores_i2t = _scatter(dist.all_gather_object(entries_i2t), (len(data.image), len(data.text)))
        scores_t2i = _scatter(dist.all_gather_object(entries_t2i), (len(data.text), len(data.image)))
        metrics = recall_metrics(scores_i2t, scores_t2i, data.img2txt, data.txt2img)
        logger.info("%s: %s", split, metrics)
        return metrics

    def _text_features(self, model, texts: list[str], batch_size: int):
        """Every rank encodes a strided share of the texts; all ranks get all of them, in order."""
        mine = list(range(dist.get_rank(), len(texts), dist.get_world_size()))
        ids, masks, feats = [], [], []
        for start in range(0, len(mine), batch_size):
            chunk = [texts[i] for i in mine[start : start + batch_size]]
            chunk_ids, chunk_mask, chunk_feats = model.compute_text_features(chunk)
            ids.extend(chunk_ids.cpu())
            masks.extend(chunk_mask.cpu())
            feats.append(chunk_feats.float().cpu())
        local = [(i, a.tolist(), m.tolist()) for i, a, m in zip(mine, ids, masks)]
        gathered = sorted((row for part in dist.all_gather_object(local) for row in part), key=lambda r: r[0])
        width = max(len(r[1]) for r in gathered)
        text_ids = torch.tensor([r[1] + [0] * (width - len(r[1])) for r in gathered])
        text_mask = torch.tensor([r[2] + [0] * (width - len(r[2])) for r in gathered])
        text_feats = _gather_rows(mine, torch.cat(feats), len(texts))
        return text_ids, text_mask, text_feats

    def _itm(self, model, image_embeds, pairs, text_ids, text_mask, device) -> list[float]:
        scores: list[float] = []
        size = self.cfg.itm_batch_size
        for start in range(0, len(pairs), size):
            rows = torch.tensor([p[0] for p in pairs[start : start + size]])
            texts = torch.tensor([p[1] for p in pairs[start : start + size]])
            out = model.itm_score(image_embeds[rows.to(image_embeds.device)], text_ids[texts].to(device),
                                  text_mask[texts].to(device))
            scores.extend(out.float().cpu().tolist())
        return scores


def _gather_rows(index: list[int], rows: torch.Tensor, total: int) -> torch.Tensor:
    """Rows computed on each rank for ``index`` -> one tensor ordered by index (each exactly once)."""
    parts = dist.all_gather_object((index, rows.numpy()))
    all_index = [i for idx, _ in parts for i in idx]
    if sorted(all_index) != list(range(total)):
        raise RuntimeError(f"retrieval: ranks returned {len(all_index)} rows for {total} items")
    out = np.concatenate([r for _, r in parts])
    return torch.from_numpy(out[np.argsort(all_index)])


def _scatter(parts: list[list[tuple[int, int, float]]], shape: tuple[int, int]) -> np.ndarray:
    """Score matrix from (query, candidate, score) entries; unscored pairs get -100 (as LAVIS)."""
    scores = np.full(shape, -100.0)
    for part in parts:
        for q, c, s in part:
            scores[q, c] = s
    return scores
