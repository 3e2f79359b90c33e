"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr with pycocoevalcap's scorers, for English and Chinese.

English captions go through pycocoevalcap's PTB tokenizer (Stanford CoreNLP, Java), as COCO and LAVIS
score them. Chinese captions are scored twice, and every metric name says how they were split:

- ``_char`` (:func:`tokenize_chinese`): one token per character; Latin words and digit runs stay whole;
  punctuation is dropped. Needs no dictionary, so it is the basis of ``agg_metrics``.
- ``_jieba`` (:func:`tokenize_jieba`): words, exactly as the AI Challenger 2017 image Chinese captioning
  scorer splits them: AIChallenger/AI_Challenger_2017, ``Evaluation/caption_eval`` (commit 52014e0),
  read in ``coco_caption/pycxtools/coco.py`` (``COCO.loadRes``) and ``coco_caption/pycxevalcap/eval.py``
  (``COCOEvalCap.evaluate``). There, each submitted caption is

  1. ``caption.strip().replace("。", "")``: only the full stop "。" is removed at this point;
  2. cut by ``jieba.cut(text, cut_all=False)`` (precise mode, HMM for unknown words on, jieba's default
     dictionary) and the pieces joined by single spaces (whitespace pieces included);
  3. with the references, passed through pycocoevalcap's ``PTBTokenizer`` (CoreNLP 3.4.1 run with
     ``-preserveLines -lowerCase``, then tokens in its ``PUNCTUATIONS`` list dropped);
  4. scored by ``Bleu(4)``, ``Rouge()`` (ROUGE-L, beta 1.2), ``Cider()`` (n=4, sigma=6, document
     frequencies from the evaluated references) and ``Meteor()``: the same code as pycocoevalcap 1.2's,
     which we call. METEOR is left out here (Java, English paraphrase tables).

  Its reference file ships already segmented (``data/id_to_words.json``; all 15 sample references equal
  steps 1-2 applied to the unspaced text), so steps 1-2 apply to our raw references as well. Step 3 is
  re-implemented without Java in :func:`ptb_pass`. For Chinese text with ASCII, fullwidth forms, CJK and
  general punctuation it gives CoreNLP 3.4.1's tokens (checked against the jar when Java is present):
  lower-case; "(", ")", "[", "]", "{", "}" become "-lrb-" .. "-rcb-" and stay (``PUNCTUATIONS`` lists
  them upper-case, but they were lower-cased); curly quotes, dashes, "…", CJK brackets such as 《》「」
  and 〇 vanish; "%" is split from the token it ends; ASCII punctuation tokens are dropped, "，", "、",
  "：", "！", "？" are kept as words. Not reproduced: CoreNLP's rewrites inside Latin or symbol tokens
  ("cannot" -> "can not", "No.1" -> "no. 1", "++" -> "+ +", five dashes or more kept). jieba 0.42.1 is
  pinned: it has the challenge's jieba 0.38 dictionary and HMM tables, cuts differently only around "%"
  and "-", and after step 3 the two agree on all the test sentences but "No.1", "V2.0" and "-----".

Usage:
    python -m lavis_lite.tasks.caption_eval --gt GT.json --results RES.json --language zh|en [--output M.json]

