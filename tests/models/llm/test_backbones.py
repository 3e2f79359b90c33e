"""Every registered LLM backbone, on a tiny checkpoint in its official format: loading, the stop token,
bos and pad conventions, generation that stops at the newline, a backbone registered by a user, errors.

Parametrized over ``LLMS.names()``, so a newly shipped backbone is tested as soon as it is registered
(and fails until it has a ``tiny_<name>_dir`` fixture and a row in ``EXPECTED``); the chat-template
backbones (``CHAT_LLMS``) have their own file, test_chat_template.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lavis_lite.models.llm import LLMBackbone, dtype_from_name
from lavis_lite.registry import LLMS
from tests.fixtures.llm_checkpoints import CHAT_LLMS, TINY_LLMS

BACKBONES = [name for name in LLMS.names() if name not in CHAT_LLMS]


@dataclass(frozen=True)
class Expected:
    """A family's conventions, as its official checkpoints have them."""

    model_class: str
    tokenizer_class: str
    bos: str | None  # token the family puts first; None: none
    pad: str
    eos: str
    official_ids: dict[str, int]  # ids every real checkpoint of the family has
    lavis_stop_is_right: bool  # is LAVIS's "first id of tokenizing '\n'" the newline token?
    period_glues_newline: bool  # does ".\n" tokenize as one token (so text + "\n" lacks the stop id)?


EXPECTED = {
    "opt": Expected("OPTForCausalLM", "GPT2Tokenizer", bos="</s>", pad="<pad>", eos="</s>",
                    official_ids={"bos": 2, "pad": 1, "eos": 2}, lavis_stop_is_right=True, period_glues_newline=False),
    "internlm2": Expected("LlamaForCausalLM", "InternLM2Tokenizer", bos="<s>", pad="</s>", eos="</s>",
                          official_ids={"bos": 1, "pad": 2, "eos": 2}, lavis_stop_is_right=False,
                          period_glues_newline=False),
    "qwen2": Expected("Qwen2ForCausalLM", "Qwen2Tokenizer", bos=None, pad="<|endoftext|>", eos="<|endoftext|>",
                      official_ids={}, lavis_stop_is_right=True, period_glues_newline=True),
}


def _expected(name: str) -> Expected:
    if name not in EXPECTED:
        pytest.fail(f"LLM backbone {name!r} is registered but has no row in EXPECTED in {__file__}; add its conventions")
    return EXPECTED[name]


def _load(name: str, path: Any, dtype: torch.dtype = torch.float32) -> tuple[LLMBackbone, Any, Any]:
    backbone = LLMS.get(name)()
    return backbone, backbone.load_model(str(path), dtype), backbone.load_tokenizer(str(path))


def test_every_shipped_backbone_has_a_tiny_checkpoint():
    """``any_llm`` loops over TINY_LLMS, so later tests cover every backbone only if this holds."""
    assert sorted(TINY_LLMS) == BACKBONES


