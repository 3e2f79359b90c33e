"""VQAv2 accuracy computed exactly as the official evaluation code does, plus LAVIS's GQA exact match.

Every published VQAv2 number (BLIP-2's included) comes from the official scorer:
GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (Python 3 version) with
``PythonHelperTools/vqaTools/vqa.py``; LAVIS ships the same scoring code in ``lavis/common/vqa_tools/``.
This module re-implements that algorithm as pure functions and keeps its behaviour on purpose,
quirks included, so numbers are identical on any input:

1. The prediction is cleaned (``\\n``/``\\t`` -> space, strip), then punctuation-processed, then
   digit/article-processed (:func:`normalize_answer`).
2. Ground-truth answers get punctuation processing ONLY, and only when the question's raw human
   answers hold more than one distinct string (:func:`process_gt_answers`). So unanimous answers are
   compared raw (``"Two"`` x10 can never be matched: predictions are lower-cased), and number words or
   articles in human answers are never rewritten (``"two"`` in the gt does not match a prediction
   ``"two"``, which became ``"2"``).
3. Punctuation: each mark of ``PUNCTUATION`` is deleted when it touches a space anywhere in the
   *original* text (``"x, y"``), or when the original text holds a digit-comma-digit anywhere
   (``"2,000"`` -> ``"2000"``; that also deletes every other mark), and is replaced by a space
   otherwise (``"t-shirt"`` -> ``"t shirt"``). Apostrophes, colons and periods are not in the list.
4. Periods: ``PERIOD_STRIP`` deletes a period not followed by a digit (``"2.5"`` stays). Its leading
   ``(?!<=\\d)`` is a lookahead, not the intended lookbehind, so it has no effect; and the official
   call passes ``re.UNICODE`` (= 32) positionally as ``count``, so at most 32 periods are deleted.
5. Digit/article step: lower-case, whitespace split, number words -> digits (``NUMBER_WORDS``,
   ``"none"`` -> ``"0"``), drop ``ARTICLES``, then map each word through ``CONTRACTIONS``. Keys of that
   table with capitals (``"Im"``) can never match, and ``"somebody'd"`` maps to ``"somebodyd"``.
6. Per question, each of the N human answers is left out in turn and the prediction scores
   ``min(1, #matching others / 3)``; the question's accuracy is the mean. "Left out" means "not equal
   as a dict", so answer dicts without a distinguishing ``answer_id`` are left out together.
7. Overall / per-question-type / per-answer-type accuracies are ``round(100 * sum / count, n)`` (n=2)
   over questions in annotation order, with Python 3's ``round`` and ``sum``. Answer types absent from
   the data are absent from the report.

Deliberate differences: inputs are never mutated (the official code overwrites the ground-truth
answers in place), duplicate question ids (in results or annotations) raise instead of silently
using the last one, and malformed entries raise ``ValueError`` naming the question.

GQA: LAVIS scores GQA as exact match between ``process_digit_article(process_punctuation(pred))`` and
the raw ground-truth answer, ``sum(hits) / len(hits) * 100`` unrounded (:func:`gqa_accuracy`).

Usage:
    python -m lavis_lite.tasks.vqa_eval --questions Q.json --annotations A.json --results R.json \\
        [--output metrics.json] [--decimals 2] [--detailed]
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Normalisation tables: data from the official vqaEval.py, kept identical (order included).
# ---------------------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, verbatim (see quirk 4)
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = re.UNICODE.value  # 32: the official code passes re.UNICODE as sub()'s count


# ---------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------

def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out ``PUNCTUATION``, strip periods."""
    has_digit_comma = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # The test looks at the original text, not at what earlier marks left behind.
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Normalise a predicted answer as the official scorer does before comparing it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def process_gt_answers(answers: Sequence[str]) -> list[str]:
    """Human answers as the official scorer compares them: punctuation-processed only, and only when
    they are not all the same string."""
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------

def _leave_one_out_accuracy(pred: str, answers: Sequence[Mapping[str, Any]]) -> float:
    """Mean over held-out answers of ``min(1, #other answers equal to pred / 3)``; ``pred`` and the
    answers already normalised. "Other" means "not equal as a dict", as in the official code."""
    matching = [a for a in answers if a["answer"] == pred]
    accs = []
    for held in answers:
        if held["answer"] == pred:
            n_match = sum(1 for a in matching if a != held)
        else:
            n_match = len(matching)
        accs.append(min(1, float(n_match) / 3))
    return float(sum(accs)) / len(accs)


