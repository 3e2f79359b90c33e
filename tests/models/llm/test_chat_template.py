"""Chat-format backbones (``internlm2_chat``, ``qwen2_instruct``) on tiny checkpoints holding their
special tokens in the official formats: InternLM2-chat's renamed sentencepiece pieces, the stop word,
the sequence ``build_inputs`` lays out (checked against ids written out here and against each
checkpoint's own ``chat_template``), base backbones unchanged, training and generation that stops at
"<|im_end|>", and the errors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import sentencepiece as spm
import torch

from lavis_lite.models.llm import LLMBackbone
from lavis_lite.models.llm.internlm2 import load_internlm2_tokenizer
from lavis_lite.registry import LLMS
from tests.fixtures.llm_checkpoints import CHAT_LLMS, INTERNLM2_CHAT_TOKENS, TINY_LLMS, LLMCheckpoint
from tests.models.test_blip2_llm import (OVERFIT, GenerateSpy, build, make_optim,  # noqa: F401
                                         solid_images, train_step)

pytestmark = pytest.mark.usefixtures("one_thread")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The text around a prompt, written out here (not taken from the backbones); the image queries go
# between the two parts.
TURN = {
    "internlm2_chat": (f"{IM_START}user\n", f"{IM_END}\n{IM_START}assistant\n"),
    "qwen2_instruct": (f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\n",
                       f"{IM_END}\n{IM_START}assistant\n"),
}
# bos, pad and eos of the official tokenizers: the stop word is eos for Qwen2-Instruct only
SPECIAL = {"internlm2_chat": ("<s>", "</s>", "</s>"), "qwen2_instruct": (None, "<|endoftext|>", IM_END)}
CAPTIONS = ["a red circle", "a blue square"]
ROOM = dict(max_txt_len=128)  # the tiny tokenizers spell "assistant" letter by letter


@pytest.fixture(params=CHAT_LLMS)
def chat_llm(request: pytest.FixtureRequest, llm_checkpoint) -> LLMCheckpoint:
    return LLMCheckpoint(request.param, llm_checkpoint(request.param))


def ids(tok: Any, text: str) -> list[int]:
    """``text``'s ids straight from the tokenizer (no bos)."""
    return list(tok([text], add_special_tokens=False)["input_ids"][0])


def chat_template_text(path: Path, prompt: str) -> str:
    """What the checkpoint's own ``chat_template`` renders for one user message, ready for the answer."""
    config = json.loads((path / "tokenizer_config.json").read_text())
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(config["chat_template"])
    return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                           bos_token=config["bos_token"] or "")


# ------------------------------------------------------------------------------------------ backbones
def test_every_chat_backbone_has_a_tiny_checkpoint():
    templated = [n for n in LLMS.names() if LLMS.get(n).prompt_template != LLMBackbone.prompt_template]
    assert templated == sorted(CHAT_LLMS) and not set(CHAT_LLMS) & set(TINY_LLMS)


