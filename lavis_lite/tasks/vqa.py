"""Visual question answering: answers from the model (generated, or ranked from an answer list),
written as the official result file (``question_id``, ``answer``) and scored with the official
VQAv2 accuracy (VQAv2, OK-VQA) or GQA's exact match."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lavis_lite import dist
from lavis_lite.registry import TASKS
from lavis_lite.tasks import vqa_eval
from lavis_lite.tasks.base import BaseTask

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VQAConfig:
    inference_method: Literal["generate", "rank"] = "generate"
    prompt: str = "Question: {} Short answer:"  # "{}" is replaced by the question
    num_beams: int = 5
    max_len: int = 10  # new tokens at most (LAVIS key name)
    min_len: int = 1
    length_penalty: float = 0.0  # 0: beam scores are not length-normalised, favouring short answers
    answer_list: Optional[str] = None  # json list of candidate answers, for inference_method=rank
    num_ans_candidates: int = 128  # rank: candidates kept after a first cheap pass (model-defined)
    metric: Literal["vqa", "gqa"] = "vqa"


@TASKS.register("vqa")
class VQATask(BaseTask):
    """The model provides ``predict_answers(batch, prompt, inference_method, num_beams,
    max_new_tokens, min_new_tokens, length_penalty, answer_list, num_ans_candidates) -> list[str]``.
    Eval data sets carry ``annotation_path`` (and ``question_path``) of the official files."""

    config_class = VQAConfig
    id_key = "question_id"

    @classmethod
    def metric_names(cls, cfg: VQAConfig) -> set[str]:
        return {"agg_metrics"} if cfg.metric == "gqa" else {"agg_metrics", "yes/no", "number", "other"}

    def __init__(self, cfg: VQAConfig | None = None):
        super().__init__(cfg or VQAConfig())
        self.answer_list = None
        if self.cfg.inference_method == "rank":
            if not self.cfg.answer_list or not Path(self.cfg.answer_list).is_file():
                raise FileNotFoundError(f"run.answer_list={self.cfg.answer_list!r}: inference_method=rank needs a "
                                        "json file listing the candidate answers")
            self.answer_list = json.loads(Path(self.cfg.answer_list).read_text())

    def valid_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        answers = model.predict_answers(
            batch, prompt=self.cfg.prompt, inference_method=self.cfg.inference_method,
            num_beams=self.cfg.num_beams, max_new_tokens=self.cfg.max_len, min_new_tokens=self.cfg.min_len,
            length_penalty=self.cfg.length_penalty, answer_list=self.answer_list,
            num_ans_candidates=self.cfg.num_ans_candidates,
        )
        return [{"question_id": q, "answer": a} for q, a in zip(batch["question_id"], answers)]

    def aggregate(self, results: list[dict[str, Any]], split: str, dataset: Any, output_dir: str | None) -> dict:
        results = sorted(results, key=lambda r: r["question_id"])
        if output_dir is not None and dist.is_main_process():
            path = Path(output_dir) / "result" / f"{split.replace('/', '_')}_vqa_result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, ensure_ascii=False))
            logger.info("answers written to %s", path)
        annotation_path = getattr(dataset, "annotation_path", None)
        if annotation_path is None:
            raise ValueError(f"{split}: the data set has no answer annotations (build_info.vqa_annotations)")
        annotations = json.loads(Path(annotation_path).read_text())
        if self.cfg.metric == "gqa":
            gts = {a["question_id"]: a["answer"] for a in annotations}
            return {"agg_metrics": vqa_eval.gqa_accuracy([r["answer"] for r in results],
                                                         [gts[r["question_id"]] for r in results])}
        question_path = getattr(dataset, "question_path", None)
        questions = json.loads(Path(question_path).read_text()) if question_path else None
        return vqa_eval.evaluate_vqa(questions, annotations, results)
