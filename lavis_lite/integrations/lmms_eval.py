"""The lmms-eval model ``lavis_lite``: any lavis_lite captioning/VQA model on lmms-eval's tasks (VQAv2, GQA,
TextVQA, COCO and NoCaps captions, MME, MMBench, SEED, ...), without a fork of lmms-eval::

    pip install -e '.[lmms]'
    lmms-eval --model lavis_lite --model_args cfg=<project yaml>,checkpoint=<weights> --tasks gqa

Registration: lmms-eval (0.7.3) reads ``ModelManifest`` objects from the entry-point group
``lmms_eval.models`` whenever ``lmms_eval.models`` is imported. setup.py points that group at
``lavis_lite_lmms_eval:MANIFEST``, which names this module's ``LavisLite``; lmms-eval imports this module only
when ``--model lavis_lite`` is asked for.

Model args (``--model_args key=value,...``):

- ``cfg``: a project yaml (its ``model:`` section: arch, model_type and overrides), a model type's yaml
  (``configs/models/<arch>/<model_type>.yaml``) or ``<arch>/<model_type>``. Optional when ``checkpoint`` is a
  lavis_lite runner checkpoint: its stored config names the arch.
- ``checkpoint``: weights loaded last, as ``load_model(..., checkpoint=...)`` (a runner checkpoint rebuilds the
  model it was trained with; also LAVIS ``.pth``, ``.safetensors``, a Hugging Face BLIP-2 directory).
- ``device`` (default ``cuda:$LOCAL_RANK``, else ``cpu``), ``batch_size`` (a number).
- ``prompt``: what the model is given for a request's context, as ``Blip2LLM.predict_answers``' ``prompt``
  (``"Question: {} Short answer:"``: ``{}`` is the context); default ``{}``, the context as lmms-eval gives it.
- ``num_beams`` (default 1: lmms-eval generates greedily), ``max_new_tokens``, ``min_new_tokens``,
  ``length_penalty``: generation settings where a request's ``gen_kwargs`` (the task's, or ``--gen_kwargs``)
  give none; unset ones take ``Blip2LLM.generate``'s defaults.
- ``score_stop_token`` (default false): see ``LavisLite.loglikelihood``.
- any other key: a model config override, as ``load_model(**overrides)`` (``llm_path=/models/opt-2.7b``,
  ``llm_dtype=float32``; nested keys dotted: ``qformer.num_hidden_layers=2``); a misspelled key fails.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Optional, Union

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

# resolve_model, stored_model_config: shared with lavis_lite.export; this module's names for them kept
from lavis_lite.models import load_model_and_preprocess, resolve_model, stored_model_config  # noqa: F401
from lavis_lite.registry import MODELS

logger = logging.getLogger(__name__)

NEEDS = ("generate", "query_embeds", "build_inputs")  # what the adapter calls on a model
# model.generate's settings that gen_kwargs and model args may give, and their types
GENERATION_KEYS = {"num_beams": int, "max_new_tokens": int, "min_new_tokens": int, "length_penalty": float}


# --------------------------------------------------------------------------------- which model
def check_generative(arch: str) -> None:
    """Refuse, before anything loads, an arch that cannot caption or answer (stage 1: ITC/ITM/ITG)."""
    cls = MODELS.get(arch)
    missing = [name for name in NEEDS if not hasattr(cls, name)]
    if missing:
        usable = [name for name in MODELS.names() if all(hasattr(MODELS.get(name), m) for m in NEEDS)]
        raise ValueError(f"model arch {arch!r} ({cls.__name__}) has no {', '.join(missing)}: lmms-eval needs a model "
                         f"that captions and answers from an LLM (a stage-2 arch: {', '.join(usable)}); use a "
                         "stage-1 checkpoint as the pretrained Q-Former of one of those")


def nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"qformer.num_hidden_layers": 2}`` -> ``{"qformer": {"num_hidden_layers": 2}}``."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def default_device() -> str:
    """The GPU of this process (lmms-eval's launchers set LOCAL_RANK), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def answer_targets(labels: torch.Tensor, lengths: list[int], stop_id: int, with_stop: bool) -> torch.Tensor:
    """``labels`` [B, L] of ``build_inputs`` (answer tokens, then the stop token, are each row's last targets)
    keeping as targets only row i's ``lengths[i]`` answer tokens, and the stop token if ``with_stop``; any
    other target ``build_inputs`` sets (LAVIS's OPT layout makes a lone bos one) is dropped."""
    targets = labels != -100
    from_end = targets.flip(1).cumsum(1).flip(1)  # at each target: how many targets from it to the row's end
    last = targets.cumsum(1).argmax(1)
    assert (labels[torch.arange(len(labels)), last] == stop_id).all(), "build_inputs ends answers with the stop"
    lengths = torch.tensor(lengths, device=labels.device).unsqueeze(1)
    keep = targets & (from_end >= (1 if with_stop else 2)) & (from_end <= lengths + 1)  # stop: from_end 1
    return torch.where(keep, labels, -100)


class LoglikelihoodResult(GenerationResult):
    """``(negative log-probability, greedy)`` of one loglikelihood request; unpacks like a tuple.

    Two workarounds for lmms-eval 0.7.3, whose ``lmms.loglikelihood`` docstring asks for the log-probability:
    - its multiple_choice tasks (``ConfigurableTask.process_results``) pick ``argmin`` of the scores, because its
      own models (llava, ...) return a loss; with log-probabilities every answer would be the least likely one.
      So the score is ``-log P``, the sum over the continuation's tokens (``acc_norm`` divides it by the
      continuation's length in characters, as lm-evaluation-harness does);
    - its evaluator passes every response through ``unwrap_generation_output``, which turns anything but a
      string or a ``GenerationResult`` into its ``str()`` (multiple_choice then fails on "(2.3, False)" for
      every model), and unwraps a ``GenerationResult`` to its ``text``: here the pair.
    """

    def __init__(self, nll: float, greedy: bool):
        super().__init__(text=(nll, greedy))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.text)


