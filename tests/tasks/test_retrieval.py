"""Retrieval metrics against hand-computed ranks, ITM re-ranking, and 2-process equality."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from lavis_lite import dist
from lavis_lite.config import RunConfig
from lavis_lite.runner.runner import build_eval_loaders
from lavis_lite.tasks.retrieval import RetrievalConfig, RetrievalTask, recall_metrics
from tests.runner.toys import free_port, run_in_process_group


def test_recall_metrics_hand_computed():
    img2txt = [[0, 1], [2], [3]]
    txt2img = [0, 0, 1, 2]
    scores_i2t = np.array([
        [0.5, 0.8, 0.9, 0.1],  # image 0: text 2 (wrong) first, text 1 (its own) second -> rank 1
        [0.1, 0.2, 0.9, 0.3],  # image 1: text 2 first -> rank 0
        [0.9, 0.8, 0.7, 0.1],  # image 2: text 3 last -> rank 3
    ])
    scores_t2i = np.array([
        [0.9, 0.1, 0.0],  # text 0 -> image 0 first: rank 0
        [0.1, 0.9, 0.0],  # text 1 -> image 0 second: rank 1
        [0.0, 0.1, 0.9],  # text 2 -> image 1 second: rank 1
        [0.0, 0.1, 0.9],  # text 3 -> image 2 first: rank 0
    ])
    m = recall_metrics(scores_i2t, scores_t2i, img2txt, txt2img)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100 and m["txt_r10"] == 100
    assert m["img_r1"] == pytest.approx(50.0) and m["img_r5"] == 100
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["agg_metrics"] == m["txt_r_mean"]
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


class FakeRetrievalData(Dataset):
    """6 images with 2 captions each; an image tensor just carries its index."""

    def __init__(self, num_images=6):
        self.image = [f"img{i}.jpg" for i in range(num_images)]
        self.text = [f"{i} caption{j}" for i in range(num_images) for j in range(2)]
        self.txt2img = [i for i in range(num_images) for _ in range(2)]
        self.img2txt = [[2 * i, 2 * i + 1] for i in range(num_images)]

    def __len__(self):
        return len(self.image)

    def __getitem__(self, index):
        return {"image": torch.tensor([float(index)]), "index": index}

    def collater(self, samples):
        return {"image": torch.stack([s["image"] for s in samples]), "index": [s["index"] for s in samples]}


class FakeModel(torch.nn.Module):
    """ITC ranks image i's captions second (behind image i+1's); ITM (when ``itm_weight`` > 0)
    knows the truth, so only re-ranking can fix the order."""

    def __init__(self, num_images, itm_weight):
        super().__init__()
        self.n, self.itm_weight = num_images, itm_weight
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def _onehot(self, idx):
        return torch.nn.functional.one_hot(torch.as_tensor(idx) % self.n, self.n).float()

    def compute_image_features(self, images):
        idx = images[:, 0].long()
        feats = 0.6 * self._onehot(idx + 1) + 0.4 * self._onehot(idx)  # prefers the next image's texts
        return idx[:, None, None].float().expand(-1, 3, 2), feats[:, None, :].expand(-1, 2, -1)

    def compute_text_features(self, texts):
        owner = [int(t.split()[0]) for t in texts]
        pad = [0] * (owner[0] % 2)  # batches padded to different lengths, as a tokenizer would
        ids = torch.tensor([[o + 10, 7] + pad for o in owner])
        return ids, (ids > 0).long(), self._onehot(owner)

    def itm_score(self, image_embeds, ids, mask):
        assert bool((mask[:, :2] == 1).all())
        return self.itm_weight * (image_embeds[:, 0, 0].long() == ids[:, 0] - 10).float()


def evaluate(itm_weight, k_test):
    data = FakeRetrievalData()
    cfg = RunConfig(batch_size_eval=4)
    loader = build_eval_loaders({"d": {"test": data}}, ["test"], cfg)["test"]
    task = RetrievalTask(RetrievalConfig(k_test=k_test, itm_batch_size=5))
    return task.evaluation(FakeModel(len(data), itm_weight), loader, "test")


def test_itc_alone_ranks_wrong_and_itm_reranking_fixes_it():
    itc_only = evaluate(itm_weight=0.0, k_test=4)
    assert itc_only["txt_r1"] == 0.0 and itc_only["img_r1"] == 0.0
    reranked = evaluate(itm_weight=5.0, k_test=4)
    assert reranked["txt_r1"] == 100.0 and reranked["img_r1"] == 100.0
    # with k_test=1 the true pair is never a candidate, so ITM cannot help
    assert evaluate(itm_weight=5.0, k_test=1)["txt_r1"] == 0.0


def _evaluate_in_group(out_dir):
    metrics = evaluate(itm_weight=5.0, k_test=2)
    if dist.is_main_process():
        (out_dir / "metrics.json").write_text(json.dumps(metrics))


def test_two_processes_equal_one(tmp_path):
    mp.spawn(run_in_process_group, args=(2, free_port(), _evaluate_in_group, (tmp_path,)), nprocs=2)
    assert json.loads((tmp_path / "metrics.json").read_text()) == evaluate(itm_weight=5.0, k_test=2)
