"""Official VQAv2 accuracy: hand-computed values for every rule, plus an independent transcription of
the official scoring loop checked against the library on randomised answers."""
import copy
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_lite.tasks.vqa_eval import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    compute_vqa_accuracy,
    evaluate_vqa,
    gqa_accuracy,
    load_and_evaluate,
    main,
    normalize_answer,
    process_gt_answers,
    score_question,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# Normalisation, one rule at a time (expected values worked out by hand from the official rules)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    # number words -> digits, after lower-casing; words outside the table are kept
    ("two", "2"), ("Two", "2"), ("none", "0"), ("zero", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("two dogs", "2 dogs"),
    # articles dropped, wherever they are; a lone article leaves nothing
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"), ("the one", "1"), ("A", ""),
    ("None of the above", "0 of above"),
    # contractions: missing apostrophe restored; capitalised keys never match (input is lower-cased)
    ("dont", "don't"), ("Dont", "don't"), ("don't", "don't"), ("Im", "im"),
    ("somebody'd", "somebodyd"),  # this entry of the official table goes the other way
    # periods: deleted unless a digit follows
    ("yes.", "yes"), ("2.5", "2.5"), ("5.", "5"), ("1.5.", "1.5"), ("e.g.", "eg"), ("a.b", "ab"),
    # a mark touching a space is deleted; otherwise it becomes a space
    ("red, white", "red white"), ("red,white", "red white"), ("x/y", "x y"), ("t-shirt", "t shirt"),
    ("yes!", "yes"), ("what?", "what"), ("(dog)", "dog"),
    # ...decided per mark on the ORIGINAL text: " -" occurs, so every "-" is deleted
    ("t-shirt -ish", "tshirt ish"),
    # a digit-comma-digit anywhere deletes every mark: "2,000" keeps its digits together
    ("2,000", "2000"), ("1,2 x/y", "12 xy"), ("3, 4", "3 4"),
    # whitespace: newlines and tabs are spaces, runs collapse, ends stripped
    ("  yes\nno\t", "yes no"),
])
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_strip_stops_after_32_periods():
    # the official call passes re.UNICODE (= 32) as re.sub's count: periods 33..40 survive
    raw = " ".join(["b."] * 40)
    assert normalize_answer(raw) == " ".join(["b"] * 32 + ["b."] * 8)


def test_tables_match_the_official_data():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["couldn'tve"] == "couldn't've" and CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["'ows'at"] == "'ow's'at" and CONTRACTIONS["y'allll"] == "y'all'll"
    assert list(CONTRACTIONS)[:3] == ["aint", "arent", "cant"] and list(CONTRACTIONS)[-1] == "youve"
    assert NUMBER_WORDS == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    assert ARTICLES == ("a", "an", "the")
    assert "".join(PUNCTUATION) == ';/[]"{}()=+\\_-><@`,?!'  # no period, colon or apostrophe


def test_gt_answers_get_punctuation_only_and_only_when_not_unanimous():
    assert process_gt_answers(["yes."] * 10) == ["yes."] * 10  # unanimous: untouched
    assert process_gt_answers(["yes.", "Two", "the dog"]) == ["yes", "Two", "the dog"]  # no lower/digit/article


# ------------------------------------------------------------------------------------------------
# One question: leave-one-out over 10 annotators
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    # k=1: leaving out the matching annotator (1 subset) leaves 0 matches -> 0; leaving out any of the
    # 9 others leaves 1 match -> 1/3.  (1*0 + 9*(1/3)) / 10 = 3/10
    (1, 0.3),
    # k=2: 2 subsets keep 1 match -> 1/3; 8 keep 2 -> 2/3.  (2/3 + 16/3) / 10 = 6/10
    (2, 0.6),
    # k=3: 3 subsets keep 2 -> 2/3; 7 keep 3 -> 1.  (2 + 7) / 10 = 9/10
    (3, 0.9),
    # k=4: every subset keeps >= 3 matches -> 1
    (4, 1.0), (10, 1.0),
])
def test_score_by_number_of_matching_humans(k, expected):
    humans = ["cat"] * k + ["dog"] * (10 - k)
    assert score_question("cat", humans) == pytest.approx(expected, abs=1e-12)
    assert score_question("Cat.", humans) == pytest.approx(expected, abs=1e-12)  # prediction normalised