# ------------------------------------------------------------------------------------- adapter
class LavisLite(lmms):
    """lmms-eval's simple-model interface over a lavis_lite stage-2 model (``Blip2LLM``); model args in the
    module docstring. One image per request: multi-image, video and text-only requests raise."""

    is_simple = True

    def __init__(self, cfg: Optional[str] = None, checkpoint: Optional[str] = None, device: Optional[str] = None,
                 batch_size: Union[int, str] = 1, prompt: str = "{}", num_beams: int = 1,
                 max_new_tokens: Optional[int] = None, min_new_tokens: Optional[int] = None,
                 length_penalty: Optional[float] = None, score_stop_token: bool = False,
                 max_batch_size: Optional[int] = None, **overrides: Any) -> None:
        super().__init__()  # max_batch_size: lmms-eval's, for batch_size=auto (not supported)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number ('auto' is not supported)")
        self.batch_size = int(batch_size)
        arch, model_type, cfg_overrides = resolve_model(cfg, checkpoint)
        check_generative(arch)
        overrides = OmegaConf.to_container(OmegaConf.merge(cfg_overrides, nested(overrides)))
        self._device = torch.device(device or default_device())
        self.model, vis_processors, _ = load_model_and_preprocess(arch, model_type, is_eval=True, device=self._device,
                                                                  checkpoint=checkpoint, **overrides)
        self.vis_processor = vis_processors["eval"]
        self.prompt = prompt
        self.score_stop_token = bool(score_stop_token)
        given = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                     length_penalty=length_penalty)
        self.generation_defaults = {k: GENERATION_KEYS[k](v) for k, v in given.items() if v is not None}
        self._ignored_reported: set[str] = set()
        logger.info("lmms-eval model lavis_lite: %s/%s%s on %s", arch, model_type,
                    f" with {checkpoint}" if checkpoint else "", self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------ requests
    def doc(self, request: Instance) -> dict[str, Any]:
        """The data set row a request is about (``args``: ..., doc_id, task, split)."""
        doc_id, task, split = request.args[-3:]
        return self.task_dict[task][split][doc_id]

    def image(self, request: Instance) -> torch.Tensor:
        """The request's one image through the model type's eval processor: [3, H, W]."""
        doc_to_visual, (doc_id, task, split) = request.args[2], request.args[-3:]
        visuals = doc_to_visual(self.doc(request)) if callable(doc_to_visual) else doc_to_visual
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [] if visuals is None else [visuals]
        where = f"task {task} ({split} split) doc {doc_id}"
        if len(visuals) != 1:
            raise ValueError(f"{where} has {len(visuals)} images: the lavis_lite model (BLIP-2) answers about exactly "
                             "one, so multi-image, video and text-only tasks are not supported")
        if not isinstance(visuals[0], Image.Image):
            raise ValueError(f"{where}: its visual is a {type(visuals[0]).__name__} ({str(visuals[0])[:80]!r}), not "
                             "a PIL image; the lavis_lite model takes images only (no video or audio)")
        return self.vis_processor(visuals[0].convert("RGB"))

    def images(self, requests: list[Instance]) -> torch.Tensor:
        return torch.stack([self.image(r) for r in requests]).to(self._device)

    def format_prompt(self, context: str) -> str:
        """``context`` in the ``prompt`` model arg, as ``Blip2LLM.predict_answers`` formats a question."""
        return self.prompt.format(context) if "{}" in self.prompt else f"{self.prompt}{context}"

    def batches(self, requests: list[Instance], key: Any = None) -> Iterator[list[int]]:
        """Indices of ``requests`` in batches of ``batch_size`` that share ``key(request)``, in order."""
        groups: dict[Any, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(key(request) if key else None, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    # ---------------------------------------------------------------------------- generation
    def generation_settings(self, gen_kwargs: Optional[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        """(``model.generate`` keyword arguments, ``until`` strings) of a request's ``gen_kwargs``."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        do_sample, temperature = gen_kwargs.pop("do_sample", False), gen_kwargs.pop("temperature", 0)
        gen_kwargs.pop("top_p", None)  # matters only when sampling
        if do_sample or (temperature or 0) > 0:
            raise ValueError(f"gen_kwargs ask for sampling (do_sample={do_sample}, temperature={temperature}) but "
                             "lavis_lite decodes greedily or with beam search; run with --gen_kwargs "
                             "do_sample=false,temperature=0 (and num_beams=N for beam search)")
        settings = dict(self.generation_defaults)
        for key, cast in GENERATION_KEYS.items():
            value = gen_kwargs.pop(key, None)
            if value is not None:
                settings[key] = cast(value)
        ignored = sorted(set(gen_kwargs) - self._ignored_reported)
        if ignored:
            logger.warning("gen_kwargs %s are not lavis_lite generation settings (%s); ignored", ignored,
                           ", ".join(GENERATION_KEYS))
            self._ignored_reported.update(ignored)
        return settings, until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """``model.generate`` on each request's image and formatted context, with its ``gen_kwargs``; the text
        (already cut at the model's end of answer and stripped) is cut before the first ``until`` string.
        Requests with equal ``gen_kwargs`` are batched (left padding: the same outputs as one by one)."""
        outputs: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="lavis_lite generate", disable=self.rank != 0)
        for indices in self.batches(requests, key=lambda r: json.dumps(r.args[1], sort_keys=True, default=str)):
            batch = [requests[i] for i in indices]
            settings, until = self.generation_settings(batch[0].args[1])
            prompts = [self.format_prompt(r.args[0]) for r in batch]
            texts = self.model.generate({"image": self.images(batch), "prompt": prompts}, **settings)
            for i, request, text in zip(indices, batch, texts):
                for stop in until:
                    text = text.split(stop, 1)[0] if stop else text
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", request.args[:2], text)
            progress.update(len(batch))
        progress.close()
        return outputs

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        task = requests[0].task_name if requests else "?"
        raise NotImplementedError(f"task {task} is multi-round; the lavis_lite model answers one turn per image")

    # -------------------------------------------------------------------------- log-likelihood
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """(-log P(continuation | image, context), whether greedy decoding gives it) for each request, as
        ``LoglikelihoodResult`` (a pair; why negative, and why not a tuple: there).

        The continuation is scored as lavis_lite scores an answer (``Blip2LLM.rank_answers``, training):
        its tokens on their own after the prompt's, so its leading whitespace (lmms-eval's
        ``target_delimiter``, " ") is dropped. Without ``score_stop_token`` the sum covers the continuation's
        tokens only (lmms-eval's meaning: a prefix may score better than a longer candidate); with it, also the
        model's stop token after them, which is ``rank_answers``' score, so multiple-choice tasks pick the
        candidate ``inference_method="rank"`` would. Greedy: every scored token is the likeliest one among
        those ``generate`` may emit (the tokenizer's ids).
        """
        scores: list[Optional[LoglikelihoodResult]] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="lavis_lite loglikelihood", disable=self.rank != 0)
        for indices in self.batches(requests):
            batch = [requests[i] for i in indices]
            prompts = [self.format_prompt(r.args[0]) for r in batch]
            answers = [self.continuation(r).lstrip() for r in batch]
            for i, score in zip(indices, self.score(self.images(batch), prompts, answers)):
                scores[i] = score
            progress.update(len(batch))
        progress.close()
        return scores

    def continuation(self, request: Instance) -> str:
        target = request.args[1]  # a string, or the task's doc_to_target
        return str(target(self.doc(request)) if callable(target) else target)

    def score(self, images: torch.Tensor, prompts: list[str], answers: list[str]) -> list[LoglikelihoodResult]:
        """(-total log-probability, greedy) of each answer after its image and prompt, one padded pass."""
        model = self.model
        inputs, mask, labels = model.build_inputs(model.query_embeds(images), prompts, answers, truncate=False)
        lengths = [len(model.backbone.encode(model.tokenizer, a)) for a in answers]
        labels = answer_targets(labels, lengths, model.stop_id, self.score_stop_token)
        logp = model.llm_model(inputs_embeds=inputs, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        targets = labels[:, 1:]
        scored = targets != -100
        token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = torch.where(scored, token_logp, 0.0).sum(1)
        greedy = ((logp[..., : len(model.tokenizer)].argmax(-1) == targets) | ~scored).all(1)
        return [LoglikelihoodResult(-logprob, g) for logprob, g in zip(total.tolist(), greedy.tolist())]