@pytest.mark.parametrize("name", BACKBONES)
def test_loads_official_checkpoint_in_its_default_dtype(name, llm_checkpoint):
    exp = _expected(name)
    backbone = LLMS.get(name)()
    dtype = dtype_from_name(backbone.default_dtype)
    model = backbone.load_model(str(llm_checkpoint(name)), dtype)
    tok = backbone.load_tokenizer(str(llm_checkpoint(name)))
    assert type(model).__name__ == exp.model_class and type(tok).__name__ == exp.tokenizer_class
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert backbone.encode(tok, "a red circle") == tok(["a red circle"], add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize("name", BACKBONES)
def test_stop_token_is_the_newline(name, llm_checkpoint):
    exp = _expected(name)
    backbone = LLMS.get(name)()
    tok = backbone.load_tokenizer(str(llm_checkpoint(name)))
    stop = backbone.stop_token_id(tok)
    assert backbone.end_of_answer == "\n" and tok.decode([stop]) == "\n"
    assert backbone.encode(tok, "a red circle" + "\n")[-1] == stop
    for text in ("a red circle", "2", "there is a blue star left of a green square."):
        assert backbone.encode_answer(tok, text) == backbone.encode(tok, text) + [stop]
        assert tok.decode(backbone.encode_answer(tok, text)) == text + "\n"
    # Qwen2's pre-tokenizer glues "." to the newline: text + "\n" would never teach the model to stop.
    glued = backbone.encode(tok, "a blue star.\n")[-1] != stop
    assert glued == exp.period_glues_newline

    lavis_stop = tok(["\n"], add_special_tokens=False)["input_ids"][0][0]  # blip2_opt.py's eos_token_id
    if exp.lavis_stop_is_right:
        assert lavis_stop == stop
    else:  # the bug we avoid: sentencepiece's "\n" is ["▁", "<0x0A>"]; "▁" also starts every number
        assert lavis_stop != stop and tok.convert_ids_to_tokens(lavis_stop) == "▁"
        assert tok.convert_ids_to_tokens(stop) == "<0x0A>"
        assert backbone.encode(tok, "2")[0] == lavis_stop


@pytest.mark.parametrize("name", BACKBONES)
def test_bos_is_what_the_tokenizer_prepends(name, llm_checkpoint):
    exp = _expected(name)
    backbone = LLMS.get(name)()
    tok = backbone.load_tokenizer(str(llm_checkpoint(name)))
    bos = backbone.bos_token_id(tok)
    plain = backbone.encode(tok, "how many stars are there?")
    full = tok(["how many stars are there?"], add_special_tokens=True)["input_ids"][0]
    if exp.bos is None:
        assert bos is None and full == plain and tok.bos_token_id is None
        # the config names a bos anyway (Qwen2: <|endoftext|>); it is never put in front of text
        assert json.loads((llm_checkpoint(name) / "config.json").read_text())["bos_token_id"] is not None
    else:
        assert full == [bos] + plain
        assert bos == tok.bos_token_id == tok.convert_tokens_to_ids(exp.bos)
        assert bos == exp.official_ids.get("bos", bos)


@pytest.mark.parametrize("name", BACKBONES)
def test_pad_and_eos(name, llm_checkpoint):
    exp = _expected(name)
    backbone = LLMS.get(name)()
    tok = backbone.load_tokenizer(str(llm_checkpoint(name)))
    pad = backbone.pad_token_id(tok)
    assert pad == tok.pad_token_id == tok.convert_tokens_to_ids(exp.pad)
    assert tok.eos_token_id == tok.convert_tokens_to_ids(exp.eos)
    assert (pad, tok.eos_token_id) == (exp.official_ids.get("pad", pad), exp.official_ids.get("eos", tok.eos_token_id))
    # Documented hazard: InternLM2 and Qwen2 pad with eos, so padding is found by the attention mask only.
    assert (pad == tok.eos_token_id) == (name in ("internlm2", "qwen2"))
    assert pad != backbone.stop_token_id(tok)


# ------------------------------------------------------------------------------------------------
# Generation stops at the newline
# ------------------------------------------------------------------------------------------------

CAPTIONS = ("a red circle", "the blue square")
TAIL = "yes no yes no"  # what the taught model says after the newline unless generation stops there


def _greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def _teach(model: Any, seqs: list[list[int]], prompt_len: int, max_steps: int = 300) -> None:
    """A few Adam steps until greedy decoding from ``seq[:prompt_len]`` reproduces each ``seq``."""
    torch.manual_seed(0)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(max_steps):
        model.train()
        loss = sum(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss for s in seqs)
        optim.zero_grad()
        loss.backward()
        optim.step()
        model.eval()
        if step % 10 == 9 and all(_greedy(model, s[:prompt_len], len(s) - prompt_len) == s for s in seqs):
            return
    raise AssertionError(f"the tiny model did not learn {len(seqs)} sequences in {max_steps} steps (loss {loss.item():.3f})")


@pytest.fixture
def one_thread():
    """Tiny matmuls: extra threads only spin, and on a shared 2-core box make training 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", BACKBONES)
def test_generation_stops_at_the_newline(name, llm_checkpoint, one_thread):
    backbone, model, tok = _load(name, llm_checkpoint(name))
    stop, bos = backbone.stop_token_id(tok), backbone.bos_token_id(tok)
    prefix = [] if bos is None else [bos]
    seqs = [prefix + backbone.encode(tok, c + "\n" + TAIL) for c in CAPTIONS]
    prompt_len = len(prefix) + 1  # bos (if any) and the caption's first token
    _teach(model, seqs, prompt_len)

    for caption, seq in zip(CAPTIONS, seqs):
        answer = seq[: seq.index(stop) + 1]  # up to and including the newline
        prompt = torch.tensor([seq[:prompt_len]])
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                  pad_token_id=backbone.pad_token_id(tok))
        with torch.no_grad():
            out = model.generate(prompt, eos_token_id=stop, **kw)[0].tolist()
            # control: stopping at the family's eos instead, the taught model goes on past the newline
            on = model.generate(prompt, eos_token_id=tok.eos_token_id, **kw)[0].tolist()
        assert out == answer and out[-1] == stop
        assert tok.decode(out, skip_special_tokens=True) == caption + "\n"
        assert on[: len(seq)] == seq

        lavis_stop = tok(["\n"], add_special_tokens=False)["input_ids"][0][0]
        if lavis_stop != stop:  # InternLM2: LAVIS's stop id never ends the answer
            with torch.no_grad():
                lavis = model.generate(prompt, eos_token_id=lavis_stop, **kw)[0].tolist()
            assert lavis[: len(seq)] == seq


# ------------------------------------------------------------------------------------------------
# A backbone defined outside the library
# ------------------------------------------------------------------------------------------------


def test_backbone_registered_in_a_test_needs_no_library_change(tiny_qwen2_dir, monkeypatch):
    monkeypatch.setattr(LLMS, "_entries", dict(LLMS._entries))  # Registry has no unregister; restored after
    name = "test_only_qwen2_period"

    @LLMS.register(name)
    class PeriodQwen2(LLMBackbone):
        """Answers end with "." and the weights stay float32."""

        end_of_answer = "."
        default_dtype = "float32"

    backbone = LLMS.get(name)()
    model = backbone.load_model(str(tiny_qwen2_dir), dtype_from_name(backbone.default_dtype))
    tok = backbone.load_tokenizer(str(tiny_qwen2_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    stop = backbone.stop_token_id(tok)
    assert tok.decode([stop]) == "." and stop != LLMS.get("qwen2")().stop_token_id(tok)
    assert backbone.encode(tok, "a red circle.")[-1] == stop
    assert backbone.encode_answer(tok, "a red circle") == backbone.encode(tok, "a red circle.")
    assert backbone.bos_token_id(tok) is None and backbone.pad_token_id(tok) == tok.eos_token_id
    assert backbone.bos_before_queries


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_path_without_config_names_model_llm_path(name, tmp_path):
    backbone = LLMS.get(name)()
    for path in (tmp_path / "missing", tmp_path):  # not there; a directory without config.json
        msg = re.escape(f"model.llm_path={str(path)!r}: no config.json there; point it at a local checkpoint")
        with pytest.raises(FileNotFoundError, match=msg):
            backbone.load_model(str(path), torch.float32)
        with pytest.raises(FileNotFoundError, match=msg):
            backbone.load_tokenizer(str(path))


@pytest.mark.parametrize("name", BACKBONES)
def test_end_of_answer_that_is_no_single_token_is_refused(name, llm_checkpoint):
    tok = LLMS.get(name)().load_tokenizer(str(llm_checkpoint(name)))
    two_words = type("TwoWords", (LLMS.get(name),), {"end_of_answer": " red circle"})()
    with pytest.raises(ValueError, match=r"end_of_answer=' red circle': no single token .* decodes to it"):
        two_words.stop_token_id(tok)