def test_score_gt_processing_quirks():
    # unanimous gt is compared raw: capitals never match the lower-cased prediction
    assert score_question("Two", ["Two"] * 10) == 0.0
    assert score_question("yes", ["yes."] * 10) == 0.0
    # not unanimous: "yes." -> "yes", 5 matches -> 1.0
    assert score_question("yes", ["yes."] * 5 + ["no"] * 5) == 1.0
    # gt number words stay words: prediction "two" -> "2" matches only the 6 "2"s
    assert score_question("two", ["two"] * 4 + ["2"] * 6) == 1.0
    assert score_question("two", ["two"] * 4 + ["three"] * 6) == 0.0
    # gt articles stay: "the dog" -> "dog" does not match gt "the dog"
    assert score_question("the dog", ["the dog"] * 5 + ["cat"] * 5) == 0.0


def test_answer_dicts_equal_as_dicts_are_left_out_together():
    # without answer_id the 3 "yes" dicts are equal: leaving one out removes all 3 -> 0 matches (x3);
    # leaving out a "no" keeps 3 matches -> 1 (x7).  (0*3 + 1*7) / 10 = 0.7
    assert score_question("yes", [{"answer": "yes"}] * 3 + [{"answer": "no"}] * 7) == pytest.approx(0.7)
    with_ids = [{"answer": a, "answer_id": i} for i, a in enumerate(["yes"] * 3 + ["no"] * 7)]
    assert score_question("yes", with_ids) == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------
# A small synthetic data set: per-type breakdown
# ------------------------------------------------------------------------------------------------

def _ann(qid, qtype, atype, answers):
    return {"question_id": qid, "image_id": qid * 10, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def _dataset():
    annotations = {"annotations": [
        _ann(1, "is the", "yes/no", ["yes"] * 10),             # "Yes" -> 1.0
        _ann(2, "is the", "yes/no", ["no"] * 10),              # "yes" -> 0.0
        _ann(3, "how many", "number", ["2"] * 2 + ["3"] * 8),  # "two" -> "2", 2 matches -> 0.6
        _ann(4, "what color", "other", ["red"] + ["blue"] * 9),  # "red", 1 match -> 0.3
        _ann(5, "what is the", "other", ["dog"] * 4 + ["puppy"] * 6),  # "a dog" -> "dog", 4 -> 1.0
    ]}
    questions = {"questions": [{"question_id": q, "image_id": q * 10, "question": "?"} for q in range(1, 6)]}
    results = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "yes"},
               {"question_id": 3, "answer": "two"}, {"question_id": 4, "answer": "red"},
               {"question_id": 5, "answer": "a dog"}]
    return questions, annotations, results


# overall (1 + 0 + .6 + .3 + 1) / 5 = .58; yes/no (1 + 0) / 2; number .6; other (.3 + 1) / 2
EXPECTED = {"agg_metrics": 58.0, "yes/no": 50.0, "number": 60.0, "other": 65.0}


def test_per_type_breakdown():
    questions, annotations, results = _dataset()
    assert evaluate_vqa(questions, annotations, results) == EXPECTED
    report = compute_vqa_accuracy(questions, annotations, results)
    assert report.per_question_type == {"is the": 50.0, "how many": 60.0, "what color": 30.0,
                                        "what is the": 100.0}
    assert report.per_question == {1: 100.0, 2: 0.0, 3: 60.0, 4: 30.0, 5: 100.0}
    # inputs are not mutated (the official code overwrites gt answers in place)
    assert (questions, annotations, results) == _dataset()


def test_rounding_and_missing_answer_types():
    annotations = [_ann(1, "is the", "yes/no", ["yes"] * 10), _ann(2, "is the", "yes/no", ["no"] * 10),
                   _ann(3, "what", "other", ["no"] * 10)]
    results = [{"question_id": q, "answer": "yes"} for q in (1, 2, 3)]
    # overall 100 * 1 / 3 = 33.33..; yes/no 50; no "number" questions -> no "number" key
    assert evaluate_vqa(None, annotations, results) == {"agg_metrics": 33.33, "yes/no": 50.0, "other": 0.0}
    assert evaluate_vqa(None, annotations, results, n=1)["agg_metrics"] == 33.3


