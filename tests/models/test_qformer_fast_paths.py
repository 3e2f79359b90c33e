"""The stage-1 step's work-saving paths (issue 16) against the path they replace, written out here.

- Image keys/values: each image's cross-attention keys/values are projected once
  (``BertModel.image_key_values``) and selected by index for the image pass and the 3b ITM pairs.
- Padding: only query and real text positions are computed (``TokenLayout``); the LM head runs on the
  positions that predict a label only.

``reference_bert`` / ``reference_losses`` below are the previous code (git history: ``qformer.py``
``BertModel.forward`` and ``blip2_qformer.py`` ``Blip2Qformer.forward``), written out with the model's
parameters and plain functional ops: every position, padding too, goes through every layer, and every
pass projects the image features it is given (ITM: 3b copies). They take no dropout, so the exactness
tests run in train mode with dropout probabilities 0 (dropout draws differ between any two paths); one
test runs with dropout on and checks shapes, finiteness and that gradients reach every trained part.
Tolerance: float32 on CPU, losses ``rtol=1e-5, atol=1e-6``, gradients ``rtol=1e-4, atol=1e-6`` (the
real-position rows are the same numbers; only matmul blocking over fewer rows differs).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lavis_lite import dist
from lavis_lite.models import losses
from lavis_lite.models.blip2_qformer import Blip2Qformer
from lavis_lite.models.qformer import ImageGroups, QFormer, QFormerConfig
from tests.models.tiny_blip2 import free_port, make_batch, run_in_process_group, tiny_model

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# 3 layers: cross-attention in layers 0 and 2, none in 1
QFORMER = {**NO_DROPOUT, "num_hidden_layers": 3}
# uneven lengths: 3 to 13 tokens with [CLS] and [SEP] (max_txt_len 16), so every batch is padded
CAPTIONS = ["a red circle on the left of a big blue square", "one", "the purple diamond",
            "two small green triangles at the top", "a star", "an orange circle at the bottom right of the image"]
# two ranks of two: 10 + 3 and 5 + 8 tokens, the same number of LM targets per rank (so the mean of the
# ranks' mean LM losses is the whole batch's)
TWO_RANK_CAPTIONS = ["two small green triangles at the top", "one", "the purple diamond", "a red circle on the left"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ the previous path
def _linear(module, x):
    return F.linear(x, module.weight, module.bias)


def _layer_norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _residual(module, x, residual):  # ResidualOutput without dropout
    return _layer_norm(module.LayerNorm, _linear(module.dense, x) + residual)


def _attention(module, hidden, source, mask, past=None):  # MultiHeadAttention without dropout
    def heads(x):
        return x.view(x.shape[0], x.shape[1], module.num_heads, -1).transpose(1, 2)

    query, key, value = heads(_linear(module.query, hidden)), heads(_linear(module.key, source)), \
        heads(_linear(module.value, source))
    if past is not None:
        key, value = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2).flatten(2), (key, value)


def reference_bert(bert, input_ids=None, attention_mask=None, query_embeds=None, image_embeds=None,
                   past_key_values=None, is_decoder=False, image_mask=None):
    """The padded BertModel.forward: ([B, L, H] at every position, per-layer self-attention (key, value))."""
    cfg = bert.config
    past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
    offset = past_len - cfg.num_query_token if past_len else 0
    num_queries = 0 if query_embeds is None else query_embeds.shape[1]
    emb = bert.embeddings
    if input_ids is None:
        hidden = query_embeds
    else:
        positions = torch.arange(offset, offset + input_ids.shape[1])
        hidden = emb.word_embeddings.weight[input_ids] + emb.position_embeddings.weight[positions][None]
        if query_embeds is not None:
            hidden = torch.cat([query_embeds, hidden], dim=1)
    hidden = _layer_norm(emb.LayerNorm, hidden)
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, past_len + length, dtype=torch.long)
    key_mask = attention_mask.bool()[:, None, None, :]
    if is_decoder:  # a query row sees the queries; a text row the queries and the text up to itself
        prefix = cfg.num_query_token if past_len else num_queries
        keys = torch.arange(past_len + length)
        rows = keys[past_len:]
        allowed = (keys[None, :] < prefix) | ((rows[:, None] >= prefix) & (keys[None, :] <= rows[:, None]))
        mask = allowed[None, None] & key_mask
    else:
        mask = key_mask
    presents = []
    for i, layer in enumerate(bert.encoder.layer):
        past = past_key_values[i] if past_key_values is not None else None
        attended, present = _attention(layer.attention.self, hidden, hidden, mask, past)
        attended = _residual(layer.attention.output, attended, hidden)
        presents.append(present)
        if num_queries == 0:
            hidden = _residual(layer.output, F.gelu(_linear(layer.intermediate.dense, attended)), attended)
            continue
        queries = attended[:, :num_queries]
        if layer.crossattention is not None:
            crossed, _ = _attention(layer.crossattention.self, queries, image_embeds,
                                    None if image_mask is None else image_mask.bool()[:, None, None, :])
            queries = _residual(layer.crossattention.output, crossed, queries)
        hidden = _residual(layer.output_query, F.gelu(_linear(layer.intermediate_query.dense, queries)), queries)
        if length > num_queries:
            text = attended[:, num_queries:]
            text = _residual(layer.output, F.gelu(_linear(layer.intermediate.dense, text)), text)
            hidden = torch.cat([hidden, text], dim=1)
    return hidden, tuple(presents)


def reference_lm_logits(qformer, hidden):
    head = qformer.cls.predictions
    transformed = _layer_norm(head.transform.LayerNorm, F.gelu(_linear(head.transform.dense, hidden)))
    return F.linear(transformed, head.decoder.weight, head.bias)


def reference_losses(model: Blip2Qformer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The previous Blip2Qformer.forward in one process: ITM projects the images of all 3b pairs, every
    pass runs padding positions, the LM head runs on every position."""
    bert, num_queries = model.Qformer.bert, model.num_query_token
    texts = batch["text_input"]
    b = len(texts)
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    image_embeds = model.encode_image(batch["image"])
    query_hidden, cache = reference_bert(bert, query_embeds=model.query_tokens.expand(b, -1, -1),
                                         image_embeds=image_embeds)
    image_feats = F.normalize(model.vision_proj(query_hidden), dim=-1)
    text_ids, text_mask = model.tokenize(texts, padding="longest")
    text_hidden, _ = reference_bert(bert, text_ids, text_mask)
    text_feat = F.normalize(model.text_proj(text_hidden[:, 0]), dim=-1)
    sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feat, image_feats.detach(), text_feat.detach(),
                                               model.temp)
    ids = losses.image_ids_to_tensor(batch["image_id"])
    positive = losses.positive_mask(b, 0, 1, ids, ids)
    loss_itc = losses.itc_loss(sim_i2t, sim_t2i, positive)

    with torch.no_grad():
        negative_image = model.negative_sampler(sim_t2i, positive)
        negative_text = model.negative_sampler(sim_i2t, positive)
    pair_ids = torch.cat([text_ids, text_ids, text_ids[negative_text]])
    pair_mask = torch.cat([text_mask, text_mask, text_mask[negative_text]])
    pair_images = torch.cat([image_embeds, image_embeds[negative_image], image_embeds])
    query_mask = torch.ones(3 * b, num_queries, dtype=pair_mask.dtype)
    pair_hidden, _ = reference_bert(bert, pair_ids, torch.cat([query_mask, pair_mask], dim=1),
                                    model.query_tokens.expand(3 * b, -1, -1), pair_images)
    loss_itm = losses.itm_loss(model.itm_head(pair_hidden[:, :num_queries]).mean(dim=1), num_positive=b)

    decoder_ids, labels = losses.lm_inputs(text_ids, model.tokenizer.bos_token_id, model.tokenizer.pad_token_id)
    lm_hidden, _ = reference_bert(bert, decoder_ids, torch.cat([query_mask[:b], text_mask], dim=1),
                                  past_key_values=cache, is_decoder=True)
    loss_lm = losses.lm_loss(reference_lm_logits(model.Qformer, lm_hidden), labels)
    return {"loss": loss_itc + loss_itm + loss_lm, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}