def _normalized_gt(answers: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    texts = process_gt_answers([a["answer"] for a in answers])
    return [dict(a, answer=t) for a, t in zip(answers, texts)]


def score_question(pred: str, human_answers: Sequence[str] | Sequence[Mapping[str, Any]]) -> float:
    """VQA accuracy (0..1) of one raw prediction against the raw human answers of one question.

    Args:
        human_answers: strings (each one a distinct annotator) or the annotation's ``answers`` dicts
            (``{"answer", "answer_id", ...}``; dicts that compare equal are left out together).
    """
    if len(human_answers) == 0:
        raise ValueError("score_question needs at least one human answer, got none")
    if all(isinstance(a, str) for a in human_answers):
        answers = [{"answer": a, "answer_id": i} for i, a in enumerate(human_answers)]
    elif all(isinstance(a, Mapping) and isinstance(a.get("answer"), str) for a in human_answers):
        answers = list(human_answers)
    else:
        raise ValueError(f"human_answers must be all strings or all {{'answer': str, ...}} dicts, "
                         f"got {human_answers!r}")
    return _leave_one_out_accuracy(normalize_answer(pred), _normalized_gt(answers))


@dataclass
class VQAAccuracy:
    """The official report: percentages rounded to ``n`` decimals (``VQAEval.accuracy`` / ``evalQA``)."""

    overall: float
    per_question_type: dict[str, float]
    per_answer_type: dict[str, float]
    per_question: dict[Any, float]

    def to_metrics(self) -> dict[str, float]:
        """LAVIS's metrics dict: ``agg_metrics`` is the overall accuracy, then one key per answer type."""
        return {"agg_metrics": self.overall, **self.per_answer_type}


def _as_list(data: Any, key: str, what: str) -> list:
    if isinstance(data, Mapping):
        if key not in data:
            raise ValueError(f"{what} has no {key!r} list (keys: {sorted(data)[:10]}); pass the official "
                             f"VQA {what} JSON or the list under {key!r}")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{what} must be a list of entries (or a dict holding {key!r}), got {type(data).__name__}")
    return data


def _index_unique(entries: list, what: str) -> dict[Any, Mapping[str, Any]]:
    index: dict[Any, Mapping[str, Any]] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or "question_id" not in e:
            raise ValueError(f"{what} entry {i} has no 'question_id': {e!r}")
        qid = e["question_id"]
        if qid in index:
            raise ValueError(f"question_id {qid!r} appears more than once in the {what}; each question must "
                             f"appear exactly once")
        index[qid] = e
    return index


def _check_results_cover(ann_ids: Sequence[Any], res_ids: Sequence[Any]) -> None:
    missing = [q for q in ann_ids if q not in res_ids]
    extra = [q for q in res_ids if q not in ann_ids]
    if missing or extra:
        hint = ""
        if ann_ids and res_ids and type(next(iter(ann_ids))) is not type(next(iter(res_ids))):
            hint = " (annotation and result question_ids have different types: int vs str?)"
        raise ValueError(
            f"results must answer every annotated question exactly once: {len(missing)} missing "
            f"(first: {missing[:5]}), {len(extra)} not in the annotations (first: {extra[:5]}){hint}")


def compute_vqa_accuracy(questions: Mapping[str, Any] | list | None, annotations: Mapping[str, Any] | list,
                         results: list[Mapping[str, Any]], n: int = 2) -> VQAAccuracy:
    """The official VQA evaluation of ``results`` (``[{"question_id", "answer"}]``) on ``annotations``.

    Args:
        questions: the VQA questions JSON (or its ``questions`` list, or None). Only used, as by the
            official code, to check that a "Multiple Choice" task's answers are among the choices.
        annotations: the VQA annotations JSON, or its ``annotations`` list; each entry has
            ``question_id``, ``question_type``, ``answer_type`` and ``answers`` (dicts with ``answer``).
        n: decimals kept by ``round``.
    """
    anns = _index_unique(_as_list(annotations, "annotations", "annotations"), "annotations")
    if not anns:
        raise ValueError("annotations hold no question; nothing to evaluate")
    res = _index_unique(_as_list(results, "results", "results"), "results")
    _check_results_cover(anns.keys(), res.keys())
    _check_multiple_choice(questions, res)

    acc_qa: list[float] = []
    acc_ques_type: dict[str, list[float]] = {}
    acc_ans_type: dict[str, list[float]] = {}
    per_question: dict[Any, float] = {}
    for qid, ann in anns.items():  # annotation order, as the official loop: sums are order-sensitive
        pred = res[qid].get("answer")
        if not isinstance(pred, str):
            raise ValueError(f"result for question_id {qid!r} needs a string 'answer', got {pred!r}")
        answers = ann.get("answers")
        if not answers or not all(isinstance(a, Mapping) and isinstance(a.get("answer"), str) for a in answers):
            raise ValueError(f"annotation of question_id {qid!r} needs a non-empty 'answers' list of "
                             f"{{'answer': str, ...}} dicts, got {answers!r}")
        for key in ("question_type", "answer_type"):
            if key not in ann:
                raise ValueError(f"annotation of question_id {qid!r} has no {key!r}")
        acc = _leave_one_out_accuracy(normalize_answer(pred), _normalized_gt(answers))
        acc_qa.append(acc)
        acc_ques_type.setdefault(ann["question_type"], []).append(acc)
        acc_ans_type.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = round(100 * acc, n)

    def pct(accs: list[float]) -> float:
        return round(100 * float(sum(accs)) / len(accs), n)

    return VQAAccuracy(
        overall=pct(acc_qa),
        per_question_type={k: pct(v) for k, v in acc_ques_type.items()},
        per_answer_type={k: pct(v) for k, v in acc_ans_type.items()},
        per_question=per_question,
    )


def _check_multiple_choice(questions: Mapping[str, Any] | list | None, res: Mapping[Any, Mapping]) -> None:
    if not isinstance(questions, Mapping) or questions.get("task_type") != "Multiple Choice":
        return
    choices = {q["question_id"]: q.get("multiple_choices", []) for q in _as_list(questions, "questions", "questions")}
    for qid, r in res.items():
        if r.get("answer") not in choices.get(qid, []):
            raise ValueError(f"Multiple Choice task: answer {r.get('answer')!r} of question_id {qid!r} is not "
                             f"one of its multiple_choices")


def evaluate_vqa(questions: Mapping[str, Any] | list | None, annotations: Mapping[str, Any] | list,
                 results: list[Mapping[str, Any]], n: int = 2) -> dict[str, float]:
    """LAVIS's VQA metrics: ``{"agg_metrics": overall, "yes/no": ..., "number": ..., "other": ...}`` in
    percent (only the answer types present in the annotations). See :func:`compute_vqa_accuracy`."""
    return compute_vqa_accuracy(questions, annotations, results, n).to_metrics()


def _load_json(path: str | Path | None, what: str) -> Any:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def load_and_evaluate(questions_path: str | Path | None, annotations_path: str | Path,
                      results_path: str | Path, n: int = 2) -> dict[str, float]:
    """:func:`evaluate_vqa` on the official JSON files (``questions_path`` may be None)."""
    return evaluate_vqa(_load_json(questions_path, "questions"), _load_json(annotations_path, "annotations"),
                        _load_json(results_path, "results"), n)


# ---------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------

def gqa_accuracy(preds: Sequence[str], gts: Sequence[str]) -> float:
    """LAVIS's GQA accuracy in percent (unrounded): exact match of the normalised prediction with the
    raw ground-truth answer (GQA answers are already lower-case single words or phrases)."""
    if len(preds) != len(gts):
        raise ValueError(f"gqa_accuracy got {len(preds)} predictions but {len(gts)} ground-truth answers")
    if not preds:
        raise ValueError("gqa_accuracy got no predictions")
    hits = [1 if process_digit_article(process_punctuation(p)) == g else 0 for p, g in zip(preds, gts)]
    return sum(hits) / len(hits) * 100


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_lite.tasks.vqa_eval",
                                     description="Official VQAv2 accuracy of a results file.")
    parser.add_argument("--questions", help="VQA questions JSON (optional; used for Multiple Choice checks)")
    parser.add_argument("--annotations", required=True, help="VQA annotations JSON")
    parser.add_argument("--results", required=True, help='results JSON: [{"question_id": ..., "answer": ...}]')
    parser.add_argument("--output", help="also write the metrics JSON here")
    parser.add_argument("--decimals", type=int, default=2, help="decimals kept by round() (official: 2)")
    parser.add_argument("--detailed", action="store_true",
                        help="also report per-question-type accuracies")
    args = parser.parse_args(argv)
    try:
        report = compute_vqa_accuracy(_load_json(args.questions, "questions"),
                                      _load_json(args.annotations, "annotations"),
                                      _load_json(args.results, "results"), args.decimals)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics: dict[str, Any] = report.to_metrics()
    if args.detailed:
        metrics["per_question_type"] = report.per_question_type
    print_metrics(metrics, args.output)
    return 0


def print_metrics(metrics: dict[str, Any], output: str | None) -> None:
    """A scorer CLI's result: JSON on stdout, and in ``output`` too when given."""
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    print(text)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
