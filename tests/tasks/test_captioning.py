import json
import math
from pathlib import Path

import pytest
import torch

from lavis_lite.config import ConfigError, load_config
from lavis_lite.runner.runner import validate
from lavis_lite.tasks.captioning import CaptionConfig, CaptionTask, score_captions, tokenize_chinese

CAPTION_CN = Path(__file__).resolve().parents[2] / "projects/blip2/train/caption_cn_stage2_shapes.yaml"


def test_chinese_tokenization_is_character_level():
    assert tokenize_chinese("红色的圆形。") == "红 色 的 圆 形"
    assert tokenize_chinese(" 3个red圆形，在左边！") == "3 个 red 圆 形 在 左 边"


def test_chinese_bleu_hand_computed():
    # one image, one reference of 5 characters, a prediction of 4 all found in it
    m = score_captions({1: ["红色的圆形"]}, {1: "红色圆形"}, language="zh")
    brevity = math.exp(1 - 5 / 4)  # BLEU's brevity penalty for c=4 < r=5
    assert m["Bleu_1_char"] == pytest.approx(1.0 * brevity, rel=1e-6)
    # bigrams: 红色 色圆 圆形 -> 2 of 3 in the reference (色圆 is not); BLEU-2 = BP * sqrt(p1 * p2)
    assert m["Bleu_2_char"] == pytest.approx(brevity * math.sqrt(1.0 * 2 / 3), rel=1e-6)
    # jieba words: 红色 圆形 vs 红色 的 圆形: both words found, c=2 < r=3
    assert m["Bleu_1_jieba"] == pytest.approx(math.exp(1 - 3 / 2), rel=1e-6)


def test_english_matches_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {"a": ["A red circle, left of a square.", "a red circle"], "b": ["two blue squares", "blue squares"]}
    res = {"a": "a red circle left of a blue square", "b": "blue squares"}
    ours = score_captions(gts, res)
    # the same computation spelled out: lowercase, punctuation removed (what PTB does to these)
    tok_gts = {"a": ["a red circle left of a square", "a red circle"], "b": ["two blue squares", "blue squares"]}
    tok_res = {"a": ["a red circle left of a blue square"], "b": ["blue squares"]}
    assert ours["Bleu_4"] == pytest.approx(Bleu(4).compute_score(tok_gts, tok_res, verbose=0)[0][3])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(tok_gts, tok_res)[0])
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(tok_gts, tok_res)[0])
    assert set(ours) == CaptionTask.metric_names(CaptionConfig()) - {"agg_metrics"}
    with pytest.raises(ValueError, match="no generated caption"):
        score_captions(gts, {"a": "x"})


class EchoModel(torch.nn.Module):
    """Captions each image with a fixed string chosen by image id."""

    def __init__(self, captions):
        super().__init__()
        self.captions = captions
        self.calls = []

    def generate(self, batch, **kwargs):
        self.calls.append((batch.get("prompt"), kwargs))
        return [self.captions[i] for i in batch["image_id"]]


