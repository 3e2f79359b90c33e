import json
import math

import pytest
import torch

from lavis_lite.tasks.captioning import CaptionConfig, CaptionTask, score_captions, tokenize_chinese


def test_chinese_tokenization_is_character_level():
    assert tokenize_chinese("红色的圆形。") == "红 色 的 圆 形"
    assert tokenize_chinese(" 3个red圆形，在左边！") == "3 个 red 圆 形 在 左 边"


def test_chinese_bleu_hand_computed():
    # one image, one reference of 5 characters, a prediction of 4 all found in it
    m = score_captions({1: ["红色的圆形"]}, {1: "红色圆形"}, language="zh")
    brevity = math.exp(1 - 5 / 4)  # BLEU's brevity penalty for c=4 < r=5
    assert m["Bleu_1"] == pytest.approx(1.0 * brevity, rel=1e-6)
    # bigrams: 红色 色圆 圆形 -> 2 of 3 in the reference (色圆 is not); BLEU-2 = BP * sqrt(p1 * p2)
    assert m["Bleu_2"] == pytest.approx(brevity * math.sqrt(1.0 * 2 / 3), rel=1e-6)


def test_english_matches_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {"a": ["A red circle, left of a square.", "a red circle"], "b": ["two blue squares", "blue squares"]}
    res = {"a": "a red circle left of a blue square", "b": "blue squares"}
    ours = score_captions(gts, res)
    # the same computation spelled out: lowercase, punctuation removed (what PTB does to these)
    tok_gts = {"a": ["a red circle left of a square", "a red circle"], "b": ["two blue squares", "blue squares"]}
    tok_res = {"a": ["a red circle left of a blue square"], "b": ["blue squares"]}
    assert ours["Bleu_4"] == pytest.approx(Bleu(4).compute_score(tok_gts, tok_res, verbose=0)[0][3])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(tok_gts, tok_res)[0])
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
