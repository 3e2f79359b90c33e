"""Export to transformers (``lavis_lite/export.py``). A tiny stage-2 model of every LLM family (OPT, Qwen2,
InternLM2 as its Llama conversion, and the chat backbones InternLM2-chat and Qwen2-Instruct), trained a few
steps so that it answers and stops, is exported, loaded by ``Blip2ForConditionalGeneration`` and
``Blip2Processor`` (no remote code) and gives our pixels, our prompt layout (ids expected from a table here and
from the LLM's own chat template, not from the export code), our logits, our greedy and beam ids and texts; the
directory imported back (``model.pretrained``) gives our weights exactly. Also what export refuses, how it
treats its output directory, a merged LoRA, the command line."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lavis_lite.data.processors import BlipImageEvalConfig, BlipImageEvalProcessor
from lavis_lite.export import ExportError, export, main
from lavis_lite.models.blip2_llm import Blip2LLM
from tests.fixtures.llm_checkpoints import CHAT_LLMS, SHAPES_CORPUS, TINY_LLMS
from tests.models.test_blip2_llm import llm_node

transformers = pytest.importorskip("transformers")

QUERIES = 4  # the tiny Q-Former's
PROMPT = "what is this?"
PROMPTS = ("", PROMPT, "Question: how many circles are there? Short answer:")
CAPTIONS = ["a red circle", "a blue square"]
# Where each plain family puts its bos, written out here (official tokenizers): OPT keeps LAVIS's layout.
PLAIN_LAYOUT = {"opt": ("</s>", "after_queries"), "qwen2": (None, None), "internlm2": ("<s>", "before_queries")}
MARK = "<QUERIES>"  # where the image goes in a chat turn: before the prompt, inside the user message


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images() -> list[Image.Image]:
    """A red and a blue square image (the trained captions) and one of noise, 64 px as the tiny ViT wants."""
    noise = torch.randint(0, 256, (70, 90, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255)),
            Image.fromarray(noise.numpy())]


def pixels(pil: list[Image.Image], backend: str = "tensor") -> torch.Tensor:
    proc = BlipImageEvalProcessor(BlipImageEvalConfig(image_size=64, backend=backend))
    return torch.stack([proc(image) for image in pil])


def build(name: str, path: Path, **overrides: Any) -> Blip2LLM:
    """The tiny model on LLM ``name`` in float32; ``ln_vision_eps`` as the ViT's (HF has one eps for both)."""
    torch.manual_seed(0)
    node = llm_node(name, path, **{"ln_vision_eps": 1e-6, "max_txt_len": 96, **overrides})
    return Blip2LLM.from_config(node, warn_untrained=False)


def trained(name: str, path: Path, steps: int = 30) -> Blip2LLM:
    """``build`` trained on the two captions, the LLM too (frozen, the random tiny LLMs cannot fit them)."""
    model = build(name, path)
    model.llm_model.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = {"image": pixels(images()[:2]), "text_input": CAPTIONS, "prompt": [PROMPT] * 2}
    model.train()
    for _ in range(steps):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.llm_model.requires_grad_(False)
    return model.eval()


class Exported(NamedTuple):
    name: str
    source: Path  # the LLM's own directory
    model: Blip2LLM
    out: Path
    hf: Any  # Blip2ForConditionalGeneration
    processor: Any  # Blip2Processor


@pytest.fixture(scope="module", params=TINY_LLMS + CHAT_LLMS)
def exported(request, tmp_path_factory) -> Exported:
    source = request.getfixturevalue(f"tiny_{request.param}_dir")
    model = trained(request.param, source)
    out = export(model, tmp_path_factory.mktemp(f"export_{request.param}") / "hf")
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = transformers.Blip2Processor.from_pretrained(out, backend="pil")
    return Exported(request.param, source, model, out, hf, processor)


