"""The tiny InternLM2 stand-in: its warm-up corpus speaks the text forms the pipeline feeds it, its
sequences are the ones Blip2LLM builds, the context half reads the right captions and scores only
the targets, and the built model is cached."""
import collections
import json
from pathlib import Path

import pytest
import torch

from lavis_lite.data.processors import pre_caption, pre_question
from lavis_lite.models import create_model
from lavis_lite.models.llm.internlm2_backbone import InternLM2Backbone
from lavis_lite.config import load_config
from lavis_lite.models.llm.tiny import (ANSWER_PROMPT, CAPTION_PROMPTS, QA_IN_CONTEXT_REPEATS, CaptionEncoder,
                                        TinyLLMSpec, _context_loss, bilingual_examples, build_tiny_internlm2,
                                        context_examples, encode_example, shapes_corpus, train_texts)

QUICK = TinyLLMSpec(vocab_size=500, hidden_size=32, num_heads=2, num_kv_heads=1, warmup_steps=3, batch_size=4,
                    bilingual_examples=2)
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def quick_llm(shapes_root, tmp_path_factory):
    """(backbone, tokenizer, train texts) of a ``QUICK`` tiny LLM built on the shapes data."""
    llm_dir = build_tiny_internlm2(shapes_root, tmp_path_factory.mktemp("llm"), QUICK)
    backbone = InternLM2Backbone()
    return backbone, backbone.load_tokenizer(str(llm_dir)), train_texts(shapes_root)


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
    # per question: alone, then QA_IN_CONTEXT_REPEATS times after the longest caption and after a random one
    assert len(qa) == (1 + 2 * QA_IN_CONTEXT_REPEATS) * len(vqa)
    counts = collections.Counter(tuple(ex) for ex in qa)
    contexts = collections.defaultdict(set)  # (prompt, answer) -> captions of the images asked it
    for record in vqa:
        qa_pair = (ANSWER_PROMPT.format(pre_question(record["question"])),
                   max(set(record["answer"]), key=record["answer"].count) + "\n")
        assert counts[qa_pair] >= 1
        # after the longest caption (any of equal length: a set's order changes with PYTHONHASHSEED)
        longest = max(len(c) for c in captions[record["image"]])
        after_longest = sum(counts[(c, *qa_pair)] for c in captions[record["image"]] if len(c) == longest)
        assert after_longest >= QA_IN_CONTEXT_REPEATS
        contexts[qa_pair] |= captions[record["image"]]
    assert all(ex[0] in contexts[tuple(ex[1:])] for ex in qa if len(ex) == 3)
    pairs = [ex for ex in corpus if len(ex) == 2 and ex[1] in all_captions and ex[0] != CAPTION_PROMPTS["en"]]
    assert pairs and all(ex[0] != ex[1] and any({ex[0], ex[1]} <= c for c in captions.values()) for ex in pairs)
    assert all(segment in prompts | set(CAPTION_PROMPTS.values()) or segment.endswith("\n")
               for ex in corpus for segment in ex)


def test_corpus_has_every_caption_alone_and_after_its_language_prompt(shapes_root):
    annotations = shapes_root / "annotations"
    corpus = collections.Counter(tuple(ex) for ex in shapes_corpus(shapes_root))
    for language, name in (("en", "caption_train.json"), ("zh", "caption_cn_train.json")):
        records = json.loads((annotations / name).read_text())
        for record in records[:50]:
            caption = pre_caption(record["caption"]) + "\n"
            assert corpus[(caption,)] >= 1 and corpus[(CAPTION_PROMPTS[language], caption)] >= 1, caption
    chinese = {pre_caption(r["caption"]) + "\n" for r in json.loads((annotations / "caption_cn_train.json").read_text())}
    restated = [ex for ex in corpus if len(ex) == 2 and set(ex) <= chinese]  # a Chinese caption after another
    assert len(restated) == len([ex for ex in corpus if len(ex) == 1 and ex[0] in chinese])