def test_internlm2_chat_tokenizer_reads_renamed_pieces(tiny_internlm2_chat_dir):
    """internlm2-chat-* ships "<|im_end|>" as sentencepiece piece "[UNUSED_TOKEN_145]" (92542 of 92544),
    renamed by tokenizer_config.json's added_tokens_decoder; the config's name is the token both ways."""
    tok = load_internlm2_tokenizer(tiny_internlm2_chat_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_internlm2_chat_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    assert len(tok) == n and [sp.id_to_piece(i) for i in range(n - 6, n)] == list(INTERNLM2_CHAT_TOKENS)
    for i, name in enumerate(INTERNLM2_CHAT_TOKENS.values(), n - 6):
        assert tok.convert_tokens_to_ids(name) == i and tok.convert_ids_to_tokens(i) == name and i in tok.all_special_ids
    im_start, im_end = n - 1, n - 2
    text = f"{IM_START}user\n你好{IM_END}\n"
    assert tok.encode(text) == [1, im_start] + sp.encode("user\n你好") + [im_end] + sp.encode("\n")
    assert tok.decode(tok.encode(text)) == "<s>" + text and tok.decode([im_end]) == IM_END
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user\n你好 \n"
    assert sp.decode([im_end]) == "[UNUSED_TOKEN_145]"  # control: sentencepiece alone has the old name


def test_internlm2_tokenizer_refuses_tokens_past_the_vocabulary(tiny_internlm2_chat_dir, tmp_path):
    config = json.loads((tiny_internlm2_chat_dir / "tokenizer_config.json").read_text())
    n = spm.SentencePieceProcessor(model_file=str(tiny_internlm2_chat_dir / "tokenizer.model")).get_piece_size()
    config["added_tokens_decoder"][str(n)] = {"content": "<|extra|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").write_bytes((tiny_internlm2_chat_dir / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match=rf"added_tokens_decoder\[{n}\]='<\|extra\|>' is past the {n} pieces"):
        load_internlm2_tokenizer(tmp_path)


def test_chat_conventions(chat_llm):
    backbone = LLMS.get(chat_llm.name)()
    tok = backbone.load_tokenizer(str(chat_llm.path))
    bos, pad, eos = SPECIAL[chat_llm.name]
    stop = backbone.stop_token_id(tok)
    assert backbone.end_of_answer == IM_END and stop == tok.convert_tokens_to_ids(IM_END)
    assert tok.decode([stop]) == IM_END and tok.decode([stop], skip_special_tokens=True) == ""
    assert backbone.encode_answer(tok, "a red circle") == ids(tok, "a red circle") + [stop]
    assert backbone.bos_token_id(tok) == (None if bos is None else tok.convert_tokens_to_ids(bos))
    assert backbone.pad_token_id(tok) == tok.convert_tokens_to_ids(pad) != stop
    assert tok.eos_token_id == tok.convert_tokens_to_ids(eos)


@pytest.mark.parametrize("prompt", ["what color is the circle?", ""])
def test_template_is_the_checkpoints_chat_template(chat_llm, prompt):
    """Around the image queries, the text is exactly what the checkpoint's chat_template renders for one
    user message (an empty prompt still makes the whole turn)."""
    backbone = LLMS.get(chat_llm.name)()
    head, tail = backbone.format_prompt(prompt)
    assert (head, tail) == (TURN[chat_llm.name][0], prompt + TURN[chat_llm.name][1])
    bos = SPECIAL[chat_llm.name][0] or ""
    assert bos + head + tail == chat_template_text(chat_llm.path, prompt)


def test_base_backbones_keep_the_plain_layout():
    for name in TINY_LLMS:
        backbone = LLMS.get(name)()
        assert backbone.prompt_template == "{prompt}"
        assert backbone.format_prompt("what is it?") == ("", "what is it?") and backbone.format_prompt("") == ("", "")


# ------------------------------------------------------------------------------------------ sequences
def test_build_inputs_wraps_the_prompt_in_the_turn(chat_llm):
    """[bos] + head + queries + prompt + tail + answer + <|im_end|>, with ids tokenized here; labels only on
    the answer and <|im_end|>."""
    model = build(chat_llm, **ROOM)
    tok, q = model.tokenizer, model.num_query_token
    head_text, tail_text = TURN[chat_llm.name]
    stop = tok.convert_tokens_to_ids(IM_END)
    bos = [] if SPECIAL[chat_llm.name][0] is None else [tok.convert_tokens_to_ids(SPECIAL[chat_llm.name][0])]
    embed = model.llm_model.get_input_embeddings()
    queries = torch.randn(2, q, embed.embedding_dim)
    prompts, answers = ["what color is the circle?", ""], ["red", "there is a red circle left of a blue square."]
    with torch.no_grad():
        inputs, mask, labels = model.build_inputs(queries, prompts, answers)
        for i in range(2):
            before = bos + ids(tok, head_text)
            after = ids(tok, prompts[i] + tail_text)
            answer = ids(tok, answers[i]) + [stop]
            assert after[-len(ids(tok, tail_text)):] == ids(tok, tail_text)  # the prompt did not merge into the turn
            n = len(before) + q + len(after) + len(answer)
            assert mask[i].tolist() == [1] * n + [0] * (mask.shape[1] - n)
            expected = torch.cat([embed(torch.tensor(before)), queries[i], embed(torch.tensor(after + answer))])
            torch.testing.assert_close(inputs[i, :n], expected, rtol=0, atol=0)
            assert labels[i, :n].tolist() == [-100] * (len(before) + q + len(after)) + answer
            assert (labels[i, n:] == -100).all()


def test_base_backbones_build_the_plain_sequence(any_llm):
    """[bos] + queries + prompt + answer + stop (OPT: queries + [bos] + ...), as before chat templates."""
    model = build(any_llm)
    tok, q = model.tokenizer, model.num_query_token
    embed = model.llm_model.get_input_embeddings()
    queries = torch.randn(1, q, embed.embedding_dim)
    bos = [] if model.bos_id is None else [model.bos_id]
    first, after_queries = (bos, []) if any_llm.name != "opt" else ([], bos)
    for prompt in ("what color is the circle?", ""):
        prompt_ids = after_queries + (ids(tok, prompt) if prompt else [])
        answer = ids(tok, "red") + [tok.convert_tokens_to_ids("<0x0A>" if any_llm.name == "internlm2" else "Ċ")]
        with torch.no_grad():
            inputs, _, labels = model.build_inputs(queries, [prompt], ["red"])
            expected = torch.cat([embed(torch.tensor(first, dtype=torch.long)), queries[0],
                                  embed(torch.tensor(prompt_ids + answer))])
        torch.testing.assert_close(inputs[0], expected, rtol=0, atol=0)
        # LAVIS's OPT layout with no prompt: the bos after the queries is a target (as Blip2OPT's labels)
        bos_label = after_queries if not prompt else [-100] * len(after_queries)
        assert labels[0].tolist() == [-100] * (len(first) + q) + bos_label + [-100] * (len(prompt_ids) - len(
            after_queries)) + answer


# ---------------------------------------------------------------------------------- train, generate
def test_trains_then_generation_stops_at_im_end(chat_llm, monkeypatch):
    model = build(chat_llm, **ROOM, **OVERFIT)
    tok = model.tokenizer
    stop = tok.convert_tokens_to_ids(IM_END)
    assert model.stop_id == stop
    optim = make_optim(model, lr=1e-2)
    batch = {"image": solid_images(), "text_input": CAPTIONS, "prompt": ["what is in the image?"] * 2}
    ask = {"image": batch["image"], "prompt": batch["prompt"]}
    greedy = dict(num_beams=1, max_new_tokens=20)
    for step in range(200):
        loss = train_step(model, optim, batch, step)
        if step % 10 == 9 and model.eval().generate(ask, **greedy) == CAPTIONS:
            break
    model.eval()
    assert model.generate(ask, **greedy) == CAPTIONS, f"did not fit the captions in {step + 1} steps (loss {loss:.3f})"
    spy = GenerateSpy(model, monkeypatch)
    for i, caption in enumerate(CAPTIONS):
        assert model.generate({"image": batch["image"][i : i + 1], "prompt": batch["prompt"][:1]}, **greedy) == [caption]
        raw = spy.last()[0]
        # the answer's ids, then <|im_end|>, nothing after it, well before max_new_tokens
        assert raw == ids(tok, caption) + [stop] and len(raw) < greedy["max_new_tokens"]
        assert spy.calls[-1][0]["generation_config"].eos_token_id[0] == stop


# ------------------------------------------------------------------------------------------- errors
def test_stop_word_that_is_no_single_token_is_refused(chat_llm, tiny_opt_dir):
    backbone_cls = LLMS.get(chat_llm.name)
    tok = backbone_cls().load_tokenizer(str(chat_llm.path))
    two = type("TwoTokens", (backbone_cls,), {"end_of_answer": IM_END + "\n"})()
    with pytest.raises(ValueError, match=re.escape(r"TwoTokens.end_of_answer='<|im_end|>\n': no single token")):
        two.stop_token_id(tok)
    # a chat backbone on a checkpoint without its special tokens fails when the model is built
    with pytest.raises(ValueError, match=re.escape("end_of_answer='<|im_end|>': no single token of GPT2Tokenizer")):
        build(LLMCheckpoint("qwen2_instruct", tiny_opt_dir), **ROOM)


def test_max_txt_len_without_room_after_the_template_is_refused(tiny_qwen2_instruct_dir):
    with pytest.raises(ValueError, match=r"model.max_txt_len=32 leaves no room for answers: the prompt template of "
                                         r"llm 'qwen2_instruct' alone is \d+ tokens; raise model.max_txt_len"):
        build(LLMCheckpoint("qwen2_instruct", tiny_qwen2_instruct_dir))


def test_prompt_template_is_checked_when_the_class_is_defined():
    for template in ("<|im_start|>user\n<|im_end|>", "{prompt}{queries}", "{queries}{queries}{prompt}"):
        with pytest.raises(ValueError, match=re.escape(f"Bad.prompt_template={template!r}: it needs '{{prompt}}'")):
            type("Bad", (LLMBackbone,), {"prompt_template": template})


def test_chat_model_type_configs():
    from lavis_lite.config import load_yaml, model_config_path

    for arch, model_type, llm in (("blip2_internlm", "pretrain_internlm2_chat_1.8b", "internlm2_chat"),
                                  ("blip2_qwen2", "pretrain_qwen2_1.5b_instruct", "qwen2_instruct")):
        node = load_yaml(model_config_path(arch, model_type), model_type)
        assert node.llm == llm and node.max_txt_len > 32
