"""A tiny InternLM2-architecture LLM for CPU runs: its own sentencepiece tokenizer and a short
warm-up on the shapes captions and question-answer text (no image is read), standing in for a
pretrained LLM that already speaks the answer format and reads a context given as vectors, as a
pretrained LLM reads BLIP-2's image queries. Written in the official InternLM2 layout, so the real
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
from torch import nn

from lavis_lite.config import cache_dir
from lavis_lite.data.processors import pre_caption, pre_question
from lavis_lite.data.shapes import ensure_shapes
from lavis_lite.models.llm.base import LLMBackbone
from lavis_lite.models.llm.internlm2 import internlm2_config_to_llama, load_internlm2_tokenizer, save_internlm2
from lavis_lite.models.llm.internlm2_backbone import InternLM2Backbone

logger = logging.getLogger(__name__)

ANSWER_PROMPT = "Question: {} Short answer:"  # the VQA task's default prompt
# the caption prompts of the Chinese and bilingual stage-2 projects (datasets.<name>.prompt)
CAPTION_PROMPTS = {"en": "a photo of", "zh": "图片描述："}
BUILDER_VERSION = 4  # bump on any change to the corpus or the training, so cached copies are rebuilt
QA_IN_CONTEXT_REPEATS = 3  # answering from a context is what VQA asks, so it gets more weight


@dataclasses.dataclass
class TinyLLMSpec:
    vocab_size: int = 800
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    warmup_steps: int = 2400
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3
    context_fraction: float = 0.5  # of each batch read from context vectors (0: a text-only warm-up)
    context_vectors: int = 4  # = the tiny BLIP-2's image queries (configs/models/blip2_internlm/tiny.yaml)
    restate_fraction: float = 0.3  # context examples whose target is the encoded caption itself
    bilingual_examples: int = 8  # images per batch, on top, read in either language and captioned after a prompt
    seed: int = 0


@dataclasses.dataclass
class ImageText:
    """The cleaned text of one train image: its captions and its (prompt, answer) pairs."""

    captions: list[str]
    qa: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    captions_zh: list[str] = dataclasses.field(default_factory=list)

    @property
    def longest(self) -> str:
        return max(self.captions, key=len)  # the most complete description

    @property
    def longest_zh(self) -> str:
        return max(self.captions_zh, key=len)

    def by_language(self) -> tuple[tuple[str, list[str]], ...]:
        """``(("en", captions), ("zh", captions_zh))``: the keys of ``CAPTION_PROMPTS``."""
        return ("en", self.captions), ("zh", self.captions_zh)


def train_texts(shapes_root: str | Path) -> dict[str, ImageText]:
    """Per train image: captions cleaned as ``pre_caption`` cleans them, questions as ``pre_question``
    inside the VQA prompt, the majority answer; so stage 2 and VQA feed the LLM the text forms it
    was warmed up on."""
    annotations = Path(shapes_root) / "annotations"
    texts: dict[str, ImageText] = {}
    for record in json.loads((annotations / "caption_train.json").read_text()):
        texts.setdefault(record["image"], ImageText([])).captions.append(pre_caption(record["caption"]))
    for record in json.loads((annotations / "caption_cn_train.json").read_text()):
        texts[record["image"]].captions_zh.append(pre_caption(record["caption"]))
    for record in json.loads((annotations / "vqa_train.json").read_text()):
        answer = max(set(record["answer"]), key=record["answer"].count)
        texts[record["image"]].qa.append((ANSWER_PROMPT.format(pre_question(record["question"])), answer))
    return texts


def shapes_corpus(shapes_root: str | Path) -> list[list[str]]:
    """The text half of the warm-up. An example is a list of segments, encoded as Blip2LLM encodes
    its sequences: a segment ending in a newline (the end-of-answer text) as a caption/answer
    target, any other as a prompt. Examples, per train image and language (English, Chinese): every
    caption alone, after its language's caption prompt (``CAPTION_PROMPTS``), and followed by another
    caption of the same image (the model learns to restate what its context describes, as stage 2
    asks of the image queries); every "Question: q Short answer:" prompt with its answer alone, then
    ``QA_IN_CONTEXT_REPEATS`` times after the longest caption of its image and as many times after a
    random one (the model learns to answer from its context, as a pretrained LLM reads a passage)."""
    rng = random.Random(0)
    corpus = []
    for text in train_texts(shapes_root).values():
        for language, plain in text.by_language():
            captions = [caption + "\n" for caption in plain]
            for i, caption in enumerate(captions):
                corpus += [[caption], [CAPTION_PROMPTS[language], caption], [caption, captions[(i + 1) % len(captions)]]]
        captions = [caption + "\n" for caption in text.captions]
        for prompt, answer in text.qa:
            qa = [prompt, answer + "\n"]
            corpus.append(qa)
            for _ in range(QA_IN_CONTEXT_REPEATS):
                corpus += [[text.longest + "\n", *qa], [rng.choice(captions), *qa]]
    return corpus


class CaptionEncoder(nn.Module):
    """Warm-up only, then thrown away: a caption's token embeddings -> ``num_vectors`` context vectors
    (one transformer layer, then learned queries attending to it). The LLM learns to read the
    vectors in place of the caption, so it arrives at stage 2 able to read a context that is not
    tokens, as a pretrained LLM reads BLIP-2's image queries."""

    def __init__(self, hidden: int, num_heads: int, num_vectors: int, max_len: int = 128):
        super().__init__()
        self.position = nn.Parameter(torch.randn(max_len, hidden) * 0.02)
        self.layer = nn.TransformerEncoderLayer(hidden, num_heads, 2 * hidden, dropout=0.0, batch_first=True)
        self.queries = nn.Parameter(torch.randn(num_vectors, hidden) * 0.02)
        self.pool = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, embeds: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """embeds [B, L, H], padding [B, L] (True = pad) -> [B, num_vectors, H]."""
        x = self.layer(embeds + self.position[: embeds.shape[1]], src_key_padding_mask=padding)
        pooled, _ = self.pool(self.queries.expand(len(x), -1, -1), x, x, key_padding_mask=padding)
        return self.out(pooled)


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
    sequences = [encode_example(backbone, tokenizer, example) for example in corpus]
    texts = train_texts(shapes_root)
    warm_up(model, sequences, context_examples(backbone, tokenizer, texts), bilingual_examples(backbone, tokenizer, texts),
            backbone.bos_token_id(tokenizer), spec)
    save_internlm2(model, tokenizer, tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("tiny InternLM2 written to %s", out)
    return out


@dataclasses.dataclass
class ContextExample:
    """One train image for the context half of the warm-up, as token ids: the caption the
    ``CaptionEncoder`` reads and the (prompt, target) pairs the LLM may be asked after it."""

    source: list[int]
    restate: list[int]  # the source caption as a target
    targets: list[tuple[list[int], list[int]]]


def context_examples(backbone: LLMBackbone, tokenizer, texts: dict[str, ImageText]) -> list[ContextExample]:
    """One ``ContextExample`` per image of ``texts``: its longest English caption as the source, every
    English caption (empty prompt) and question-answer pair as targets."""
    examples = []
    for text in texts.values():
        targets = [([], backbone.encode_answer(tokenizer, caption)) for caption in text.captions]
        targets += [(backbone.encode(tokenizer, prompt), backbone.encode_answer(tokenizer, answer))
                    for prompt, answer in text.qa]
        examples.append(ContextExample(backbone.encode(tokenizer, text.longest),
                                       backbone.encode_answer(tokenizer, text.longest), targets))
    return examples


def bilingual_examples(backbone: LLMBackbone, tokenizer, texts: dict[str, ImageText]) -> list[ContextExample]:
    """Two ``ContextExample`` per image of ``texts``, one read from its longest English caption, one from
    its longest Chinese caption; the targets of both are every caption of the image in both languages,
    each after its language's caption prompt (``CAPTION_PROMPTS``): the prompt, not the context, says
    which language to write."""
    examples = []
    for text in texts.values():
        targets = [(backbone.encode(tokenizer, CAPTION_PROMPTS[language]), backbone.encode_answer(tokenizer, caption))
                   for language, captions in text.by_language() for caption in captions]
        for source in (text.longest, text.longest_zh):
            examples.append(ContextExample(backbone.encode(tokenizer, source),
                                           backbone.encode_answer(tokenizer, source), targets))
    return examples


def _pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] (pad id 0, never a target) and the attention mask."""
    length = max(len(ids) for ids in sequences)
    ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in sequences])
    mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in sequences])
    return ids, mask


@dataclasses.dataclass
class _Segment:
    """One sequence of a packed step: its input ids (0 at the context-vector slots ``1..vectors``)
    and the next-token targets of its positions from ``first_target`` on."""

    ids: list[int]
    vectors: int
    first_target: int
    targets: list[int]


def _pack(lengths: list[int]) -> tuple[list[tuple[int, int]], int, int]:
    """First-fit decreasing into rows as wide as the longest sequence: ``(row, start)`` per
    sequence, the number of rows and the width."""
    width = max(lengths)
    used: list[int] = []  # per row, its first free column
    places: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, n in enumerate(used) if n + lengths[i] <= width), len(used))
        if row == len(used):
            used.append(0)
        places[i] = (row, used[row])
        used[row] += lengths[i]
    return places, len(used), width


def _packed_losses(model: nn.Module, encoder: CaptionEncoder, bos: int, text: list[list[int]],
                   halves: list[tuple[list[list[int]], list[tuple[list[int], list[int]]]]]) -> list[torch.Tensor]:
    """``[text loss, one loss per context half]`` from one encoder pass and one LLM pass.

    The text loss is the next-token loss on every token of ``text``; a half ``(sources, pairs)``
    lays out ``[bos] + encoder(source) + prompt + target`` per image (Blip2LLM's layout, the vectors
    in the place of the image queries) and scores the targets only. Each loss is its own mean, as
    if each group were its own padded batch. The sequences, minus their last token (it predicts
    nothing), are packed several to a row of [rows, width] with position ids restarting per sequence
    and a block-diagonal causal mask; so no padding up to the longest of a batch, and the LM head
    runs only on positions that have a target. A group without sequences gives a zero loss.
    """
    embed = model.get_input_embeddings()
    sources = [source for half_sources, _ in halves for source in half_sources]
    k = encoder.queries.shape[0]
    segments = [_Segment(ids[:-1], 0, 0, ids[1:]) for ids in text]
    segments += [_Segment([bos] + [0] * k + (prompt + target)[:-1], k, k + len(prompt), target)
                 for _, pairs in halves for prompt, target in pairs]
    places, rows, width = _pack([len(segment.ids) for segment in segments])
    ids, positions = [0] * (rows * width), [0] * (rows * width)
    sequence = [-1] * (rows * width)  # padding: its own sequence, so no row of the mask is empty
    vector_slots, target_slots, targets = [], [], []
    for i, (segment, (row, start)) in enumerate(zip(segments, places)):
        at = row * width + start
        ids[at: at + len(segment.ids)] = segment.ids
        positions[at: at + len(segment.ids)] = range(len(segment.ids))
        sequence[at: at + len(segment.ids)] = [i] * len(segment.ids)
        vector_slots += range(at + 1, at + 1 + segment.vectors)
        target_slots += range(at + segment.first_target, at + segment.first_target + len(segment.targets))
        targets += segment.targets
    inputs = embed(torch.tensor(ids))  # [rows * width, H]
    if sources:
        source, source_mask = _pad(sources)
        vectors = encoder(embed(source), source_mask == 0)
        inputs = inputs.index_put((torch.tensor(vector_slots),), vectors.flatten(0, 1))
    sequence_ids = torch.tensor(sequence).view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (sequence_ids[:, :, None] == sequence_ids[:, None, :]) & causal
    # additive float mask: what both the sdpa and the eager attention of transformers add to the scores
    mask = torch.zeros(allowed.shape, dtype=inputs.dtype).masked_fill(~allowed, torch.finfo(inputs.dtype).min)
    hidden = model.get_decoder()(inputs_embeds=inputs.view(rows, width, -1), attention_mask=mask[:, None],
                                 position_ids=torch.tensor(positions).view(rows, width), use_cache=False
                                 ).last_hidden_state
    logits = model.get_output_embeddings()(hidden.flatten(0, 1)[torch.tensor(target_slots)])
    losses = F.cross_entropy(logits, torch.tensor(targets), reduction="none")
    counts = [sum(len(ids) - 1 for ids in text)] + [sum(len(target) for _, target in pairs) for _, pairs in halves]
    return [part.mean() if len(part) else torch.zeros(()) for part in losses.split(counts)]


def _context_loss(model: nn.Module, encoder: CaptionEncoder, bos: int, sources: list[list[int]],
                  pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """``[bos] + encoder(source) + prompt + target``, the layout of Blip2LLM with the vectors in the
    place of the image queries; loss on the targets only."""
    return _packed_losses(model, encoder, bos, [], [(sources, pairs)])[1]


def _sample_pairs(rng: random.Random, images: list[ContextExample], restate_fraction: float
                  ) -> list[tuple[list[int], list[int]]]:
    """Per image: its source restated (empty prompt) with ``restate_fraction``, else one of its targets."""
    return [([], ex.restate) if rng.random() < restate_fraction else rng.choice(ex.targets) for ex in images]


def warm_up(model: nn.Module, sequences: list[list[int]], examples: list[ContextExample],
            bilingual: list[ContextExample], bos: int, spec: TinyLLMSpec) -> None:
    """Next-token training; of each batch, ``spec.context_fraction`` are train images read through a
    ``CaptionEncoder`` trained with the LLM, the rest are text ``sequences``. An image's target is,
    with ``spec.restate_fraction``, the encoded caption itself (a strong signal that makes the LLM
    read the vectors at all), else one of its captions or answers (what stage 2 and VQA ask of the
    image queries). On top, ``spec.bilingual_examples`` images of ``bilingual`` per batch, targets
    drawn the same way: so the English half keeps its share, and the LLM learns to caption a context
    in the language its prompt asks for. All of a step's sequences go through one packed forward
    (``_packed_losses``)."""
    rng = random.Random(spec.seed)
    encoder = CaptionEncoder(spec.hidden_size, spec.num_heads, spec.context_vectors)
    optimizer = torch.optim.AdamW([*model.parameters(), *encoder.parameters()], lr=spec.lr, weight_decay=0.0)
    n_context = round(spec.batch_size * spec.context_fraction)
    model.train()
    for step in range(spec.warmup_steps):
        text = rng.sample(sequences, spec.batch_size - n_context)
        halves = []
        for images in (rng.sample(examples, n_context), rng.sample(bilingual, spec.bilingual_examples)):
            if images:  # each half its own mean: the bilingual images do not dilute the English ones
                halves.append(([ex.source for ex in images], _sample_pairs(rng, images, spec.restate_fraction)))
        text_loss, *context_losses = _packed_losses(model, encoder, bos, text, halves)
        context_loss = sum(context_losses, torch.zeros(()))
        for group in optimizer.param_groups:  # cosine decay to 0
            group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.warmup_steps))
        optimizer.zero_grad()
        (text_loss + context_loss).backward()
        optimizer.step()
        if step % 100 == 0 or step == spec.warmup_steps - 1:
            logger.info("tiny LLM warm-up step %d: text loss %.3f, context loss %.3f", step, text_loss.item(),
                        context_loss.item())
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
