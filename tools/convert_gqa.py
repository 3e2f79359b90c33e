"""Official GQA questions (a dict keyed by question id) -> LAVIS's GQA list format.

Source: ``questions1.2.zip`` from https://cs.stanford.edu/people/dorarad/gqa/download.html
(``{train,val,testdev,test}_balanced_questions.json``); images: ``images.zip`` from the same page.

    python tools/convert_gqa.py --questions questions1.2/testdev_balanced_questions.json \\
        --output /data/gqa/annotations/testdev_balanced_questions.json

(and the same for train and val). Each record: ``{"image": "<imageId>.jpg", "question",
"question_id": <the official id, a string>, "answer", "fullAnswer"}``; the test split has no
answers, so its records have none.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def convert(questions: dict) -> list[dict]:
    records = []
    for question_id, q in questions.items():
        record = {"image": f"{q['imageId']}.jpg", "question": q["question"], "question_id": question_id}
        for key in ("answer", "fullAnswer"):
            if key in q:
                record[key] = q[key]
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="official *_balanced_questions.json")
    parser.add_argument("--output", required=True, help="LAVIS-format json to write (not the input file)")
    args = parser.parse_args(argv)
    if Path(args.output).resolve() == Path(args.questions).resolve():
        raise SystemExit("--output is the input file; write to another folder")
    questions = json.loads(Path(args.questions).read_text(encoding="utf-8"))
    if not isinstance(questions, dict):
        raise SystemExit(f"{args.questions} holds a {type(questions).__name__}; expected the official dict "
                         "(question id -> question)")
    records = convert(questions)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    print(f"{args.output}: {len(records)} questions")


if __name__ == "__main__":
    main()