def test_task_writes_results_and_scores(tmp_path):
    gt = {"images": [{"id": "s_1"}, {"id": "s_2"}],
          "annotations": [{"image_id": "s_1", "caption": "a red circle", "id": 0},
                          {"image_id": "s_2", "caption": "a blue square", "id": 1}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dataset = type("D", (), {"gt_path": tmp_path / "gt.json"})()
    task = CaptionTask(CaptionConfig(prompt="a photo of", num_beams=3, max_len=12, min_len=2))
    model = EchoModel({"s_1": "a red circle", "s_2": "a blue square"})
    batches = [{"image": torch.zeros(2, 3, 4, 4), "image_id": ["s_1", "s_2"]}]
    loader = type("L", (), {"__iter__": lambda self: iter(batches), "dataset": dataset})()
    metrics = task.evaluation(model, loader, "val", str(tmp_path))
    assert model.calls[0] == (["a photo of"] * 2, dict(num_beams=3, max_new_tokens=12, min_new_tokens=2,
                                                       length_penalty=1.0))
    assert metrics["Bleu_1"] == pytest.approx(1.0)  # every predicted word is in the reference
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    written = json.loads((tmp_path / "result" / "val_caption_result.json").read_text())
    assert written == [{"image_id": "s_1", "caption": "a red circle"}, {"image_id": "s_2", "caption": "a blue square"}]


def test_chinese_task_reports_both_tokenizations_and_aggregates_the_character_level(tmp_path):
    gt = {"images": [{"id": 1}, {"id": 2}],
          "annotations": [{"image_id": 1, "caption": "红色的圆形在左边。"}, {"image_id": 2, "caption": "两个蓝色的正方形"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt, ensure_ascii=False))
    dataset = type("D", (), {"gt_path": tmp_path / "gt.json"})()
    cfg = CaptionConfig(language="zh")
    task = CaptionTask(cfg)
    metrics = task.aggregate([{"image_id": 1, "caption": "红色的圆形"}, {"image_id": 2, "caption": "两个蓝色的方形"}],
                             "val", dataset, None)
    assert set(metrics) == CaptionTask.metric_names(cfg)
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr_char"] + metrics["Bleu_4_char"])
    assert metrics["CIDEr_char"] != pytest.approx(metrics["CIDEr_jieba"])


def test_metric_names_follow_the_language():
    zh = CaptionTask.metric_names(CaptionConfig(language="zh"))
    assert {"CIDEr_char", "Bleu_4_char", "ROUGE_L_char", "CIDEr_jieba", "Bleu_4_jieba", "ROUGE_L_jieba",
            "Bleu_1_jieba", "agg_metrics"} <= zh and "CIDEr" not in zh
    en = CaptionTask.metric_names(CaptionConfig(language="en"))
    assert en == {"CIDEr", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "agg_metrics"}


def test_chinese_best_metric_is_checked_before_training():
    cfg, sources = load_config(CAPTION_CN, ["run.best_metric=CIDEr_jieba"])
    validate(cfg, sources)
    cfg, sources = load_config(CAPTION_CN, ["run.best_metric=CIDEr"])
    with pytest.raises(ConfigError, match=r"run\.best_metric='CIDEr' \(set in --options\) is not a metric of task "
                                          r"'captioning'.* did you mean CIDEr_char"):
        validate(cfg, sources)


def test_a_data_sets_language_and_prompt_win_over_the_runs(tmp_path):
    """``datasets.<name>.language`` scores that data set in its language under run.language=en, and
    ``datasets.<name>.prompt`` reaches the model with each of its samples (mixed with prompt-less ones)."""
    from types import SimpleNamespace

    from lavis_lite.data.datasets import CaptionDataset
    from lavis_lite.models.blip2_llm import Blip2LLM

    gt = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "红色的圆形在左边。"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt, ensure_ascii=False))
    chinese = type("D", (), {"gt_path": tmp_path / "gt.json", "language": "zh"})()
    metrics = CaptionTask(CaptionConfig(language="en")).aggregate([{"image_id": 1, "caption": "红色的圆形"}], "val",
                                                                   chinese, None)
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr_char"] + metrics["Bleu_4_char"])

    samples = [{"image": torch.zeros(3, 2, 2), "text_input": t, "image_id": i, "bad_images": 0} for i, t in
               enumerate(["一个圆形", "a circle"])]
    batch = CaptionDataset.collater([{**samples[0], "prompt": "这张图片里有"}, samples[1]])
    assert batch["prompt"] == ["这张图片里有", None]
    assert "prompt" not in CaptionDataset.collater(samples)
    model = SimpleNamespace(cfg=SimpleNamespace(prompt="a photo of"))
    assert Blip2LLM.prompts(model, batch, 2) == ["这张图片里有", "a photo of"]
    assert Blip2LLM.prompts(model, CaptionDataset.collater(samples), 2) == ["a photo of"] * 2