@pytest.mark.parametrize("results, needle", [
    ([{"question_id": q, "answer": "x"} for q in (1, 2, 3, 4, 5, 3)], "question_id 3 appears more than once"),
    ([{"question_id": q, "answer": "x"} for q in (1, 2, 3, 4)], "1 missing (first: [5])"),
    ([{"question_id": q, "answer": "x"} for q in (1, 2, 3, 4, 5, 99)], "1 not in the annotations (first: [99])"),
    ([{"question_id": str(q), "answer": "x"} for q in (1, 2, 3, 4, 5)], "int vs str"),
    ([{"question_id": q, "answer": 7} for q in (1, 2, 3, 4, 5)], "question_id 1 needs a string 'answer'"),
])
def test_results_must_cover_questions_exactly_once(results, needle):
    questions, annotations, _ = _dataset()
    with pytest.raises(ValueError) as e:
        evaluate_vqa(questions, annotations, results)
    assert needle in str(e.value)


def test_duplicate_annotation_ids_are_rejected():
    _, annotations, results = _dataset()
    annotations["annotations"].append(_ann(4, "what color", "other", ["red"] * 10))
    with pytest.raises(ValueError, match="question_id 4 appears more than once in the annotations"):
        evaluate_vqa(None, annotations, results)


def test_multiple_choice_answers_must_be_choices():
    questions, annotations, results = _dataset()
    questions["task_type"] = "Multiple Choice"
    for q in questions["questions"]:
        q["multiple_choices"] = ["Yes", "yes", "two", "red"]
    with pytest.raises(ValueError, match="'a dog' of question_id 5"):
        evaluate_vqa(questions, annotations, results)


def test_gqa_accuracy():
    # normalised prediction vs raw gt: "The Dog." -> "dog" hits, "two" -> "2" hits, "Yes" vs "no" misses,
    # "a cat" -> "cat" misses the raw gt "a cat"
    assert gqa_accuracy(["The Dog.", "two", "Yes", "a cat"], ["dog", "2", "no", "a cat"]) == 50.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        gqa_accuracy(["a", "b"], ["a"])


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _write_dataset(tmp_path):
    paths = {}
    for name, data in zip(("questions", "annotations", "results"), _dataset()):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return paths