# ------------------------------------------------------------------------------------------ helpers
def cyclic_negatives(shift: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Negative sampler independent of the similarities (so float noise cannot change a pick): the row
    with global index g (its positive column; image ids are unique) picks column (g + shift) % N."""
    def sampler(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        own = positive.float().argmax(dim=1)
        picks = (own + shift) % positive.shape[1]
        assert not positive[torch.arange(len(picks)), picks].any()
        return picks
    return sampler


def stage1_batch(b: int, seed: int = 0, captions: list[str] = CAPTIONS) -> dict[str, Any]:
    batch = make_batch(b, seed=seed)
    return {**batch, "text_input": [captions[i % len(captions)] for i in range(b)],
            "image_id": [f"img_{i}" for i in range(b)]}


def model_for_tests(padding: str = "longest", seed: int = 0, **overrides: Any) -> Blip2Qformer:
    model = tiny_model(seed=seed, qformer=overrides.pop("qformer", QFORMER), **overrides).train()
    model.negative_sampler = cyclic_negatives(1)
    if padding == "max_length":  # as bench_train.py --text-padding max_length: LAVIS pads to max_txt_len
        model.tokenize = lambda texts, max_length=None, padding=None: Blip2Qformer.tokenize(
            model, texts, max_length, "max_length")
    return model


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(new) == sorted(old), f"{what}: parameters with gradients differ: {set(new) ^ set(old)}"
    for name, grad in old.items():
        torch.testing.assert_close(new[name], grad, **GRAD_TOL, msg=f"{what}: {name}")


# ------------------------------------------------------------------------------------------ the step
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_each_loss_and_its_gradients_equal_the_previous_path(padding):
    model = model_for_tests(padding)
    batch = stage1_batch(5)
    lengths = model.tokenize(batch["text_input"], padding="longest")[1].sum(dim=1)
    assert lengths.min() == 3 and lengths.max() == 13  # uneven: most positions of short captions are padding
    for key in ("loss_itc", "loss_itm", "loss_lm", "loss"):
        new = model(batch)
        new_grads = grads_of(model, new[key])
        old = reference_losses(model, batch)
        old_grads = grads_of(model, old[key])
        torch.testing.assert_close(new[key], old[key], **LOSS_TOL, msg=key)
        assert_same_grads(new_grads, old_grads, key)
    # the gradients reach what each loss trains
    assert {"query_tokens", "ln_vision.weight", "temp", "itm_head.weight",
            "Qformer.bert.encoder.layer.2.crossattention.self.value.weight",
            "Qformer.cls.predictions.transform.dense.weight"} <= set(new_grads)


def test_duplicate_and_same_rank_negatives_equal_the_previous_path():
    """Negatives that are all one image / one text: the pairs share those keys/values and gradients sum."""
    def sampler(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        picks = torch.ones(positive.shape[0], dtype=torch.long)  # column 1 ...
        picks[positive[:, 1]] = 2  # ... except for its own row
        return picks

    model = model_for_tests()
    model.negative_sampler = sampler
    batch = stage1_batch(4, seed=3)
    new = model(batch)
    new_grads = grads_of(model, new["loss"])
    old = reference_losses(model, batch)  # after the backward above: both clamp temp in place
    for key in new:
        torch.testing.assert_close(new[key], old[key], **LOSS_TOL, msg=key)
    assert_same_grads(new_grads, grads_of(model, old["loss"]), "loss")


def test_unfrozen_vit_gets_the_gradients_of_the_previous_path():
    model = model_for_tests(freeze_vit=False)
    batch = stage1_batch(4)
    new_grads = grads_of(model, model(batch)["loss"])
    old_grads = grads_of(model, reference_losses(model, batch)["loss"])
    assert any(name.startswith("visual_encoder.") for name in new_grads)
    assert_same_grads(new_grads, old_grads, "loss")


def test_dropout_on_trains_every_part():
    """Dropout draws cannot match between two paths: shapes, finiteness, and gradients everywhere."""
    model = model_for_tests(qformer={"num_hidden_layers": 3, "hidden_dropout_prob": 0.1,
                                     "attention_probs_dropout_prob": 0.1})
    model.negative_sampler = losses.sample_hard_negatives
    out = model(stage1_batch(6))
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    grads = grads_of(model, out["loss"])
    assert all(torch.isfinite(g).all() for g in grads.values())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trained if n not in grads or not grads[n].abs().sum() > 0] == []


def test_lm_loss_on_the_predicting_positions_equals_lm_loss():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (3, 6), generator=generator)
    ids[1, 4:] = 0  # padded
    ids[2, 2:] = 0
    _, labels = losses.lm_inputs(ids, bos_token_id=31, pad_token_id=0)
    logits = torch.randn(3, 6, 32, generator=generator)
    predicting, targets = losses.lm_targets(labels)
    assert predicting.tolist() == [[True] * 5 + [False], [True] * 3 + [False] * 3, [True] + [False] * 5]
    torch.testing.assert_close(losses.lm_loss_on_targets(logits[predicting], targets), losses.lm_loss(logits, labels))


# ------------------------------------------------------------------------------------- work done
def _count_rows(modules: dict[str, torch.nn.Module]):
    rows: dict[str, list[int]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: rows[name].append(args[0].shape[:-1].numel()))
               for name, m in modules.items()]
    return rows, handles


def test_images_are_projected_once_and_padding_is_never_computed():
    model = model_for_tests()
    batch = stage1_batch(5)
    b, num_queries = 5, model.num_query_token
    _, text_mask = model.tokenize(batch["text_input"], padding="longest")
    real = text_mask.sum(dim=1)
    layers = model.Qformer.bert.encoder.layer
    projected = []
    key_value = layers[0].crossattention.self.key_value
    layers[0].crossattention.self.key_value = lambda source, *args: projected.append(source.shape[:2]) or \
        key_value(source, *args)
    rows, handles = _count_rows({"text ffn": layers[1].intermediate.dense,
                                 "query ffn": layers[1].intermediate_query.dense,
                                 "lm head": model.Qformer.cls.predictions.transform.dense})
    model(batch)
    for handle in handles:
        handle.remove()
    n_patches = model.encode_image(batch["image"]).shape[1]
    assert projected == [(b, n_patches)]  # once per image (was: b in the image pass + 3b in ITM)
    negative_text = (torch.arange(b) + 1) % b  # cyclic_negatives(1)
    itm_text = 2 * int(real.sum()) + int(real[negative_text].sum())
    assert rows["text ffn"] == [int(real.sum()), itm_text, int(real.sum())]  # ITC text, ITM, ITG: no padding
    assert rows["query ffn"] == [b * num_queries, 3 * b * num_queries]
    assert rows["lm head"] == [int(real.sum()) - b]  # positions that predict a label: not [SEP], not padding


# -------------------------------------------------------------------------------- Q-Former level
def small_qformer() -> QFormer:
    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        vocab_size=21, max_position_embeddings=32, num_query_token=3, encoder_width=16,
                        **NO_DROPOUT)
    return QFormer(cfg).train()


def test_qformer_real_positions_and_gradients_equal_the_padded_path():
    model = small_qformer()
    bert = model.bert
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 3, 32, generator=generator, requires_grad=True)
    image = torch.randn(3, 7, 16, generator=generator, requires_grad=True)
    ids = torch.randint(5, 21, (3, 6), generator=generator)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    ids = ids.masked_fill(text_mask == 0, 0)
    full = torch.cat([torch.ones(3, 3, dtype=torch.long), text_mask], dim=1)
    real_full = full.bool()

    def compare(run_new, run_old, real):
        weights = torch.randn(run_old().shape, generator=generator)
        outs, grads = [], []
        for run in (run_new, run_old):
            model.zero_grad(set_to_none=True)
            queries.grad = image.grad = None
            out = run()
            (out * weights * real[..., None]).sum().backward()  # padding positions: nothing reads them
            outs.append(out[real])
            named = [*model.named_parameters(), ("queries", queries), ("image", image)]
            grads.append({n: p.grad.clone() for n, p in named if p.grad is not None})
        torch.testing.assert_close(outs[0], outs[1], **LOSS_TOL)
        assert_same_grads(grads[0], grads[1], "qformer")

    # text alone (ITC), queries + text (ITM), queries alone then causal text over their cache (ITG)
    compare(lambda: bert(ids, attention_mask=text_mask).last_hidden_state,
            lambda: reference_bert(bert, ids, text_mask)[0], text_mask.bool())
    compare(lambda: bert(ids, attention_mask=full, query_embeds=queries, encoder_hidden_states=image).last_hidden_state,
            lambda: reference_bert(bert, ids, full, queries, image)[0], real_full)

    def itg_new():
        cache = bert(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values
        return bert(ids, attention_mask=full, past_key_values=cache, is_decoder=True).last_hidden_state

    def itg_old():
        _, cache = reference_bert(bert, query_embeds=queries, image_embeds=image)
        return reference_bert(bert, ids, full, past_key_values=cache, is_decoder=True)[0]

    compare(itg_new, itg_old, text_mask.bool())
    # a shared projection selected per row equals projecting each row's copy
    kv = bert.image_key_values(image)
    index = torch.tensor([2, 0, 2])
    compare(lambda: bert(ids, attention_mask=full, query_embeds=queries, image_key_values=kv.select(index))
            .last_hidden_state,
            lambda: reference_bert(bert, ids, full, queries, image[index])[0], real_full)


def test_rows_grouped_by_image_equal_each_row_with_its_own_image_copy():
    """Cross-attention to shared keys/values: the first ``per_image`` rows of every image grouped
    (``ImageGroups``: one query sequence per image over its own keys/values), the other rows, or all rows
    when an image has none, with keys/values gathered per row. Each equals projecting each row's copy
    of its image, with masked image tokens."""
    model = small_qformer()
    bert = model.bert
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(4, 7, 16, generator=generator, requires_grad=True)
    image_mask = torch.ones(4, 7, dtype=torch.long)
    image_mask[1, 5:] = 0
    image_mask[3, 2:] = 0
    for rows, rest in (([0, 1, 2, 3, 2, 2, 1, 1, 0, 1, 2, 3], 4), ([0, 1, 2, 3, 3, 2, 1, 0], 0),
                       ([3, 3, 3, 3, 3, 3, 3, 0, 1], None)):
        index = torch.tensor(rows)
        groups = ImageGroups.of(index, 4)
        assert (groups is None) == (rest is None)  # image 2 has no row: all gather
        if groups is not None:  # two rows of each image grouped, image by image; every row once
            assert groups.per_image == 2 and len(groups.rest) == rest
            assert torch.equal(index[groups.grouped], torch.arange(4).repeat_interleave(2))
            assert sorted(torch.cat([groups.grouped, groups.rest]).tolist()) == list(range(len(rows)))
        queries = torch.randn(len(rows), 3, 32, generator=generator, requires_grad=True)
        weights = torch.randn(len(rows), 3, 32, generator=generator)
        outs, grads = [], []
        for run in (lambda: bert(query_embeds=queries, image_key_values=bert.image_key_values(image, image_mask)
                                 .select(index)).last_hidden_state,
                    lambda: reference_bert(bert, query_embeds=queries, image_embeds=image[index],
                                           image_mask=image_mask[index])[0]):
            model.zero_grad(set_to_none=True)
            queries.grad = image.grad = None
            out = run()
            (out * weights).sum().backward()
            outs.append(out)
            named = [*model.named_parameters(), ("queries", queries), ("image", image)]
            grads.append({n: p.grad.clone() for n, p in named if p.grad is not None})
        torch.testing.assert_close(outs[0], outs[1], **LOSS_TOL)
        assert_same_grads(grads[0], grads[1], f"rows {rows}")


def test_qformer_padding_outputs_are_zero_and_image_rows_must_match():
    model = small_qformer().eval()
    ids = torch.randint(5, 21, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = model.bert(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out[1, 2:], torch.zeros(2, 32)) and out[0].abs().sum() > 0
    kv = model.bert.image_key_values(torch.randn(3, 7, 16))
    with pytest.raises(ValueError, match="select one image per row"):
        model.bert(query_embeds=torch.randn(2, 3, 32), image_key_values=kv)
    with pytest.raises(ValueError, match="not both"):
        model.bert(query_embeds=torch.randn(3, 3, 32), image_key_values=kv, encoder_hidden_states=torch.randn(3, 7, 16))


# ------------------------------------------------------------------------------ two processes
def _two_rank_worker(out_dir):
    """Negatives all on the other rank (projected there, gradients sent back through the gather), then
    all on this rank (the gather's backward still runs on every rank: no hang)."""
    rank = dist.get_rank()
    results = {}
    for name, shift in (("remote", 2), ("local", 1)):
        model = model_for_tests()
        full = stage1_batch(4, seed=5, captions=TWO_RANK_CAPTIONS)
        local = {"image": full["image"][2 * rank: 2 * rank + 2], "text_input": full["text_input"][2 * rank: 2 * rank + 2],
                 "image_id": full["image_id"][2 * rank: 2 * rank + 2]}
        # global picks (g + 2) % 4 live on the other rank; "local": row g picks its rank-mate g ^ 1
        model.negative_sampler = cyclic_negatives(2) if name == "remote" else (
            lambda sim, positive: positive.float().argmax(dim=1) ^ 1)
        out = model(local)
        grads = grads_of(model, out["loss"])
        results[name] = ({k: dist.all_reduce_mean(v.detach()) for k, v in out.items()},
                         {k: dist.all_reduce_mean(v) for k, v in grads.items()})
    if rank == 0:
        torch.save(results, out_dir / "two_ranks.pt")


def test_negatives_from_the_other_rank_equal_one_process(tmp_path):
    mp.spawn(run_in_process_group, args=(2, free_port(), _two_rank_worker, (tmp_path,)), nprocs=2)
    two = torch.load(tmp_path / "two_ranks.pt", weights_only=True)
    for name, sampler in (("remote", cyclic_negatives(2)),
                          ("local", lambda sim, positive: positive.float().argmax(dim=1) ^ 1)):
        model = model_for_tests()
        model.negative_sampler = sampler
        batch = stage1_batch(4, seed=5, captions=TWO_RANK_CAPTIONS)
        old = reference_losses(model, batch)
        old_grads = grads_of(model, old["loss"])
        losses_two, grads_two = two[name]
        for key, value in old.items():
            torch.testing.assert_close(losses_two[key], value.detach(), **LOSS_TOL, msg=f"{name}: {key}")
        assert_same_grads(grads_two, old_grads, name)