def expected_ids(e: Exported, prompt: str) -> list[int]:
    """The processor's ids for ``prompt`` in our layout: plain families from ``PLAIN_LAYOUT``, chat ones from the
    LLM's own ``chat_template`` rendering one user message (the image before its text)."""
    tokenizer, image = e.model.tokenizer, e.hf.config.image_token_index

    def encode(text: str) -> list[int]:  # special-token text (<|im_start|>, <s>) as its id
        return list(tokenizer([text], add_special_tokens=False)["input_ids"][0]) if text else []

    if e.name in PLAIN_LAYOUT:
        bos, place = PLAIN_LAYOUT[e.name]
        bos_ids = [] if bos is None else [tokenizer.convert_tokens_to_ids(bos)]
        first, after = (bos_ids, []) if place == "before_queries" else ([], bos_ids)
        return first + [image] * QUERIES + after + encode(prompt)
    config = json.loads((e.source / "tokenizer_config.json").read_text())
    turn = jinja2.Template(config["chat_template"]).render(
        messages=[{"role": "user", "content": MARK + prompt}], add_generation_prompt=True, bos_token="<s>")
    head, tail = turn.split(MARK)
    return encode(head) + [image] * QUERIES + encode(tail)


# ---------------------------------------------------------------------------------------- processor
def test_processor_gives_our_pixels_and_layout(exported):
    e = exported
    inputs = e.processor(images=images(), text=[PROMPT] * 3, return_tensors="pt")
    assert torch.equal(inputs.pixel_values, pixels(images(), "pil"))
    torchvision = transformers.Blip2Processor.from_pretrained(e.out, backend="torchvision")
    assert torch.equal(torchvision(images=images(), return_tensors="pt").pixel_values, pixels(images(), "tensor"))
    for prompt in PROMPTS:
        ids = e.processor(images=images()[2], text=prompt).input_ids[0]
        assert ids == expected_ids(e, prompt), prompt
    assert e.hf.config.num_query_tokens == QUERIES and e.hf.config.text_config.model_type != "internlm2"


def test_tokenizer_loads_without_remote_code_and_encodes_as_ours(exported):
    """The exported tokenizer (InternLM2's: converted from sentencepiece) gives our tokenizer's ids and text."""
    e = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(e.out)
    assert "auto_map" not in json.loads((e.out / "tokenizer_config.json").read_text())
    texts = [*SHAPES_CORPUS[:40], *PROMPTS, *CAPTIONS, " two  spaces", "\n", "12 circles.\n", "ünïcode ☃"]
    for text in texts:
        ids = e.model.backbone.encode(e.model.tokenizer, text) if text else []
        assert tokenizer([text], add_special_tokens=False).input_ids[0] == ids, text
        ours = e.model.tokenizer.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=True) == ours, text


