"""BLIP-2 stage 1 (tiny): losses and gradients, frozen ViT, attention behaviour in the model, string image
ids, inference helpers and variants, configs, checkpoint round trip, and 2-process gloo equivalence."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from lavis_lite import dist
from lavis_lite.config import ConfigError, available_model_types, load_yaml, merge_onto, model_config_path
from lavis_lite.models import losses
from lavis_lite.models.blip2_qformer import (
    Blip2FeatureExtractor,
    Blip2ImageTextMatching,
    Blip2Qformer,
    Blip2QformerConfig,
)
from tests.models.tiny_blip2 import free_port, make_batch, run_in_process_group, tiny_config, tiny_model

NO_DROPOUT = {"qformer": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
ARCHS = ("blip2", "blip2_feature_extractor", "blip2_image_text_matching")


# ------------------------------------------------------------------------------------------ training
def test_forward_backward_tiny():
    model = tiny_model().train()
    out = model(make_batch(3))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_lm"])
    out["loss"].backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    for name in ("ln_vision.weight", "temp", "itm_head.weight", "vision_proj.weight", "text_proj.weight",
                 "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                 "Qformer.cls.predictions.transform.dense.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    # frozen ViT: no gradients and eval mode even after train()
    assert all(not p.requires_grad and p.grad is None for p in model.visual_encoder.parameters())
    assert not model.visual_encoder.training and model.Qformer.training
    assert model.no_decay_names() == {"query_tokens"}


def test_unfrozen_vit_trains():
    model = tiny_model(freeze_vit=False).train()
    model(make_batch(2))["loss"].backward()
    assert model.visual_encoder.training
    assert model.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_string_and_int_image_ids_shape_the_itc_targets():
    model = tiny_model(**NO_DROPOUT).eval()
    model.negative_sampler = losses.hardest_negatives
    batch = make_batch(4)
    unique = {k: v.item() for k, v in model({**batch, "image_id": ["a_1", "a_2", "a_3", "a_4"]}).items()}
    as_ints = {k: v.item() for k, v in model({**batch, "image_id": [1, 2, 3, 4]}).items()}
    no_ids = {k: v.item() for k, v in model({**batch, "image_id": None}).items()}
    assert unique == pytest.approx(as_ints) and unique == pytest.approx(no_ids)
    repeated = model({**batch, "image_id": ["coco_1", "coco_1", "coco_2", "coco_3"]})
    assert repeated["loss_itc"].item() != pytest.approx(unique["loss_itc"])
    assert model({**batch, "image_id": torch.tensor([1, 1, 2, 3])})["loss_itc"].item() == \
        pytest.approx(repeated["loss_itc"].item())


def test_itm_negatives_in_forward_are_never_positive():
    model = tiny_model()
    seen = []

    def recording(sim, positive):
        picks = losses.sample_hard_negatives(sim, positive)
        seen.append(positive[torch.arange(len(picks)), picks])
        return picks

    model.negative_sampler = recording
    for seed in range(5):
        model(make_batch(4, seed=seed, image_ids=["x", "y", "x", "z"]))
    assert len(seen) == 10 and not torch.cat(seen).any()


def test_itg_uses_causal_text_over_queries_in_the_model():
    model = tiny_model(**NO_DROPOUT).eval()
    batch = make_batch(2)

    def lm_hidden(texts, image):
        image_embeds = model.encode_image(image)
        cache = model.query_pass(image_embeds, use_cache=True).past_key_values
        ids, mask = model.tokenize(texts)
        ids, _ = losses.lm_inputs(ids, model.tokenizer.bos_token_id, model.tokenizer.pad_token_id)
        full = torch.cat([torch.ones(2, model.num_query_token, dtype=mask.dtype), mask], dim=1)
        return model.Qformer.bert(ids, attention_mask=full, past_key_values=cache, is_decoder=True).last_hidden_state

    base = lm_hidden(["a red circle", "a blue star"], batch["image"])
    longer = lm_hidden(["a red circle on the left", "a blue star"], batch["image"])
    torch.testing.assert_close(base[0, :4], longer[0, :4])  # [DEC] a red circle: unaffected by what follows
    other_image = lm_hidden(["a red circle", "a blue star"], batch["image"].flip(0))
    assert not torch.allclose(base[0, 0], other_image[0, 0])  # [DEC] already sees the queries


def test_itc_passes_do_not_see_each_other_and_itm_sees_both():
    model = tiny_model(**NO_DROPOUT).eval()
    batch, other = make_batch(2), make_batch(2, seed=1, offset=3)
    image_a = model.extract_features(batch, "image")
    image_b = model.extract_features({**batch, "text_input": other["text_input"]}, "image")
    torch.testing.assert_close(image_a.image_embeds, image_b.image_embeds)
    text_a = model.extract_features(batch, "text")
    text_b = model.extract_features({**batch, "image": other["image"]}, "text")
    torch.testing.assert_close(text_a.text_embeds, text_b.text_embeds)
    mm_a = model.extract_features(batch, "multimodal").multimodal_embeds
    mm_b = model.extract_features({**batch, "text_input": other["text_input"]}, "multimodal").multimodal_embeds
    mm_c = model.extract_features({**batch, "image": other["image"]}, "multimodal").multimodal_embeds
    assert not torch.allclose(mm_a, mm_b) and not torch.allclose(mm_a, mm_c)


# ------------------------------------------------------------------------------- inference helpers
def test_feature_extractor_and_itm_variants_share_weights_and_shapes():
    base = tiny_model(seed=4).eval()
    extractor = tiny_model("blip2_feature_extractor", seed=4).eval()
    matcher = tiny_model("blip2_image_text_matching", seed=4).eval()
    assert isinstance(extractor, Blip2FeatureExtractor) and isinstance(matcher, Blip2ImageTextMatching)
    assert isinstance(extractor, Blip2Qformer) and isinstance(matcher, Blip2Qformer)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(extractor.state_dict()[key], value, msg=key)
    batch = make_batch(3)
    image = extractor(batch, mode="image")
    assert image.image_embeds.shape == (3, 4, 64) and image.image_embeds_proj.shape == (3, 4, 32)
    torch.testing.assert_close(image.image_embeds_proj.norm(dim=-1), torch.ones(3, 4))
    text = extractor(batch, mode="text")
    assert text.text_embeds.shape[:2] == text.text_embeds_proj.shape[:2] and text.text_embeds_proj.shape[-1] == 32
    assert text.image_embeds is None and text.multimodal_embeds is None
    assert extractor(batch).multimodal_embeds.shape == (3, 4, 64)
    with pytest.raises(ValueError, match="mode="):
        extractor(batch, mode="video")

    with torch.no_grad():
        logits = matcher(batch, match_head="itm")
        itc = matcher(batch, match_head="itc")
        image_embeds, image_feats = base.compute_image_features(batch["image"])
        ids, mask, text_feat = base.compute_text_features(batch["text_input"])
        score = base.itm_score(image_embeds, ids, mask)
    assert logits.shape == (3, 2) and itc.shape == (3,)
    assert image_embeds.shape == (3, 17, 64) and image_feats.shape == (3, 4, 32)
    assert ids.shape == mask.shape == (3, 16) and text_feat.shape == (3, 32)
    torch.testing.assert_close(score, logits[:, 1], rtol=1e-4, atol=1e-5)  # max_length padding is masked out
    torch.testing.assert_close(itc, torch.einsum("bqd,bd->bq", image_feats, text_feat).amax(1), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ configs
def test_every_yaml_validates_and_tiny_builds():
    for arch in ARCHS:
        assert set(available_model_types(arch)) >= {"pretrain", "pretrain_vitL", "coco", "tiny"}
        for model_type in available_model_types(arch):
            node = load_yaml(model_config_path(arch, model_type), arch)
            node.pop("preprocess")
            cfg = merge_onto(Blip2QformerConfig, node, "model")
            assert cfg.vit_model in ("eva_clip_g", "clip_L", "tiny")
    assert merge_onto(Blip2QformerConfig, {}, "model").qformer.num_query_token == 32
    with pytest.raises(ConfigError, match="num_query_tokens"):
        merge_onto(Blip2QformerConfig, {"qformer": {"num_query_tokens": 8}}, "model")
    with pytest.raises(ConfigError):
        merge_onto(Blip2QformerConfig, {"vit_model": "eva_clip_h"}, "model")


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab.txt there; point it at a local BERT tokenizer"):
        Blip2Qformer(tiny_config(tokenizer_path=str(tmp_path)))
    # the model type expects bert-base-uncased's vocabulary: the fix is the tokenizer's folder, not the size
    with pytest.raises(ValueError, match=r"has 167 tokens .* 30522-word BERT vocabulary.* point model\.tokenizer_path"
                                         r".* set model\.qformer\.vocab_size=null"):
        Blip2Qformer(tiny_config(qformer={"vocab_size": 30523}))
    with pytest.raises(ValueError, match="encoder_width=1408 but tiny features are 64 wide"):
        Blip2Qformer(tiny_config(qformer={"encoder_width": 1408}))
    with pytest.raises(ValueError, match=r"images are 32x32 px but model.img_size=64: .*image_size=64"):
        Blip2Qformer(tiny_config()).encode_image(torch.zeros(1, 3, 32, 32))


def test_lavis_style_checkpoint_round_trip(tmp_path):
    source = tiny_model(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("visual_encoder.")}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]  # as LAVIS checkpoints carry
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    target = tiny_model(seed=2, pretrained=str(tmp_path / "ckpt.pth"))
    for key, value in state.items():
        if key != "Qformer.bert.embeddings.position_ids":
            torch.testing.assert_close(target.state_dict()[key], value, msg=key)
    # our runner's checkpoints (trainable_state_dict) keep every name of a tied parameter, as LAVIS's do
    trainable = source.trainable_state_dict()
    tied = trainable["Qformer.cls.predictions.decoder.weight"]
    assert tied.data_ptr() == trainable["Qformer.bert.embeddings.word_embeddings.weight"].data_ptr()
    torch.save({"model": trainable}, tmp_path / "ours.pth")
    tiny_model(seed=3).load_checkpoint(tmp_path / "ours.pth")
    state["Qformer.bert.unknown.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="unexpected keys"):
        target.load_checkpoint(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------- distributed
# 2 ranks x 2 samples; "img_1" is on both ranks, so positives and negatives cross ranks. Captions have the
# same token count, so the LM loss (a per-rank token mean, as in LAVIS) averages like one process.
# rank 0 gets the first two, rank 1 the last two: different longest captions (10 and 9 tokens: text
# is padded across ranks), the same number of tokens (so per-rank mean losses average to the whole's)
CAPTIONS = ["a red circle", "a red star left of a blue circle", "a blue square on a striped background",
            "red star and blue"]
IDS = ["img_0", "img_1", "img_1", "img_2"]


def _full_batch():
    batch = make_batch(4, seed=7)
    return {**batch, "text_input": CAPTIONS, "image_id": IDS}


def _losses_and_grads(model, batch):
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def test_text_padded_to_the_longest_caption_gives_the_losses_of_max_length_padding():
    widths = []

    def tokenize(texts, max_length=None, padding="longest", force=None):
        ids, mask = Blip2Qformer.tokenize(model, texts, max_length, force or padding)
        widths.append(ids.shape[1])
        return ids, mask

    model = tiny_model(seed=0, **NO_DROPOUT).train()
    model.negative_sampler = losses.hardest_negatives
    model.tokenize = tokenize
    dynamic, dynamic_grads = _losses_and_grads(model, _full_batch())
    model.zero_grad()
    model.tokenize = lambda texts, max_length=None, padding=None: tokenize(texts, max_length, force="max_length")
    padded, padded_grads = _losses_and_grads(model, _full_batch())
    assert widths == [10, model.cfg.max_txt_len]  # [CLS] + 8 words + [SEP], then max_txt_len
    for key, value in padded.items():
        torch.testing.assert_close(dynamic[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in padded_grads.items():
        torch.testing.assert_close(dynamic_grads[key], value, rtol=1e-4, atol=1e-6, msg=key)


def _rank_worker(out_dir):
    rank = dist.get_rank()
    model = tiny_model(seed=0, **NO_DROPOUT).train()
    model.negative_sampler = losses.hardest_negatives
    full = _full_batch()
    local = {"image": full["image"][2 * rank: 2 * rank + 2], "text_input": full["text_input"][2 * rank: 2 * rank + 2],
             "image_id": full["image_id"][2 * rank: 2 * rank + 2]}
    out, grads = _losses_and_grads(model, local)
    out = {k: dist.all_reduce_mean(v) for k, v in out.items()}
    grads = {k: dist.all_reduce_mean(v) for k, v in grads.items()}  # what DDP applies
    if rank == 0:
        torch.save({"losses": out, "grads": grads}, out_dir / "two_ranks.pt")


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(run_in_process_group, args=(2, free_port(), _rank_worker, (tmp_path,)), nprocs=2)
    two = torch.load(tmp_path / "two_ranks.pt", weights_only=True)

    model = tiny_model(seed=0, **NO_DROPOUT).train()
    model.negative_sampler = losses.hardest_negatives
    out, grads = _losses_and_grads(model, _full_batch())
    for key, value in out.items():
        torch.testing.assert_close(two["losses"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(two["grads"]) == sorted(grads)
    assert "ln_vision.weight" in grads and "query_tokens" in grads and "temp" in grads
    for key, value in grads.items():
        torch.testing.assert_close(two["grads"][key], value, rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_size_pretrain_trains_on_gpu(bert_base_vocab_dir):
    """Random-weight ``pretrain`` model (EVA-CLIP-g in fp16 under autocast, frozen) on one GPU."""
    from omegaconf import OmegaConf

    node = load_yaml(model_config_path("blip2", "pretrain"), "pretrain")
    node.pop("preprocess")
    cfg = merge_onto(Blip2QformerConfig, OmegaConf.merge(node, {"tokenizer_path": str(bert_base_vocab_dir)}), "model")
    with torch.device("cuda"):
        model = Blip2Qformer(cfg).train()
    assert model.visual_encoder.blocks[0].attn.qkv.weight.dtype == torch.float16
    batch = make_batch(4, image_size=224)
    batch["image"] = batch["image"].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert model.query_tokens.grad is not None
    assert all(p.grad is None for p in model.visual_encoder.parameters())


@pytest.mark.random_vit_guard
def test_random_vit_is_refused(tmp_path):
    """A checkpoint without visual_encoder.* loaded into an encoder that has no weights yet would leave
    it random (the frozen encoder is not in trainable-only checkpoints): refused, saying what to set."""
    source = tiny_model(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("visual_encoder.")}
    torch.save({"model": state}, tmp_path / "no_vit.pth")
    torch.save({"model": source.state_dict()}, tmp_path / "full.pth")
    with pytest.raises(KeyError, match="model.vit_pretrained.*model.finetuned"):
        tiny_model(seed=2, pretrained=str(tmp_path / "no_vit.pth"))
    # pretrained (with the encoder) then finetuned (without): the encoder comes from the first
    model = tiny_model(seed=2, pretrained=str(tmp_path / "full.pth"), finetuned=str(tmp_path / "no_vit.pth"))
    torch.testing.assert_close(model.visual_encoder.patch_embed.proj.weight, source.visual_encoder.patch_embed.proj.weight)


def test_a_chinese_bert_initialises_the_qformer_and_trains_on_chinese_captions(tmp_path, shapes_root):
    """model.bert_init_path / model.tokenizer_path take any BERT folder: here one in bert-base-chinese's
    conventions (its own vocabulary size, one token per CJK character), written by transformers."""
    import json

    from transformers import BertConfig, BertForMaskedLM

    captions = [r["caption"] for r in json.loads((shapes_root / "annotations/caption_cn_train.json").read_text())]
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for text in captions for c in text if not c.isspace()})
    vocab = special + chars
    bert = tmp_path / "tiny_bert_chinese"
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(3)
    BertForMaskedLM(config).save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    reference = BertForMaskedLM.from_pretrained(bert).bert.embeddings.word_embeddings.weight

    model = tiny_model(bert_init_path=str(bert), tokenizer_path=str(bert))
    assert len(model.tokenizer) == len(vocab) + 1  # + [DEC]
    words = model.Qformer.bert.embeddings.word_embeddings.weight
    assert words.shape[0] == len(vocab) + 1 and torch.equal(words[: len(vocab)], reference)
    ids = model.tokenizer(captions[0]).input_ids[1:-1]
    assert model.tokenizer.unk_token_id not in ids
    assert len(ids) == len([c for c in captions[0] if not c.isspace()])  # a token per character
    batch = make_batch(4)
    batch["text_input"] = captions[:4]
    losses = model(batch)
    assert all(torch.isfinite(losses[k]) for k in ("loss", "loss_itc", "loss_itm", "loss_lm"))
