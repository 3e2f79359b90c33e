"""Official VQAv2 (or OK-VQA) questions + annotations -> LAVIS's VQA json.

Sources: VQAv2 from https://visualqa.org/download.html (``v2_Questions_{Train,Val,Test}_mscoco.zip``,
``v2_Annotations_{Train,Val}_mscoco.zip``); OK-VQA from https://okvqa.allenai.org/download.html
(``OpenEnded_mscoco_{train,val}2014_questions.json``, ``mscoco_{train,val}2014_annotations.json``,
the same format). Images: COCO 2014/2015 (https://cocodataset.org/#download).

    python tools/convert_vqav2.py --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --output /data/coco/annotations/vqa_train.json
    python tools/convert_vqav2.py --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --output /data/coco/annotations/vqa_val.json \\
        --answer-list /data/coco/annotations/answer_list.json
    cp /data/coco/annotations/vqa_val.json /data/coco/annotations/vqa_val_eval.json
    python tools/convert_vqav2.py --questions v2_OpenEnded_mscoco_test2015_questions.json \\
        --output /data/coco/annotations/vqa_test.json
    # OK-VQA: the same with its files, --dataset okvqa, --output okvqa_train.json / okvqa_val_eval.json

Each record: ``{"question_id", "question", "image": "<folder>/COCO_<folder>_<012d id>.jpg",
"dataset", "answer": [the 10 human answers]}`` (no "answer" without --annotations), image paths
relative to the COCO image root; the folder comes from the questions' ``data_subtype``
(test-dev2015 questions use the test2015 images).
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

_IMAGE_FOLDER = {"test-dev2015": "test2015"}


def convert(questions: dict, annotations: dict | None = None, dataset: str = "vqa") -> list[dict]:
    folder = _IMAGE_FOLDER.get(questions["data_subtype"], questions["data_subtype"])
    answers = {}
    if annotations is not None:
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
    records = []
    for q in questions["questions"]:
        record = {"question_id": q["question_id"], "question": q["question"],
                  "image": f"{folder}/COCO_{folder}_{q['image_id']:012d}.jpg", "dataset": dataset}
        if annotations is not None:
            if q["question_id"] not in answers:
                raise ValueError(f"question {q['question_id']} has no annotation; are the questions and "
                                 "annotations files of the same split?")
            record["answer"] = answers[q["question_id"]]
        records.append(record)
    return records


def answer_list(annotations: dict, size: int) -> list[str]:
    """The ``size`` most frequent ``multiple_choice_answer``s, for ``run.inference_method=rank``."""
    counts = collections.Counter(a["multiple_choice_answer"] for a in annotations["annotations"])
    return [answer for answer, _ in counts.most_common(size)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="official questions json")
    parser.add_argument("--annotations", help="official annotations json of the same split (none for test)")
    parser.add_argument("--output", required=True, help="LAVIS-format json to write")
    parser.add_argument("--dataset", default="vqa", help='value of each record\'s "dataset" (vqa, okvqa)')
    parser.add_argument("--answer-list", help="also write the most frequent answers here (needs --annotations)")
    parser.add_argument("--answer-list-size", type=int, default=3128, help="length of --answer-list (LAVIS: 3128)")
    args = parser.parse_args(argv)
    questions = json.loads(Path(args.questions).read_text(encoding="utf-8"))
    if not isinstance(questions, dict) or "questions" not in questions or "data_subtype" not in questions:
        raise SystemExit(f"{args.questions}: not an official VQA questions file (needs 'questions', 'data_subtype')")
    annotations = json.loads(Path(args.annotations).read_text(encoding="utf-8")) if args.annotations else None
    if args.answer_list and annotations is None:
        raise SystemExit("--answer-list needs --annotations")
    records = convert(questions, annotations, args.dataset)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    print(f"{args.output}: {len(records)} questions")
    if args.answer_list:
        answers = answer_list(annotations, args.answer_list_size)
        Path(args.answer_list).write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
        print(f"{args.answer_list}: {len(answers)} answers")


if __name__ == "__main__":
    main()