def test_bilingual_examples_read_either_language_and_caption_in_the_prompted_one(quick_llm):
    backbone, tokenizer, texts = quick_llm
    examples = bilingual_examples(backbone, tokenizer, texts)
    assert len(examples) == 2 * len(texts)
    text, (english, chinese) = next(iter(texts.values())), examples[:2]
    assert tokenizer.decode(english.source) == max(text.captions, key=len)
    assert tokenizer.decode(chinese.source) == max(text.captions_zh, key=len)
    assert chinese.restate == chinese.source + [backbone.stop_token_id(tokenizer)]
    assert english.targets == chinese.targets
    by_prompt = collections.defaultdict(list)
    for prompt, target in chinese.targets:
        by_prompt[tokenizer.decode(prompt)].append(tokenizer.decode(target[:-1]))
    assert by_prompt == {CAPTION_PROMPTS["en"]: text.captions, CAPTION_PROMPTS["zh"]: text.captions_zh}
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in caption) for caption in text.captions_zh)


@pytest.mark.parametrize("project,datasets", [
    ("caption_cn_stage2_shapes.yaml", {"shapes_caption_cn": "zh"}),
    ("caption_bilingual_stage2_shapes.yaml", {"shapes_caption": "en", "shapes_caption_cn": "zh"}),
])
def test_caption_projects_prompt_as_the_warm_up_taught(project, datasets):
    """The tiny LLM learns to caption a context in a language after that language's prompt: the
    projects must use the same prompts, or their captions come out in the warm-up's default."""
    cfg, _ = load_config(ROOT / "projects/blip2/train" / project)
    for name, language in datasets.items():
        assert cfg.datasets[name].prompt == CAPTION_PROMPTS[language], name


def test_context_examples_read_the_longest_caption_and_target_every_caption_and_answer(shapes_root, quick_llm):
    backbone, tokenizer, texts = quick_llm
    examples = context_examples(backbone, tokenizer, texts)
    images = {r["image"] for r in json.loads((shapes_root / "annotations" / "caption_train.json").read_text())}
    assert len(examples) == len(texts) == len(images)
    text, example = next(iter(texts.values())), examples[0]
    stop = backbone.stop_token_id(tokenizer)
    assert tokenizer.decode(example.source) == max(text.captions, key=len)
    assert example.restate == example.source + [stop]
    assert [tokenizer.decode(t[:-1]) for p, t in example.targets if not p] == text.captions
    asked = [(tokenizer.decode(p), tokenizer.decode(t[:-1])) for p, t in example.targets if p]
    assert asked == text.qa and all(t[-1] == stop for _, t in example.targets)
    assert text.captions_zh and len(text.captions_zh) == 3  # read for the bilingual half


def test_context_loss_is_the_target_tokens_cross_entropy_after_bos_and_vectors():
    """Checked against a per-token sum written out here: each target token's -log p after
    [bos] + vectors + prompt + the target's preceding tokens; prompts and padding carry no loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    encoder = CaptionEncoder(16, 2, num_vectors=3).eval()
    sources = [[5, 6, 7], [8, 9]]
    pairs = [([10, 11], [12, 13, 2]), ([], [14, 2])]
    loss = _context_loss(model, encoder, 1, sources, pairs)

    embed = model.get_input_embeddings()
    terms = []
    with torch.no_grad():
        for source, (prompt, target) in zip(sources, pairs):
            vectors = encoder(embed(torch.tensor([source])), torch.zeros(1, len(source), dtype=torch.bool))[0]
            for i, token in enumerate(target):
                text = embed(torch.tensor(prompt + target[:i], dtype=torch.long))
                inputs = torch.cat([embed(torch.tensor([1])), vectors, text])
                log_probs = model(inputs_embeds=inputs[None]).logits[0, -1].log_softmax(-1)
                terms.append(-log_probs[token])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


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
