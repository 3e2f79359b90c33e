"""Q-Former: LAVIS parameter names, attention masks (as tensors and by behaviour), KV cache, BERT init."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from lavis_lite.models.qformer import QFormer, QFormerConfig, init_from_bert, self_attention_mask

Q, T = 3, 5  # queries, text tokens


def small_cfg(**overrides) -> QFormerConfig:
    fields = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=21,
                  max_position_embeddings=32, num_query_token=Q, encoder_width=16, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return QFormerConfig(**{**fields, **overrides})


def small_qformer(seed: int = 0, **overrides) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(small_cfg(**overrides)).eval()


def inputs(seed: int = 0, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, Q, 32, generator=generator)
    image = torch.randn(batch, 7, 16, generator=generator)
    ids = torch.randint(5, 21, (batch, T), generator=generator)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[1, -2:] = 0  # second row padded
    ids[1, -2:] = 0
    return queries, image, ids, mask


def full_mask(text_mask):
    return torch.cat([torch.ones(text_mask.shape[0], Q, dtype=torch.long), text_mask], dim=1)


# ------------------------------------------------------------------------------------- names
def test_parameter_names_are_lavis_names():
    names = set(small_qformer().state_dict())
    for key in ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.output.dense.weight", "bert.encoder.layer.0.attention.output.LayerNorm.bias",
                "bert.encoder.layer.0.crossattention.self.key.weight", "bert.encoder.layer.0.crossattention.output.dense.bias",
                "bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.1.output.LayerNorm.weight",
                "bert.encoder.layer.1.intermediate_query.dense.bias", "bert.encoder.layer.1.output_query.dense.weight",
                "cls.predictions.bias", "cls.predictions.transform.dense.weight",
                "cls.predictions.transform.LayerNorm.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"]:
        assert key in names, key
    # cross-attention every cross_attention_freq (2) layers: 0 and 2, not 1
    assert {k.split(".")[3] for k in names if ".crossattention." in k} == {"0", "2"}
    assert small_qformer().state_dict()["bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 16)


def test_lm_decoder_is_tied_and_query_ffn_copies_text_ffn():
    model = small_qformer()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    for layer in model.bert.encoder.layer:
        assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
        assert layer.intermediate_query.dense.weight is not layer.intermediate.dense.weight  # copies, not shared


def test_text_branch_false_has_queries_only():
    model = small_qformer(text_branch=False, vocab_size=None)
    names = set(model.state_dict())
    assert not any("word_embeddings" in k or k.startswith("cls.") or ".intermediate." in k for k in names)
    queries, image, ids, _ = inputs()
    assert model.bert(query_embeds=queries, encoder_hidden_states=image).last_hidden_state.shape == (2, Q, 32)
    with pytest.raises(ValueError, match="text_branch=False"):
        model.bert(ids)


# ------------------------------------------------------------------------------------- masks as tensors
def test_causal_mask_text_sees_all_queries_and_earlier_text_only():
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])  # 3 queries + 4 text, row 2 padded
    mask = self_attention_mask(key_mask, num_rows=7, prefix_len=3, causal=True)
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0, 0],  # queries: only queries (they never see text)
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],  # text 0: all queries + itself
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert mask.shape == (2, 1, 7, 7)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], expected & key_mask[1].bool()[None, :])
    # with the queries cached, the rows are the 4 text positions
    cached = self_attention_mask(key_mask, num_rows=4, prefix_len=3, causal=True)
    assert torch.equal(cached[0, 0], expected[3:])


def test_bidirectional_mask_only_hides_padding():
    key_mask = torch.tensor([[1, 1, 1, 1, 0]])
    mask = self_attention_mask(key_mask, num_rows=5, prefix_len=3, causal=False)
    assert mask.shape == (1, 1, 1, 5) and mask[0, 0, 0].tolist() == [True, True, True, True, False]
    assert self_attention_mask(None, 5, 3, causal=False) is None


# ------------------------------------------------------------------------------------- masks by behaviour
def test_itc_passes_are_independent_and_padding_is_ignored():
    model = small_qformer()
    queries, image, ids, mask = inputs()
    q_out = model.bert(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    q_out2 = model.bert(query_embeds=queries, encoder_hidden_states=image * 2).last_hidden_state
    assert not torch.allclose(q_out, q_out2)  # queries do read the image
    t_out = model.bert(ids, attention_mask=mask).last_hidden_state
    changed = ids.clone()
    changed[1, -1] = 7  # a padding position
    t_out2 = model.bert(changed, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(t_out[:, :3], t_out2[:, :3])  # real tokens ignore padded keys
    changed[0, -1] = 8  # a real token: every position of row 0 sees it
    t_out3 = model.bert(changed, attention_mask=mask).last_hidden_state
    assert not torch.allclose(t_out[0, 0], t_out3[0, 0])


def test_itm_everything_sees_everything():
    model = small_qformer()
    queries, image, ids, mask = inputs()
    out = model.bert(ids, attention_mask=full_mask(mask), query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    changed = ids.clone()
    changed[:, 2] = 9
    out2 = model.bert(changed, attention_mask=full_mask(mask), query_embeds=queries,
                      encoder_hidden_states=image).last_hidden_state
    for row in range(2):
        assert not torch.allclose(out[row, :Q], out2[row, :Q])  # queries see the text
        assert not torch.allclose(out[row, Q], out2[row, Q])  # the first token sees a later one
    out3 = model.bert(ids, attention_mask=full_mask(mask), query_embeds=queries,
                      encoder_hidden_states=image + 1).last_hidden_state
    assert not torch.allclose(out[:, Q:], out3[:, Q:])  # text sees the image through the queries


def test_itg_text_sees_queries_and_earlier_text_only():
    model = small_qformer()
    queries, image, ids, mask = inputs()

    def lm_hidden(ids, image):
        cache = model.bert(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values
        return model.bert(ids, attention_mask=full_mask(mask), past_key_values=cache, is_decoder=True).last_hidden_state

    base = lm_hidden(ids, image)
    assert base.shape == (2, T, 32)
    changed = ids.clone()
    changed[0, 2] = 11
    out = lm_hidden(changed, image)
    torch.testing.assert_close(out[0, :2], base[0, :2])  # earlier tokens do not see token 2
    assert all(not torch.allclose(out[0, t], base[0, t]) for t in range(2, T))  # later ones do
    torch.testing.assert_close(out[1], base[1])
    out = lm_hidden(ids, image * 3)
    assert all(not torch.allclose(out[0, t], base[0, t]) for t in range(T))  # every token sees the queries


def test_cached_queries_equal_one_unilm_pass():
    model = small_qformer()
    queries, image, ids, mask = inputs()
    query_out = model.bert(query_embeds=queries, encoder_hidden_states=image, use_cache=True)
    cached = model.bert(ids, attention_mask=full_mask(mask), past_key_values=query_out.past_key_values, is_decoder=True)
    joint = model.bert(ids, attention_mask=full_mask(mask), query_embeds=queries, encoder_hidden_states=image,
                       is_decoder=True).last_hidden_state
    torch.testing.assert_close(joint[:, :Q], query_out.last_hidden_state)  # queries never see the text
    torch.testing.assert_close(joint[:, Q:], cached.last_hidden_state)


def test_mask_shape_errors():
    model = small_qformer()
    queries, image, ids, mask = inputs()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.bert(ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image)
    with pytest.raises(ValueError, match="image features"):
        model.bert(query_embeds=queries)


# ------------------------------------------------------------------------------------- BERT init
def bert_dir(tmp_path, cls, gamma_beta: bool = False):
    config = BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(1)
    bert = cls(config).eval()
    bert.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(15)]) + "\n")
    state = bert.state_dict()
    if gamma_beta:  # the original bert-base-uncased pytorch_model.bin names LayerNorm params gamma/beta
        (tmp_path / "model.safetensors").unlink()
        legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                  for k, v in state.items()}
        torch.save(legacy, tmp_path / "pytorch_model.bin")
    return {k if k.startswith(("bert.", "cls.")) else f"bert.{k}": v for k, v in state.items()}


@pytest.mark.parametrize("cls,gamma_beta", [(BertForMaskedLM, False), (BertModel, False), (BertForMaskedLM, True)])
def test_init_from_bert(tmp_path, cls, gamma_beta):
    bert = bert_dir(tmp_path, cls, gamma_beta)
    qformer = small_qformer(seed=3)
    cross_before = qformer.bert.encoder.layer[0].crossattention.self.key.weight.clone()
    dec_row = qformer.bert.embeddings.word_embeddings.weight[20].clone()
    report = init_from_bert(qformer, tmp_path)
    ours = qformer.state_dict()
    for key, value in bert.items():
        if "token_type" in key or "position_ids" in key or "pooler" in key:
            continue
        if key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"):
            torch.testing.assert_close(ours[key][:20], value, rtol=0, atol=0)  # BERT's 20 rows ...
            torch.testing.assert_close(ours[key][20], dec_row)  # ... plus [DEC] at its own init
        elif key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            torch.testing.assert_close(ours[key][:20], value, rtol=0, atol=0)
        else:
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    for layer in qformer.bert.encoder.layer:
        torch.testing.assert_close(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        torch.testing.assert_close(layer.output_query.dense.bias, layer.output.dense.bias)
        torch.testing.assert_close(layer.output_query.LayerNorm.weight, layer.output.LayerNorm.weight)
    assert torch.equal(qformer.bert.encoder.layer[0].crossattention.self.key.weight, cross_before)
    assert qformer.cls.predictions.decoder.weight is qformer.bert.embeddings.word_embeddings.weight
    assert report.missing and all(".crossattention." in k or k.startswith("cls.") for k in report.missing)
    assert any(k.startswith("cls.") for k in report.missing) == (cls is BertModel)
    assert any("token_type_embeddings" in k for k in report.ignored)


def test_init_from_bert_errors(tmp_path):
    bert_dir(tmp_path, BertForMaskedLM)
    with pytest.raises(ValueError, match="qformer.hidden_size=48"):
        init_from_bert(QFormer(small_cfg(hidden_size=48)), tmp_path)
    with pytest.raises(ValueError, match="rows but qformer.vocab_size=12"):
        init_from_bert(QFormer(small_cfg(vocab_size=12)), tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        init_from_bert(small_qformer(), tmp_path / "missing")
    save_file({"bert.encoder.layer.0.foo.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="match no Q-Former parameter"):
        init_from_bert(small_qformer(), tmp_path)
