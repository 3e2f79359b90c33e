"""A tiny InternLM2-architecture LLM for CPU runs: its own sentencepiece tokenizer and a short
text-only warm-up on the shapes captions and question-answer text, standing in for a pretrained
LLM that already speaks the answer format. Written in the official InternLM2 layout, so the real
loading path (``load_internlm2``) reads it.

    python -m lavis_lite.models.llm.tiny    # -> $LAVIS_LITE_CACHE/tiny_internlm2
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from lavis_lite.config import cache_dir
from lavis_lite.data.processors import pre_caption, pre_question
from lavis_lite.data.shapes import ensure_shapes
from lavis_lite.models.llm.base import LLMBackbone
from lavis_lite.models.llm.internlm2 import internlm2_config_to_llama, load_internlm2_tokenizer, save_internlm2
from lavis_lite.models.llm.internlm2_backbone import InternLM2Backbone

logger = logging.getLogger(__name__)

ANSWER_PROMPT = "Question: {} Short answer:"  # the VQA task's default prompt
BUILDER_VERSION = 2  # bump on any change to the corpus or the training, so cached copies are rebuilt


@dataclasses.dataclass
class TinyLLMSpec:
    vocab_size: int = 800
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    warmup_steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def shapes_corpus(shapes_root: str | Path) -> list[list[str]]:
    """The warm-up corpus, from the train split's text only (no image is read). An example is a
    list of segments, encoded as Blip2LLM encodes its sequences: a segment ending in a newline (the
    end-of-answer text) as a caption/answer target, any other as a prompt; captions and questions
    are cleaned as the data sets' text processors clean them (``pre_caption``, ``pre_question``),
    so stage 2 and VQA feed the LLM the text forms it was warmed up on. Examples: every caption
    (English and Chinese); every caption followed by another caption of the same image (the model
    learns to restate what its context describes, as stage 2 asks of the image queries); every
    "Question: q Short answer:" prompt with its answer, alone, after the longest (most complete)
    caption of its image and after a random one (the model learns to answer from its context, as a
    pretrained LLM reads a passage)."""
    rng = random.Random(0)
    annotations = Path(shapes_root) / "annotations"
    captions: dict[str, list[str]] = {}
    for record in json.loads((annotations / "caption_train.json").read_text()):
        captions.setdefault(record["image"], []).append(pre_caption(record["caption"]) + "\n")
    chinese = json.loads((annotations / "caption_cn_train.json").read_text())
    corpus = [[pre_caption(r["caption"]) + "\n"] for r in chinese]
    for caps in captions.values():
        for i, caption in enumerate(caps):
            corpus += [[caption], [caption, caps[(i + 1) % len(caps)]]]
    for record in json.loads((annotations / "vqa_train.json").read_text()):
        answer = max(set(record["answer"]), key=record["answer"].count)
        qa = [ANSWER_PROMPT.format(pre_question(record["question"])), answer + "\n"]
        caps = captions[record["image"]]
        corpus += [qa, [max(caps, key=len), *qa], [rng.choice(caps), *qa]]
    return corpus


def encode_example(backbone: LLMBackbone, tokenizer, segments: list[str]) -> list[int]:
    """``[bos] + segments``, each a caption/answer target (``encode_answer``) when it ends in the
    end-of-answer text, a prompt (``encode``) otherwise: the token sequences Blip2LLM builds."""
    ids = [backbone.bos_token_id(tokenizer)]
    for segment in segments:
        if segment.endswith(backbone.end_of_answer):
            ids += backbone.encode_answer(tokenizer, segment[: -len(backbone.end_of_answer)])
        else:
            ids += backbone.encode(tokenizer, segment)
    return ids


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """A BPE sentencepiece model with InternLM2's conventions: unk 0, bos 1, eos 2, byte fallback."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for text in texts for line in text.split("\n") if line]),
        model_writer=proto, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        num_threads=1, minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(proto.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "</s>", "unk_token": "<unk>"}))


def build_tiny_internlm2(shapes_root: str | Path, out_dir: str | Path, spec: TinyLLMSpec = TinyLLMSpec()) -> Path:
    """Write (or reuse, when its manifest matches) the warmed-up tiny LLM at ``out_dir``."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    manifest = {"version": BUILDER_VERSION, "spec": dataclasses.asdict(spec),
                "shapes": json.loads((Path(shapes_root) / "manifest.json").read_text())}
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()) == manifest:
        return out
    corpus = shapes_corpus(shapes_root)
    tmp = out.with_name(out.name + ".tmp")
    train_tokenizer(["".join(example) for example in corpus], spec.vocab_size, tmp)
    tokenizer = load_internlm2_tokenizer(tmp)
    official = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size, "intermediate_size": 4 * spec.hidden_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "max_position_embeddings": 256, "bias": False,
        "rms_norm_eps": 1e-5, "rope_theta": 10000, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(internlm2_config_to_llama(official))
    backbone = InternLM2Backbone()
    warm_up(model, [encode_example(backbone, tokenizer, example) for example in corpus], spec)
    save_internlm2(model, tokenizer, tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("tiny InternLM2 written to %s", out)
    return out


def warm_up(model: torch.nn.Module, sequences: list[list[int]], spec: TinyLLMSpec) -> None:
    """Next-token training on token ``sequences``, padding masked out of the loss."""
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    model.train()
    for step in range(spec.warmup_steps):
        batch = rng.sample(sequences, spec.batch_size)
        length = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in batch])
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.warmup_steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == spec.warmup_steps - 1:
            logger.info("tiny LLM warm-up step %d: loss %.3f", step, loss.item())
    model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-root", default=None, help="shapes data set (default: generated in the cache)")
    parser.add_argument("--out", default=None, help="output directory (default: <cache>/tiny_internlm2)")
    parser.add_argument("--warmup-steps", type=int, default=TinyLLMSpec.warmup_steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shapes_root = args.shapes_root or ensure_shapes()
    out = args.out or cache_dir() / "tiny_internlm2"
    build_tiny_internlm2(shapes_root, out, TinyLLMSpec(warmup_steps=args.warmup_steps))


if __name__ == "__main__":
    main()
