"""The VQA task on the shapes VQA files: official result file, same numbers as the standalone
scorer, and 2 gloo processes give each question once and the same metrics."""
import json
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

from lavis_lite import dist
from lavis_lite.config import RunConfig
from lavis_lite.data.builders import build_datasets
from lavis_lite.runner.runner import build_eval_loaders
from lavis_lite.tasks import vqa_eval
from lavis_lite.tasks.vqa import VQAConfig, VQATask
from tests.runner.toys import free_port, run_in_process_group


class NoisyOracle(torch.nn.Module):
    """Answers with the most common human answer, except every third question gets "blue"."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.kwargs = None

    def predict_answers(self, batch, **kwargs):
        self.kwargs = kwargs
        return ["blue" if q % 3 == 0 else self.answers[q] for q in batch["question_id"]]


def val_loader(shapes_root):
    node = {"shapes_vqa": {"build_info": {"storage": str(shapes_root)}}}
    from omegaconf import OmegaConf

    defaults = OmegaConf.load("configs/datasets/shapes_vqa.yaml")
    datasets = build_datasets(OmegaConf.merge({"shapes_vqa": defaults}, node))
    return build_eval_loaders(datasets, ["val"], RunConfig(batch_size_eval=4))["val"]


def oracle(shapes_root):
    records = json.loads((shapes_root / "annotations" / "vqa_val.json").read_text())
    return NoisyOracle({r["question_id"]: Counter(r["answer"]).most_common(1)[0][0] for r in records})


def test_task_writes_official_results_and_matches_scorer(shapes_root, tmp_path):
    loader = val_loader(shapes_root)
    model = oracle(shapes_root)
    metrics = VQATask(VQAConfig(num_beams=3)).evaluation(model, loader, "val", str(tmp_path))
    assert model.kwargs["prompt"] == "Question: {} Short answer:" and model.kwargs["num_beams"] == 3
    result_file = tmp_path / "result" / "val_vqa_result.json"
    results = json.loads(result_file.read_text())
    assert all(set(r) == {"question_id", "answer"} for r in results)
    assert len(results) == len(loader.dataset)
    standalone = vqa_eval.load_and_evaluate(
        shapes_root / "annotations/vqa_val_questions.json", shapes_root / "annotations/vqa_val_annotations.json",
        result_file)
    assert metrics == standalone
    assert set(metrics) >= {"agg_metrics", "yes/no", "number", "other"}
    assert 20 < metrics["agg_metrics"] < 95  # the oracle is right on two questions of three


def _evaluate_in_group(shapes_root, out_dir):
    metrics = VQATask().evaluation(oracle(shapes_root), val_loader(shapes_root), "val", str(out_dir))
    if dist.is_main_process():
        (out_dir / "metrics.json").write_text(json.dumps(metrics))


def test_two_processes_give_each_question_once(shapes_root, tmp_path):
    mp.spawn(run_in_process_group, args=(2, free_port(), _evaluate_in_group, (shapes_root, tmp_path / "two")),
             nprocs=2)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    ids = [r["question_id"] for r in json.loads((tmp_path / "two/result/val_vqa_result.json").read_text())]
    questions = json.loads((shapes_root / "annotations/vqa_val_questions.json").read_text())["questions"]
    assert sorted(ids) == sorted(q["question_id"] for q in questions)
    one = VQATask().evaluation(oracle(shapes_root), val_loader(shapes_root), "val", str(tmp_path / "one"))
    assert two == one


def test_rank_needs_an_answer_list():
    with pytest.raises(FileNotFoundError, match="run.answer_list"):
        VQATask(VQAConfig(inference_method="rank"))
