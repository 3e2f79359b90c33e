"""The launchers end to end on CPU, as a user runs them (shortened epochs, default data): the
learning demo (tiny LLM warm-up, stage 1, stage 2, zero-shot VQA next to its baselines, Chinese
stage 2, captions in both languages next to the LLM alone), then the bilingual stage 2 and the VQA
launcher on 2 processes from the demo's checkpoints."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lavis_lite.demo import read_log
from lavis_lite.tasks import vqa_eval

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("scripts")


def mostly_chinese(text):
    """More than half of the non-space characters are CJK ideographs."""
    chars = [c for c in text if not c.isspace()]
    return sum("\u4e00" <= c <= "\u9fff" for c in chars) > len(chars) / 2


def env(workdir, nproc=1):
    return {**os.environ, "LAVIS_LITE_CACHE": str(workdir / "cache"), "NPROC": str(nproc),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(script, workdir, *args, nproc=1):
    result = subprocess.run(["bash", str(ROOT / script), *args], env=env(workdir, nproc), cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo(workdir):
    out = workdir / "demo"
    stdout = run("run_scripts/blip2/demo.sh", workdir, "--output-dir", str(out), "--stage1-epochs", "3",
                 "--stage2-epochs", "1", "--options", "run.progress_bar=false")
    return out, stdout


def test_demo_trains_both_stages_and_scores_vqa_next_to_baselines(demo, workdir):
    out, stdout = demo
    log = read_log(out / "stage1" / "log.jsonl")
    train = [r for r in log if "train_loss" in r]
    for key in ("train_loss_itc", "train_loss_itm", "train_loss_lm"):
        assert train[-1][key] < train[0][key], key
    val = [r for r in log if "val_txt_r1" in r][-1]
    chance = 100 * 5 / 1000  # an image's 5 captions among the 1000 val captions
    assert val["val_txt_r1"] > 5 * chance and val["val_img_r1"] > 5 * 100 / 200

    log = read_log(out / "stage2" / "log.jsonl")
    train = [r for r in log if "train_loss" in r]
    # stage 2 learns to caption (the first record averages 10 iterations; 0.95 -> 0.81 measured on one
    # stage-1 draw, 1.22 -> 0.72 in the full demo; stage 1 differs a little with the thread count)
    assert train[-1]["train_loss"] < 0.9 * train[0]["train_loss"]
    samples = [r for r in log if "samples" in r]  # run.sample_captions_every: 50 in the project
    assert [r["iteration"] for r in samples] == [50, 100] and len(samples[0]["samples"]) == 4
    cider = [r["val_CIDEr"] for r in log if "val_CIDEr" in r][-1]
    assert math.isfinite(cider) and cider > 0

    # zero-shot VQA on the held-out test split: every question answered once, official metrics
    annotations = workdir / "cache/shapes/annotations"
    questions = json.loads((annotations / "vqa_test_questions.json").read_text())["questions"]
    for name in ("vqa", "vqa_no_image"):
        results = json.loads((out / name / "result" / "test_vqa_result.json").read_text())
        assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)
    summary = json.loads((out / "summary.json").read_text())
    model, prior, no_image = summary["vqa"].values()
    assert set(model) == set(prior) == set(no_image) == {"agg_metrics", "yes/no", "number", "other"}
    assert f"{model['agg_metrics']:.2f}" in stdout and f"{prior['agg_metrics']:.2f}" in stdout

    # the prior baseline, recomputed here: the majority training answer of each question type
    train_anns = json.loads((annotations / "vqa_train_annotations.json").read_text())["annotations"]
    test_anns = json.loads((annotations / "vqa_test_annotations.json").read_text())["annotations"]
    answers_by_type = {}
    for ann in train_anns:
        answers_by_type.setdefault(ann["question_type"], []).append(ann["multiple_choice_answer"])
    majority = {t: max(set(a), key=a.count) for t, a in answers_by_type.items()}
    scores = [vqa_eval.score_question(majority[a["question_type"]], [x["answer"] for x in a["answers"]])
              for a in test_anns]
    assert prior["agg_metrics"] == pytest.approx(100 * sum(scores) / len(scores), abs=0.01)

    # the LLM alone answers from the prompt: it cannot tell images apart, so one answer per question text
    no_image_answers = json.loads((out / "vqa_no_image" / "result" / "test_vqa_result.json").read_text())
    text_of = {q["question_id"]: q["question"] for q in questions}
    answers_per_text = {}
    for r in no_image_answers:
        answers_per_text.setdefault(text_of[r["question_id"]], set()).add(r["answer"])
    assert all(len(a) == 1 for a in answers_per_text.values())

    # learning: with the image the answers beat both baselines, even after this shortened training
    # (the full demo's margin over the prior is in the README)
    assert model["agg_metrics"] > max(prior["agg_metrics"], no_image["agg_metrics"]) + 3

    with Image.open(out / "loss_curves.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100


def test_demo_captions_in_both_languages_next_to_the_llm_alone(demo, workdir):
    out, stdout = demo
    summary = json.loads((out / "summary.json").read_text())
    for language, metric in (("en", "CIDEr"), ("zh", "CIDEr_char")):
        scores = summary["captions"][language]["scores"]
        model, alone = scores["BLIP-2 (image + LLM)"], scores["LLM alone, no image"]
        assert model[metric] > alone[metric] + 0.3, (language, scores)  # the image makes the captions
        assert f"{model[metric]:.2f}" in stdout and f"{alone[metric]:.2f}" in stdout
        samples = summary["captions"][language]["samples"]
        assert len(samples) == 3 and all(s["model"] and s["reference"] for s in samples)
    # the LLM alone writes one caption whatever the image
    alone = json.loads((out / "caption_zh_no_image" / "result" / "test_caption_result.json").read_text())
    assert len({r["caption"] for r in alone}) == 1
    # the Chinese model writes Chinese, and is scored under both tokenisations
    chinese = json.loads((out / "caption_zh" / "result" / "test_caption_result.json").read_text())
    assert len(chinese) == 200 and sum(map(mostly_chinese, (r["caption"] for r in chinese))) >= 0.95 * 200
    record = [r for r in read_log(out / "caption_zh" / "log.jsonl") if "test_CIDEr_char" in r][-1]
    assert math.isfinite(record["test_CIDEr_jieba"]) and record["test_CIDEr_jieba"] != record["test_CIDEr_char"]
    english = json.loads((out / "caption_en" / "result" / "test_caption_result.json").read_text())
    assert not any(map(mostly_chinese, (r["caption"] for r in english)))


def test_bilingual_stage2_captions_in_the_language_of_each_prompt(demo, workdir):
    """One model, both data sets: the English val images captioned after "a photo of" come out in
    English, the Chinese val images (the same kind of images) after "图片描述：" in Chinese."""
    out, _ = demo
    bilingual = workdir / "output" / "stage2_bilingual"
    run("run_scripts/blip2/train_stage2_bilingual_shapes.sh", workdir, "run.progress_bar=false", "run.max_epoch=1",
        f"run.output_dir={bilingual}", f"model.pretrained={out / 'stage1' / 'checkpoint_best.pth'}")
    english = json.loads((bilingual / "result" / "shapes_caption_val_caption_result.json").read_text())
    chinese = json.loads((bilingual / "result" / "shapes_caption_cn_val_caption_result.json").read_text())
    assert len(english) == len(chinese) == 200
    assert sum(map(mostly_chinese, (r["caption"] for r in chinese))) >= 0.95 * 200
    assert not any(map(mostly_chinese, (r["caption"] for r in english)))
    log = read_log(bilingual / "log.jsonl")  # each split's metrics in a record of its own
    for key in ("shapes_caption_cn/val_CIDEr_char", "shapes_caption/val_CIDEr"):
        assert [r[key] for r in log if key in r][-1] > 0.3, key


def test_vqa_launcher_on_two_processes_matches_one(demo, workdir):
    """The demo's evaluation again on 2 gloo processes: each question exactly once. Batches are
    composed differently there, and left padding changes float rounding (~1e-6 in the logits), which
    can flip a beam between near-tied answers of this barely trained model: allow a few such flips.
    (With a deterministic model the numbers are equal: tests/tasks/test_vqa.py.)"""
    out, _ = demo
    vqa2 = workdir / "output" / "vqa2"
    run("run_scripts/blip2/eval/vqa_shapes_zeroshot.sh", workdir, "run.progress_bar=false",
        f"run.output_dir={vqa2}", "run.test_splits=[test]",
        f"model.pretrained={out / 'stage1' / 'checkpoint_best.pth'}",
        f"model.finetuned={out / 'stage2' / 'checkpoint_best.pth'}", nproc=2)
    results = json.loads((out / "vqa" / "result" / "test_vqa_result.json").read_text())
    results2 = json.loads((vqa2 / "result" / "test_vqa_result.json").read_text())
    assert [r["question_id"] for r in results2] == [r["question_id"] for r in results]
    same = sum(a["answer"] == b["answer"] for a, b in zip(results, results2))
    assert same >= 0.98 * len(results)
    metrics = [r for r in read_log(out / "vqa" / "log.jsonl") if "test_agg_metrics" in r][-1]
    metrics2 = [r for r in read_log(vqa2 / "log.jsonl") if "test_agg_metrics" in r][-1]
    assert abs(metrics2["test_agg_metrics"] - metrics["test_agg_metrics"]) <= 100 * (len(results) - same) / len(results)


def test_load_model_rebuilds_the_demo_stage1_model(demo, workdir):
    """``load_model`` takes the stage-1 checkpoint as trained: its stored config gives the shapes
    vocabulary (the tiny model type's default tokenizer is another), its weights load over it."""
    import torch

    import lavis_lite
    from lavis_lite.data.processors import build_processor

    out, _ = demo
    model = lavis_lite.load_model("blip2_feature_extractor", "tiny", is_eval=True,
                                  checkpoint=out / "stage1" / "checkpoint_best.pth")
    assert Path(model.cfg.tokenizer_path) == workdir / "cache" / "shapes" / "bert_vocab"
    processor = build_processor({"name": "blip_image_eval", "image_size": model.cfg.img_size})
    with Image.open(sorted((workdir / "cache" / "shapes" / "images").glob("**/*.jpg"))[0]) as image:
        batch = {"image": processor(image.convert("RGB"))[None], "text_input": ["a red circle"]}
    queries, width = model.cfg.qformer.num_query_token, model.cfg.qformer.hidden_size
    features = model.extract_features(batch, mode="image")
    assert features.image_embeds.shape == (1, queries, width)
    assert features.image_embeds_proj.shape == (1, queries, model.cfg.embed_dim)
    assert torch.isfinite(features.image_embeds).all() and torch.isfinite(features.image_embeds_proj).all()
    assert model.extract_features(batch, mode="multimodal").multimodal_embeds.shape == (1, queries, width)