# ------------------------------------------------------------------------------------------- logits
def test_logits_equal_ours(exported):
    e = exported
    rows = e.model.llm_model.get_output_embeddings().weight.shape[0]
    for image, caption in zip(images(), CAPTIONS + ["a green star"]):
        inputs = e.processor(images=image, text=PROMPT, return_tensors="pt")
        answer = e.model.backbone.encode_answer(e.model.tokenizer, caption)
        ids = torch.cat([inputs.input_ids, torch.tensor([answer])], 1)
        with torch.no_grad():
            theirs = e.hf(pixel_values=inputs.pixel_values, input_ids=ids).logits
            ours = e.model({"image": inputs.pixel_values, "text_input": [caption], "prompt": [PROMPT]},
                           return_outputs=True)["logits"]
        # an LLM without a spare embedding row (InternLM2) gets one for <image>: its logit is 0
        assert theirs.shape[-1] == rows + e.hf.config.lavis_lite["placeholder_rows"]
        torch.testing.assert_close(theirs[..., :rows], ours, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_ours(exported, num_beams):
    """HF's generate with the exported generation_config.json: our ids (stop token, padding after it) and,
    cut at the stop text, our answers."""
    e = exported
    inputs = e.processor(images=images(), text=[PROMPT] * 3, return_tensors="pt")
    config = e.model.generation_config(num_beams=num_beams, max_new_tokens=10, min_new_tokens=1, length_penalty=1.0)
    exported_config = copy.deepcopy(e.hf.generation_config)
    exported_config.update(num_beams=num_beams, max_new_tokens=10)
    with torch.no_grad():
        theirs = e.hf.generate(**inputs, generation_config=exported_config)[:, inputs.input_ids.shape[1]:]
        embeds, mask, _ = e.model.build_inputs(e.model.query_embeds(inputs.pixel_values), [PROMPT] * 3,
                                               padding_side="left")
        ours = e.model.llm_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
    assert theirs.tolist() == ours.tolist()
    assert e.model.stop_id in theirs[0].tolist()  # the trained answers end at our stop token
    answers = e.model.generate({"image": inputs.pixel_values, "prompt": [PROMPT] * 3}, num_beams=num_beams,
                               max_new_tokens=10)
    assert [e.model.postprocess(t) for t in e.processor.batch_decode(theirs, skip_special_tokens=True)] == answers
    assert answers[:2] == CAPTIONS


def test_plain_generate_stops_at_our_stop_token(exported):
    """Without ``generation_config=`` HF's BLIP-2 generates with its language model's defaults (from text_config):
    those have our eos ids, so greedy answers stop where ours do."""
    e = exported
    inputs = e.processor(images=images()[:2], text=[PROMPT] * 2, return_tensors="pt")
    with torch.no_grad():
        theirs = e.hf.generate(**inputs, max_new_tokens=10)[:, inputs.input_ids.shape[1]:]
    assert [e.model.postprocess(t) for t in e.processor.batch_decode(theirs, skip_special_tokens=True)] == CAPTIONS
    assert all(row[-1] in (e.model.stop_id, e.model.pad_id) for row in theirs.tolist())


def test_generation_config_is_ours(exported):
    e = exported
    config = e.hf.generation_config
    assert config.eos_token_id == list(dict.fromkeys([e.model.stop_id, e.model.tokenizer.eos_token_id]))
    assert config.pad_token_id == e.model.pad_id and not config.do_sample
    assert (config.num_beams, config.max_new_tokens, config.min_new_tokens) == (5, 30, 1)  # Blip2LLM.generate's
    assert e.hf.config.image_token_index in config.suppress_tokens


# --------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("llm_path", ["the export", "no local directory"])
def test_import_gives_back_the_same_weights(exported, llm_path):
    """As ``model.pretrained``; the LLM from the export itself, given as ``llm_path`` or because ``llm_path``
    is no local directory (the backbone then comes from config.json's ``lavis_lite.llm``)."""
    e = exported
    path = e.out if llm_path == "the export" else "not/a/directory"
    back = Blip2LLM.from_config(llm_node(e.name, path, pretrained=str(e.out), max_txt_len=96))
    assert back.cfg.llm == e.name and back.cfg.vit_model == "eva"
    ours, theirs = e.model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert back.bos_id == e.model.bos_id and back.stop_id == e.model.stop_id


# ------------------------------------------------------------------------------------ what is refused
def test_what_transformers_cannot_hold_is_refused(tiny_opt_dir, tmp_path):
    model = build("opt", tiny_opt_dir, ln_vision_eps=1e-5)  # LAVIS's ln_vision eps beside the ViT's 1e-6
    with pytest.raises(ExportError, match=r"ln_vision_eps=1e-05 but the image encoder's LayerNorms use 1e-06.*"
                                          r"--allow-eps-change"):
        export(model, tmp_path / "eps")
    model = build("opt", tiny_opt_dir)
    model.visual_encoder.blocks[1].mlp.act = torch.nn.SiLU()
    with pytest.raises(ExportError, match=r"differs from it \(visual_encoder.blocks.1.mlp.act: SiLU\(\) where the "
                                          r"EVA layout has GELU\(approximate='none'\)"):
        export(model, tmp_path / "act")
    model = build("opt", tiny_opt_dir, vit_model="clip_L", vit_depth=1, img_size=28)  # QuickGELU, a pre-norm, ...
    with pytest.raises(ExportError, match=r"vit_model=clip_L: .* visual_encoder.norm_pre: LayerNorm.* where the EVA "
                                          r"layout has Identity\(\)"):
        export(model, tmp_path / "clip")
    with pytest.raises(ExportError, match="text_only=true"):
        export(build("opt", tiny_opt_dir, text_only=True), tmp_path / "text_only")
    assert not any(tmp_path.iterdir())  # nothing written


def test_output_directory(exported, tmp_path):
    """Not into a non-empty directory; ``overwrite`` replaces an earlier export's files (stale ones too) and
    leaves other files alone, but not beside weight files it did not write."""
    e = exported
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        export(e.model, out)
    export(e.model, out, overwrite=True)
    config = json.loads((out / "config.json").read_text())
    config["lavis_lite"]["files"].append("model-00001-of-00002.safetensors")  # as if that export was sharded
    (out / "config.json").write_text(json.dumps(config))
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    export(e.model, out, overwrite=True, num_beams=2)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model-00001-of-00002.safetensors").exists()
    assert json.loads((out / "generation_config.json").read_text())["num_beams"] == 2
    (out / "pytorch_model.bin").write_text("someone else's")
    with pytest.raises(FileExistsError, match=r"holds \['pytorch_model.bin'\]"):
        export(e.model, out, overwrite=True)


def test_lora_is_merged_into_the_llm(tiny_qwen2_dir, tmp_path):
    model = build("qwen2", tiny_qwen2_dir, lora_r=4, lora_dropout=0.0).eval()
    with torch.no_grad():
        for name, param in model.llm_model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: the merge would change nothing
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    out = export(model, tmp_path / "hf")
    assert not any("lora" in key for key in load_file(out / "model.safetensors"))
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(out).eval()
    inputs = transformers.Blip2Processor.from_pretrained(out, backend="pil")(images=images()[0], text=PROMPT,
                                                                             return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model({"image": inputs.pixel_values, "text_input": [""], "prompt": [PROMPT]}, return_outputs=True)
    torch.testing.assert_close(theirs, ours["logits"][:, : theirs.shape[1]], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- command line
def test_command_line(tiny_internlm2_dir, tmp_path):
    """A project yaml and a checkpoint of our runner's form: the data set's eval image processor and the
    generation flags go into the directory; a non-empty --out is one error line."""
    from lavis_lite.models import load_model

    overrides = {"llm_path": str(tiny_internlm2_dir), "ln_vision_eps": 1e-6}
    model = load_model("blip2_internlm", "tiny", **overrides)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("llm_model.")}}, checkpoint)
    project = tmp_path / "project.yaml"
    project.write_text(json.dumps({"model": {"arch": "blip2_internlm", "model_type": "tiny", **overrides},
                                   "datasets": {"shapes_caption": {"vis_processor": {"eval": {
                                       "name": "blip_image_eval", "image_size": 64, "mean": [0.5] * 3,
                                       "std": [0.25] * 3}}}}}))
    args = ["--cfg-path", str(project), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"),
            "--num-beams", "3", "--options", "model.llm_dtype=float32"]
    out = main(args)
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(out)
    assert torch.equal(hf.query_tokens, model.query_tokens) and hf.generation_config.num_beams == 3
    image_processor = transformers.Blip2Processor.from_pretrained(out).image_processor
    assert (image_processor.size.height, image_processor.size.width) == (64, 64)
    assert list(image_processor.image_mean) == [0.5] * 3 and list(image_processor.image_std) == [0.25] * 3
    with pytest.raises(SystemExit, match="error: --out .* is not empty"):
        main(args)
    # a checkpoint of our runner (its resolved config stored) names its model: no --cfg-path
    stored = {"model": {"arch": "blip2_internlm", "model_type": "tiny", **overrides, "llm_dtype": "float32"}}
    torch.save({"model": torch.load(checkpoint)["model"], "config": json.dumps(stored)}, checkpoint)
    out = main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf2")])
    assert json.loads((out / "config.json").read_text())["lavis_lite"]["llm"] == "internlm2"