GT is COCO-format caption ground truth (``{"images": [{"id"}], "annotations": [{"image_id", "caption"}]}``),
RES a list of ``{"image_id", "caption"}``, one per ground-truth image (our ``result/*_caption_result.json``).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import shutil
import sys
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from lavis_lite.tasks.vqa_eval import print_metrics

SCORES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
ZH_TOKENIZATIONS = ("char", "jieba")


def metric_names(language: Literal["en", "zh"]) -> list[str]:
    """What :func:`score_captions` reports: ``SCORES`` for English, each with ``_char`` and ``_jieba`` for Chinese."""
    if language == "zh":
        return [f"{m}_{t}" for t in ZH_TOKENIZATIONS for m in SCORES]
    return list(SCORES)


# ---------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------

def tokenize_chinese(text: str) -> str:
    """Characters separated by spaces, without whitespace or punctuation; Latin words and digits
    stay whole ("3个red圆形。" -> "3 个 red 圆 形")."""
    tokens = re.findall(r"[A-Za-z]+|\d+|\S", text)
    return " ".join(t for t in tokens if not unicodedata.category(t[0]).startswith("P"))


# pycocoevalcap's (and the challenge's) ptbtokenizer.PUNCTUATIONS, the tokens dropped after CoreNLP.
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                              "-", "--", "...", ";"])
# Characters CoreNLP 3.4.1 cannot tokenize (deleted), or rewrites to a quote, dash or ellipsis token that
# PTB_PUNCTUATIONS then drops; found by running the jar on every character of the blocks named above.
_PTB_GONE = re.compile("[\"\u00ab\u00bb\u200b\u2010-\u2015\u2018\u2019\u201b-\u201d\u2024-\u2027\u2039\u203a"
                       "\u203c\u203d\u2043\u2045-\u205e\u3003\u3004\u3007-\u3011\u3013-\u3030\u3036-\u303a"
                       "\u303d-\u303f\ufe30-\ufe52\ufe54-\ufe66\ufe68-\ufe6b\ufeff\uffe2-\uffe4\uffe8-\uffee]")
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_DOTS_AND_DASHES = re.compile(r"[.\-]+")  # "....", "---", ".-.": CoreNLP splits them into dropped tokens


def ptb_pass(text: str) -> str:
    """pycocoevalcap's PTB step (CoreNLP 3.4.1 ``-lowerCase``, then ``PTB_PUNCTUATIONS`` dropped) on
    space-separated Chinese words, without Java; see the module docstring for its scope."""
    out = []
    for token in _PTB_GONE.sub(" ", text.lower()).split():
        word = token.rstrip("%")
        for t in ([word] if word else []) + ["%"] * (len(token) - len(word)):
            t = _PTB_BRACKETS.get(t, t)
            if t not in PTB_PUNCTUATIONS and not _DOTS_AND_DASHES.fullmatch(t):
                out.append(t)
    return " ".join(out)


@functools.cache
def _jieba():
    """A private jieba tokenizer on the default dictionary, loaded once: words added to jieba's global
    tokenizer elsewhere (``jieba.add_word``) cannot change our scores, and its loading lines are hidden."""
    with warnings.catch_warnings():  # jieba's source has invalid escapes; some setuptools warn on pkg_resources
        warnings.simplefilter("ignore")
        import jieba
    jieba.setLogLevel(logging.WARNING)  # "Building prefix dict ..." is logged at DEBUG on stderr
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def tokenize_jieba(text: str) -> str:
    """Words as the AI Challenger 2017 caption scorer splits them (module docstring):
    "3个Red圆形，在左边。" -> "3 个 red 圆形 ， 在 左边"."""
    words = _jieba().cut(text.strip().replace("。", ""), cut_all=False, HMM=True)
    return ptb_pass(" ".join(words))


ZH_TOKENIZERS: dict[str, Callable[[str], str]] = {"char": tokenize_chinese, "jieba": tokenize_jieba}


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------

def score_tokenized(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr (fractions, as pycocoevalcap reports them) of space-tokenised captions:
    ``gts`` maps an image to its references, ``res`` to a one-caption list."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}, "ROUGE_L": float(rouge), "CIDEr": float(cider)}


def score_captions(gts: dict[Any, list[str]], res: dict[Any, str],
                   language: Literal["en", "zh"] = "en") -> dict[str, float]:
    """The :func:`metric_names` of one generated caption per image against its references.

    English: PTB tokenizer (Java). Chinese: once per tokenisation, names suffixed ``_char`` / ``_jieba``.
    Images in ``res`` without references are ignored.
    """
    missing = [k for k in gts if k not in res]
    if missing:
        raise ValueError(f"no generated caption for {len(missing)} images, e.g. {sorted(map(str, missing))[:3]}")
    if language == "zh":
        metrics = {}
        for name, tokenize in ZH_TOKENIZERS.items():
            scores = score_tokenized({k: [tokenize(c) for c in v] for k, v in gts.items()},
                                     {k: [tokenize(res[k])] for k in gts})
            metrics.update({f"{m}_{name}": v for m, v in scores.items()})
        return metrics
    if language != "en":
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer()
    return score_tokenized(ptb.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()}),
                           ptb.tokenize({k: [{"caption": res[k]}] for k in gts}))


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def load_coco_gt(path: str | Path) -> dict[Any, list[str]]:
    """COCO-format caption ground truth -> ``{image id: [captions]}``, every image with one caption at least."""
    data = _read_json(path, "ground-truth")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"ground-truth file {path} must be COCO caption JSON with 'images' and 'annotations' "
                         f"lists, found {found}")
    gts: dict[Any, list[str]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise ValueError(f"ground-truth file {path}: images[{i}] has no 'id': {img!r}")
        gts[img["id"]] = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise ValueError(f"ground-truth file {path}: annotations[{i}] needs 'image_id' and a string "
                             f"'caption', got {ann!r}")
        if ann["image_id"] not in gts:
            raise ValueError(f"ground-truth file {path}: annotations[{i}] has image_id {ann['image_id']!r}, "
                             f"which is not in 'images'")
        gts[ann["image_id"]].append(ann["caption"])
    empty = [k for k, v in gts.items() if not v]
    if empty:
        raise ValueError(f"ground-truth file {path}: {len(empty)} images have no caption, e.g. {empty[:3]}")
    return gts


def load_results(path: str | Path, gts: dict[Any, list[str]]) -> dict[Any, str]:
    """A result file (``[{"image_id", "caption"}]``) -> ``{image id: caption}``, exactly one per image of ``gts``."""
    data = _read_json(path, "results")
    if not isinstance(data, list):
        raise ValueError(f"results file {path} must be a list of {{'image_id', 'caption'}}, "
                         f"got a {type(data).__name__}")
    res: dict[Any, str] = {}
    for i, r in enumerate(data):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise ValueError(f"results file {path}: entry {i} needs 'image_id' and a string 'caption', got {r!r}")
        if r["image_id"] in res:
            raise ValueError(f"results file {path}: image_id {r['image_id']!r} has more than one caption")
        if r["image_id"] not in gts:
            raise ValueError(f"results file {path}: image_id {r['image_id']!r} is not in the ground truth")
        res[r["image_id"]] = r["caption"]
    missing = [k for k in gts if k not in res]
    if missing:
        raise ValueError(f"results file {path} has no caption for {len(missing)} of the {len(gts)} "
                         f"ground-truth images, e.g. {missing[:3]}")
    return res


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_lite.tasks.caption_eval",
                                     description="BLEU, ROUGE-L and CIDEr of a caption result file.")
    parser.add_argument("--gt", required=True, help="COCO-format caption ground truth JSON")
    parser.add_argument("--results", required=True, help='results JSON: [{"image_id": ..., "caption": ...}]')
    parser.add_argument("--language", choices=["en", "zh"], required=True,
                        help="en: PTB tokenizer (Java); zh: character- and jieba word-level")
    parser.add_argument("--output", help="also write the metrics JSON here")
    args = parser.parse_args(argv)
    try:
        if args.language == "en" and shutil.which("java") is None:
            raise ValueError("--language en tokenizes with pycocoevalcap's PTB tokenizer, which runs Java, and no "
                             "`java` is on PATH: install a Java runtime (e.g. apt-get install default-jre-headless)")
        gts = load_coco_gt(args.gt)
        metrics = score_captions(gts, load_results(args.results, gts), args.language)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_metrics(metrics, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
