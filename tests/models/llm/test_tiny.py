"""The tiny InternLM2 stand-in: its warm-up corpus speaks the text forms the pipeline feeds it, its
sequences are the ones Blip2LLM builds, and the built model is cached."""
import json

import torch

from lavis_lite.data.processors import pre_caption, pre_question
from lavis_lite.models import create_model
from lavis_lite.models.llm.internlm2_backbone import InternLM2Backbone
from lavis_lite.models.llm.tiny import ANSWER_PROMPT, TinyLLMSpec, build_tiny_internlm2, encode_example, shapes_corpus

QUICK = TinyLLMSpec(vocab_size=500, hidden_size=32, num_heads=2, num_kv_heads=1, warmup_steps=3, batch_size=4)


def test_corpus_uses_the_processed_train_text(shapes_root):
    annotations = shapes_root / "annotations"
    captions = {}
    for r in json.loads((annotations / "caption_train.json").read_text()):
        captions.setdefault(r["image"], set()).add(pre_caption(r["caption"]) + "\n")
    vqa = json.loads((annotations / "vqa_train.json").read_text())
    prompts = {ANSWER_PROMPT.format(pre_question(r["question"])) for r in vqa}
    assert any(r["question"] != pre_question(r["question"]) for r in vqa)  # cleaning changes something
    all_captions = set().union(*captions.values())

    corpus = shapes_corpus(shapes_root)
    qa = [ex for ex in corpus if any(s in prompts for s in ex)]
    assert len(qa) == 3 * len(vqa)  # per question: alone, after the longest caption, after a random one
    for record, group in zip(vqa, [qa[i : i + 3] for i in range(0, len(qa), 3)]):
        image_captions = captions[record["image"]]
        qa_pair = [ANSWER_PROMPT.format(pre_question(record["question"])),
                   max(set(record["answer"]), key=record["answer"].count) + "\n"]
        assert group[0] == qa_pair
        assert group[1] == [max(image_captions, key=len), *qa_pair]
        assert group[2][1:] == qa_pair and group[2][0] in image_captions
    pairs = [ex for ex in corpus if len(ex) == 2 and ex[1] in all_captions]
    assert pairs and all(ex[0] != ex[1] and any({ex[0], ex[1]} <= c for c in captions.values()) for ex in pairs)
    assert all(segment in prompts or segment.endswith("\n") for ex in corpus for segment in ex)


def test_warm_up_sequences_are_the_ones_blip2_llm_builds(shapes_root, tmp_path):
    """encode_example(prompt, answer) equals what Blip2LLM feeds the LLM after its image queries."""
    llm_dir = build_tiny_internlm2(shapes_root, tmp_path / "llm", QUICK)
    model = create_model("blip2_internlm", "tiny", llm_path=str(llm_dir))
    backbone = InternLM2Backbone()
    prompt, answer = ANSWER_PROMPT.format("how many shapes are there?"), "2"
    queries = torch.zeros(1, model.cfg.qformer.num_query_token, model.llm_proj.out_features)
    inputs, _, labels = model.build_inputs(queries, [prompt], [answer])
    # the ids behind the embeddings: embed every vocabulary id and match rows
    table = model.llm_model.get_input_embeddings().weight
    q = queries.shape[1]
    text_rows = torch.cat([inputs[0, :1], inputs[0, 1 + q:]])
    ids = [int((table - row).abs().sum(-1).argmin()) for row in text_rows]
    assert ids == encode_example(backbone, model.tokenizer, [prompt, answer + "\n"])
    assert labels[0, -1].item() == backbone.stop_token_id(model.tokenizer)


def test_built_llm_is_cached_and_rebuilt_when_the_spec_changes(shapes_root, tmp_path):
    out = tmp_path / "llm"
    build_tiny_internlm2(shapes_root, out, QUICK)
    weights = next(out.glob("*.safetensors"))
    first = weights.stat().st_mtime_ns
    build_tiny_internlm2(shapes_root, out, QUICK)
    assert weights.stat().st_mtime_ns == first  # reused
    build_tiny_internlm2(shapes_root, out, TinyLLMSpec(**{**QUICK.__dict__, "seed": 1}))
    assert next(out.glob("*.safetensors")).stat().st_mtime_ns != first
