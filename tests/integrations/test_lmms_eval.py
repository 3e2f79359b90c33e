"""The lmms-eval model ``lavis_lite`` (lavis_lite/integrations/lmms_eval.py) on hand-made requests.

A tiny stage-2 model of each bos layout (OPT: after the queries; InternLM2: before them) is saved as a
runner checkpoint and the adapter is built through lmms-eval's own registry, i.e. through setup.py's
entry point. Generation equals ``predict_answers`` / ``generate`` on the same processed image and prompt;
log-likelihoods equal sums computed here token by token from the LLM and the query embeddings
(``unpadded`` lays a sequence out independently of ``build_inputs``), negated as lmms-eval 0.7.3's tasks
expect. A slow test runs the ``lmms-eval`` command itself on two local tasks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

pytest.importorskip("lmms_eval", reason="the lmms-eval adapter's tests need its extra: pip install -e '.[lmms]'")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from lavis_lite.config import load_config  # noqa: E402
from lavis_lite.integrations.lmms_eval import LavisLite, resolve_model  # noqa: E402
from lavis_lite.registry import MODELS  # noqa: E402
from tests.models.test_blip2_llm import unpadded  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("opt", "internlm2")
PROMPT = "Question: {} Short answer:"
QUESTIONS = ["what color is the circle?", "how many stars are there? the purple star is left of the green"]
TASK, SPLIT = "shapes", "test"


def pil_image(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


DOCS = [{"image": pil_image(i), "question": q, "answer": "red"} for i, q in enumerate(QUESTIONS)]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"]]


def request(kind: str, context: str, second: Any, doc_id: int = 0,
            visual: Callable[[dict[str, Any]], Any] = doc_to_visual) -> Instance:
    """A request as lmms-eval's ``ConfigurableTask.construct_requests`` builds it."""
    return Instance(request_type=kind, arguments=(context, second, visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def adapter(model_args: str) -> LavisLite:
    """As ``lmms-eval --model lavis_lite --model_args ... --device cpu`` builds it."""
    try:
        cls = get_model("lavis_lite")
    except ValueError as err:
        raise AssertionError(f"{err}; register setup.py's entry point: pip install -e '.[test]'") from None
    lm = cls.create_from_arg_string(model_args, {"batch_size": "1", "device": "cpu"})
    lm.task_dict = {TASK: {SPLIT: DOCS}}  # as the evaluator sets it: task -> split -> docs
    return lm


def save_stage2(out: Path, family: str, llm_path: Path) -> Path:
    """A runner-style checkpoint of a tiny stage-2 model: its resolved config and the weights outside the LLM
    (the image encoder too: the tiny one is trained, not loaded)."""
    project = out / "stage2.yaml"
    model = {"arch": "blip2_internlm", "model_type": "tiny", "llm": family, "llm_path": str(llm_path)}
    project.write_text(OmegaConf.to_yaml({"model": model}))
    cfg, _ = load_config(project)
    torch.manual_seed(3)
    built = MODELS.get("blip2_internlm").from_config(cfg.model)
    state = {k: v for k, v in built.state_dict().items() if not k.startswith("llm_model.")}
    torch.save({"model": state, "config": OmegaConf.to_yaml(cfg, resolve=True)}, out / "checkpoint_best.pth")
    return out / "checkpoint_best.pth"


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LavisLite:
    family = request.param
    checkpoint = save_stage2(tmp_path_factory.mktemp(family), family, request.getfixturevalue(f"tiny_{family}_dir"))
    lm = adapter(f"checkpoint={checkpoint},prompt={PROMPT}")
    lm.family = family
    saved = torch.load(checkpoint, weights_only=True)["model"]
    torch.testing.assert_close(lm.model.llm_proj.weight, saved["llm_proj.weight"], rtol=0, atol=0)
    return lm


@pytest.fixture
def lm(loaded: LavisLite) -> LavisLite:
    """The module's adapter with the settings it was built with (tests change them)."""
    loaded.batch_size, loaded.prompt, loaded.score_stop_token = 1, PROMPT, False
    return loaded


def processed(lm: LavisLite, doc_ids: list[int]) -> torch.Tensor:
    return torch.stack([lm.vis_processor(DOCS[i]["image"].convert("RGB")) for i in doc_ids])


def token_by_token(lm: LavisLite, doc_id: int, context: str, continuation: str, stop: bool = False,
                   prompt: str = PROMPT) -> tuple[float, bool]:
    """(sum of log-probs, all greedy) of ``continuation`` one LLM pass per token, unpadded."""
    model, family = lm.model, lm.family
    tok, backbone = model.tokenizer, model.backbone
    ids = backbone.encode(tok, continuation.lstrip()) + ([model.stop_id] if stop else [])
    prompt_ids = backbone.encode(tok, prompt.format(context)) if prompt.format(context) else []
    total, greedy = 0.0, True
    with torch.no_grad():
        query = model.query_embeds(processed(lm, [doc_id]))[0]
        for k, token in enumerate(ids):
            seq, _ = unpadded(model, family, query, prompt_ids, ids[:k])
            logp = model.llm_model(inputs_embeds=seq[None]).logits[0, -1].float().log_softmax(-1)
            total += logp[token].item()
            greedy &= int(logp[: len(tok)].argmax()) == token
    return total, greedy


# ------------------------------------------------------------------------------------ registration
def test_the_entry_point_registers_without_importing_lavis_lite():
    """lmms-eval loads every plug-in's manifest on ``import lmms_eval.models``: ours must stay light."""
    code = ("import sys, lmms_eval.models as m; c = m.get_model_manifest('lavis_lite').simple_class_path; "
            "print(c, 'lavis_lite' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["lavis_lite.integrations.lmms_eval.LavisLite", "False"]
    assert get_model("lavis_lite") is LavisLite


def test_cfg_names_the_model(tmp_path):
    assert resolve_model("blip2_opt/pretrain_opt2.7b", None) == ("blip2_opt", "pretrain_opt2.7b", {})
    model_yaml = Path(__file__).resolve().parents[2] / "configs/models/blip2_internlm/tiny.yaml"
    assert resolve_model(str(model_yaml), None) == ("blip2_internlm", "tiny", {})
    project = tmp_path / "p.yaml"
    project.write_text("model: {arch: blip2_opt, model_type: pretrain_opt2.7b, llm_dtype: float32}\n")
    assert resolve_model(str(project), None) == ("blip2_opt", "pretrain_opt2.7b", {"llm_dtype": "float32"})


# -------------------------------------------------------------------------------------- generation
def test_generation_equals_predict_answers(lm):
    beams = {"max_new_tokens": 6, "num_beams": 2, "min_new_tokens": 2, "length_penalty": 0.0, "until": ["\n\n"],
             "temperature": 0, "top_p": 1.0, "do_sample": False}
    greedy = {"max_new_tokens": 5}
    requests = [request("generate_until", q, dict(kw), doc_id=i) for kw in (beams, greedy) for i, q in
                enumerate(QUESTIONS)]
    batch = {"image": processed(lm, [0, 1]), "text_input": QUESTIONS}
    expected = lm.model.predict_answers(batch, prompt=PROMPT, num_beams=2, max_new_tokens=6, min_new_tokens=2,
                                        length_penalty=0.0)
    prompts = [PROMPT.format(q) for q in QUESTIONS]
    expected += lm.model.generate({"image": batch["image"], "prompt": prompts}, num_beams=1, max_new_tokens=5)
    for batch_size in (1, 3):  # batched per gen_kwargs: the same answers
        lm.batch_size = batch_size
        assert lm.generate_until(requests) == expected
    assert any(expected), expected  # not all empty: the comparison means something


def test_until_cuts_the_answer(lm):
    full = lm.generate_until([request("generate_until", QUESTIONS[1], {"max_new_tokens": 8})])[0]
    assert len(full) >= 2, full
    middle = full[len(full) // 2 :][:2]
    for until in (middle, ["never in it", middle]):
        cut = lm.generate_until([request("generate_until", QUESTIONS[1], {"max_new_tokens": 8, "until": until})])
        assert cut == [full.split(middle, 1)[0]]


# ---------------------------------------------------------------------------------- log-likelihood
def test_loglikelihood_equals_token_by_token_sums(lm):
    pairs = [(0, QUESTIONS[0], " red"), (1, QUESTIONS[1], " two blue squares on the left"), (0, "", "a circle")]
    requests = [request("loglikelihood", context, continuation, doc_id=i) for i, context, continuation in pairs]
    requests.append(request("loglikelihood", QUESTIONS[1], lambda doc: doc["answer"], doc_id=1))  # doc_to_target
    pairs.append((1, QUESTIONS[1], "red"))
    for stop in (False, True):
        lm.score_stop_token = stop
        expected = [token_by_token(lm, i, context, continuation, stop) for i, context, continuation in pairs]
        for batch_size in (1, 4):  # one padded batch: the same sums
            lm.batch_size = batch_size
            scores = lm.loglikelihood(requests)
            for (score, greedy), (want, want_greedy) in zip(scores, expected):
                assert score == pytest.approx(-want, abs=1e-4) and greedy == want_greedy  # lmms-eval: a loss
            assert [unwrap_generation_output(r)[0] for r in scores] == [tuple(r) for r in scores]  # the evaluator's


def test_loglikelihood_without_context_or_prompt(lm):
    """lmms-eval's unconditional requests (acc_mutual_info): no text before the continuation at all. Only the
    continuation is scored (LAVIS's OPT layout makes the bos after the queries a training target then)."""
    lm.prompt = "{}"
    score, greedy = lm.loglikelihood([request("loglikelihood", "", " a red circle")])[0]
    want, want_greedy = token_by_token(lm, 0, "", " a red circle", prompt="{}")
    assert score == pytest.approx(-want, abs=1e-4) and greedy == want_greedy


def test_greedy_flag(lm):
    """True for the model's own greedy answer (what generate_until gives), False for another string, and
    with the stop token scored False unless the model would also stop there. A random LLM's greedy tokens
    rarely re-encode to themselves ("l", "l", "l" -> "lll" -> "ll", "l"), so it is steered to a one-token word."""
    model = lm.model
    word, other = [w for w in ("red", "yes", "a", "2") if len(model.backbone.encode(model.tokenizer, w)) == 1][:2]
    token = model.backbone.encode(model.tokenizer, word)[0]

    def prefer(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., token] += 100.0
        return output

    handle = model.llm_model.get_output_embeddings().register_forward_hook(prefer)
    try:
        own = lm.generate_until([request("generate_until", QUESTIONS[0], {"max_new_tokens": 1})])[0]
        assert own == word
        requests = [request("loglikelihood", QUESTIONS[0], f" {answer}") for answer in (own, other)]
        assert [greedy for _, greedy in lm.loglikelihood(requests)] == [True, False]
        lm.score_stop_token = True
        assert [greedy for _, greedy in lm.loglikelihood(requests)] == [False, False]  # it would go on, not stop
    finally:
        handle.remove()


def test_stop_token_scores_rank_as_rank_answers(lm):
    candidates = ["red", "blue", "green", "yes", "no", "circle", "2", "a red circle"]
    lm.score_stop_token = True
    for i, question in enumerate(QUESTIONS):
        scores = lm.loglikelihood([request("loglikelihood", question, " " + c, doc_id=i) for c in candidates])
        best = candidates[int(np.argmin([s for s, _ in scores]))]  # as lmms-eval's multiple_choice picks
        ranked = lm.model.rank_answers(processed(lm, [i]), [PROMPT.format(question)], candidates, len(candidates))
        assert [best] == ranked


# --------------------------------------------------------------------------------------- refusals
def test_a_stage1_model_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"model arch 'blip2' \(Blip2Qformer\) has no generate.*blip2_internlm"):
        adapter("cfg=blip2/tiny")


def test_bad_model_args_say_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="batch_size='auto'"):
        get_model("lavis_lite").create_from_arg_string("cfg=blip2_internlm/tiny", {"batch_size": "auto"})
    torch.save({"model": {}}, tmp_path / "lavis.pth")
    with pytest.raises(ValueError, match="stores no run config.*also give cfg="):
        adapter(f"checkpoint={tmp_path / 'lavis.pth'}")


def test_requests_it_cannot_answer_are_refused(lm):
    def two(doc: dict[str, Any]) -> list[Image.Image]:
        return [doc["image"], doc["image"]]

    cases = [(two, "has 2 images"), (lambda doc: [], "has 0 images"), (lambda doc: None, "has 0 images"),
             (lambda doc: ["/data/clip.mp4"], r"visual is a str \('/data/clip.mp4'\), not a PIL image")]
    for visual, message in cases:
        with pytest.raises(ValueError, match=f"task {TASK} \\({SPLIT} split\\) doc 0 {message}|{message}"):
            lm.generate_until([request("generate_until", "q", {}, visual=visual)])
        with pytest.raises(ValueError, match=message):
            lm.loglikelihood([request("loglikelihood", "q", "a", visual=visual)])
    with pytest.raises(ValueError, match="sampling.*--gen_kwargs do_sample=false,temperature=0"):
        lm.generate_until([request("generate_until", "q", {"temperature": 0.7})])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([request("generate_until_multi_round", "q", {})])


# ------------------------------------------------------------------------------------ the command
TASK_YAML = """task: {name}
dataset_path: {data}
dataset_kwargs: {{load_from_disk: true}}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_target: answer
"""
GENERATE_YAML = """output_type: generate_until
doc_to_text: "{{question}}"
generation_kwargs: {max_new_tokens: 5}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
"""
CHOICE_YAML = """output_type: multiple_choice
doc_to_text: "{{question}} Answer:"
doc_to_choice: [red, blue, green]
metric_list: [{metric: acc}]
"""


@pytest.mark.slow
def test_the_lmms_eval_command_runs_both_kinds_of_task(tmp_path, tiny_opt_dir):
    """``lmms-eval --model lavis_lite --model_args cfg=...,checkpoint=...`` on a generation task and a
    multiple-choice one (log-likelihoods) whose data sets are local (load_from_disk): nothing downloads."""
    datasets = pytest.importorskip("datasets")
    checkpoint = save_stage2(tmp_path, "opt", tiny_opt_dir)
    colors = ["red", "blue", "green", "red"]
    rows = {"image": [Image.new("RGB", (64, 64), c) for c in colors], "question": ["what color is it?"] * 4,
            "answer": colors}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    data = tmp_path / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n")
    (tasks / "gen.yaml").write_text(TASK_YAML.format(name="shapes_generate", data=data) + GENERATE_YAML)
    (tasks / "choice.yaml").write_text(TASK_YAML.format(name="shapes_choice", data=data) + CHOICE_YAML)
    lmms_eval = Path(sys.executable).with_name("lmms-eval")
    command = [str(lmms_eval), "--model", "lavis_lite", "--model_args",
               f"cfg={tmp_path / 'stage2.yaml'},checkpoint={checkpoint},prompt=Question: {{}} Short answer:",
               "--tasks", "shapes_generate,shapes_choice", "--include_path", str(tasks), "--device", "cpu",
               "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "Error during evaluation" not in run.stdout + run.stderr, run.stdout[-3000:]

    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"]
    assert "exact_match,none" in results["shapes_generate"] and "acc,none" in results["shapes_choice"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_shapes_choice.jsonl")).open()]
    assert len(samples) == 4
    for sample in samples:  # the (-log P, greedy) pairs reached the task intact: it picked the likeliest choice
        scores = [float(pair[0]) for pair in sample["filtered_resps"]]
        assert sample["acc"] == float(int(np.argmin(scores)) == colors.index(sample["target"]))