def test_cli_prints_and_writes_same_numbers(tmp_path, capsys):
    p = _write_dataset(tmp_path)
    out = tmp_path / "metrics.json"
    rc = main(["--questions", str(p["questions"]), "--annotations", str(p["annotations"]),
               "--results", str(p["results"]), "--output", str(out)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED
    assert json.loads(out.read_text()) == EXPECTED
    assert load_and_evaluate(p["questions"], p["annotations"], p["results"]) == EXPECTED


def test_cli_as_module(tmp_path):
    p = _write_dataset(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lavis_lite.tasks.vqa_eval", "--questions", str(p["questions"]),
                           "--annotations", str(p["annotations"]), "--results", str(p["results"]), "--detailed"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics.pop("per_question_type")["what color"] == 30.0
    assert metrics == EXPECTED


def test_cli_bad_input_names_the_file(tmp_path, capsys):
    p = _write_dataset(tmp_path)
    missing = tmp_path / "nope.json"
    assert main(["--annotations", str(p["annotations"]), "--results", str(missing)]) == 1
    assert f"results file not found: {missing}" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [')
    assert main(["--annotations", str(broken), "--results", str(p["results"])]) == 1
    assert f"annotations file {broken} is not valid JSON" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="questions file not found"):
        load_and_evaluate(missing, p["annotations"], p["results"])


# ------------------------------------------------------------------------------------------------
# Independent transcription of the official loop (vqaEval.py, Python 3 version), randomised inputs
# ------------------------------------------------------------------------------------------------

class OfficialTranscription:
    """The official algorithm written out as its plain nested loops, mutation of the gt included.
    Only the data tables are shared with the library."""

    period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    comma_strip = re.compile(r"(\d)(,)(\d)")

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in PUNCTUATION:
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.comma_strip, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return self.period_strip.sub("", out_text, count=int(re.UNICODE))

    def process_digit_article(self, in_text):
        out = []
        for word in in_text.lower().split():
            word = NUMBER_WORDS.get(word, word)
            if word not in ARTICLES:
                out.append(word)
        for i, word in enumerate(out):
            if word in CONTRACTIONS:
                out[i] = CONTRACTIONS[word]
        return " ".join(out)

    def evaluate(self, annotations, results, n=2):
        gts = {a["question_id"]: a for a in annotations}
        res = {r["question_id"]: r for r in results}
        acc_qa, acc_qt, acc_at, eval_qa, raw = [], {}, {}, {}, {}
        for qid in [a["question_id"] for a in annotations]:
            res_ans = res[qid]["answer"].replace("\n", " ").replace("\t", " ").strip()
            res_ans = self.process_digit_article(self.process_punctuation(res_ans))
            gt_answers = [ans["answer"] for ans in gts[qid]["answers"]]
            if len(set(gt_answers)) > 1:
                for ans_dic in gts[qid]["answers"]:
                    ans_dic["answer"] = self.process_punctuation(ans_dic["answer"])
            gt_acc = []
            for gt_datum in gts[qid]["answers"]:
                other = [item for item in gts[qid]["answers"] if item != gt_datum]
                matching = [item for item in other if item["answer"] == res_ans]
                gt_acc.append(min(1, float(len(matching)) / 3))
            avg = float(sum(gt_acc)) / len(gt_acc)
            acc_qa.append(avg)
            acc_qt.setdefault(gts[qid]["question_type"], []).append(avg)
            acc_at.setdefault(gts[qid]["answer_type"], []).append(avg)
            eval_qa[qid] = round(100 * avg, n)
            raw[qid] = avg
        pct = lambda xs: round(100 * float(sum(xs)) / len(xs), n)  # noqa: E731
        return (pct(acc_qa), {k: pct(v) for k, v in acc_qt.items()}, {k: pct(v) for k, v in acc_at.items()},
                eval_qa, raw)


VOCAB = ["yes", "Yes", "yes.", "no", "No!", "two", "Two", "2", "2.5", "2,000", "2000", "none", "0", "ten",
         "10", "the dog", "a dog", "dog", "Dog.", "an apple", "apple?", "(apple)", "red,white", "red, white",
         "red white", "t-shirt", "t shirt", "dont", "don't", "x/y", " yes ", "yes\n", "One", "1", "e.g.", "eg",
         "Im", "somebody'd", "somebodyd", "a", "", "1,2 x/y", "t-shirt -ish", "b. b. c", "b. " * 34]


def test_matches_independent_transcription_on_random_answers():
    rng = random.Random(0)
    annotations, results = [], []
    for qid in range(400):
        pool = rng.sample(VOCAB, rng.randint(1, 4))  # few distinct answers so matches happen
        answers = [rng.choice(pool) for _ in range(rng.choice([10, 10, 10, 3, 5]))]
        with_ids = rng.random() < 0.8  # the rest exercise the dict-equality leave-one-out
        annotations.append({
            "question_id": 1000 + qid, "image_id": qid,
            "question_type": rng.choice(["what is", "how many", "is the"]),
            "answer_type": rng.choice(["yes/no", "number", "other"]),
            "answers": [dict({"answer": a}, **({"answer_id": i + 1, "answer_confidence": "yes"} if with_ids else {}))
                        for i, a in enumerate(answers)],
        })
        pred = rng.choice(pool) if rng.random() < 0.7 else rng.choice(VOCAB)
        results.append({"question_id": 1000 + qid, "answer": pred})
    rng.shuffle(results)

    *expected, raw = OfficialTranscription().evaluate(copy.deepcopy(annotations), copy.deepcopy(results))
    report = compute_vqa_accuracy(None, {"annotations": annotations}, results)
    assert 0 < report.overall < 100 and 0 < sum(0 < v < 100 for v in report.per_question.values())
    assert [report.overall, report.per_question_type, report.per_answer_type, report.per_question] == expected
    # per-question scores agree exactly, not just after rounding
    preds = {r["question_id"]: r["answer"] for r in results}
    assert {a["question_id"]: score_question(preds[a["question_id"]], a["answers"]) for a in annotations} == raw
