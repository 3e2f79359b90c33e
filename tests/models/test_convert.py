"""LAVIS checkpoint key tables (tests/data_files/lavis_keys, derived from LAVIS's code by generate.py) load
strictly into full-size models built on the meta device (no weights, no memory); a real-size model type
lists its own keys without any file; tied pairs stored once load."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lavis_lite.config import load_yaml, merge_onto, model_config_path
from lavis_lite.models.blip2_qformer import Blip2Qformer, Blip2QformerConfig
from lavis_lite.models.convert import LAVIS_ONLY_KEYS, key_shapes, load_key_table, main, meta_model, meta_state_dict
from tests.models.tiny_blip2 import REPO

TABLES = REPO / "tests" / "data_files" / "lavis_keys"


def full_size_model(model_type: str, vocab_dir, **overrides) -> Blip2Qformer:
    """configs/models/blip2/<model_type>.yaml as is (plus a local 30522-word vocab), built on meta."""
    node = load_yaml(model_config_path("blip2", model_type), model_type)
    node.pop("preprocess")
    cfg = merge_onto(Blip2QformerConfig, OmegaConf.merge(node, {"tokenizer_path": str(vocab_dir), **overrides}), "model")
    with torch.device("meta"):
        return Blip2Qformer(cfg)


@pytest.mark.parametrize("model_type,table", [("pretrain", "blip2_pretrained.json"),
                                              ("pretrain_vitL", "blip2_pretrained_vitL.json")])
def test_lavis_stage1_checkpoint_loads_strictly(bert_base_vocab_dir, model_type, table):
    model = full_size_model(model_type, bert_base_vocab_dir)
    lavis = load_key_table(TABLES / table)
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("visual_encoder.")}
    # documented differences: LAVIS's position_ids buffer; the ViT (frozen, hence absent from the file)
    assert set(lavis) - set(ours) == set(LAVIS_ONLY_KEYS)
    assert set(ours) == set(lavis) - set(LAVIS_ONLY_KEYS)
    for key, shape in ours.items():
        assert lavis[key] == shape, key
    state = model.convert_state_dict(meta_state_dict(lavis))
    model.load_state_dict_checked(state, source=table, strict=True, allow_missing=model.allow_missing(state))
    with pytest.raises(KeyError, match="missing keys"):
        missing = model.convert_state_dict(meta_state_dict({k: v for k, v in lavis.items() if k != "itm_head.weight"}))
        model.load_state_dict_checked(missing, source=table, strict=True, allow_missing=model.allow_missing(missing))


def test_coco_checkpoint_with_vit_weights_maps_and_resamples(bert_base_vocab_dir):
    # LAVIS blip2_finetune_coco.pth trains the ViT at 364 px: visual_encoder.* keys are present
    model = full_size_model("coco", bert_base_vocab_dir)
    assert model.cfg.img_size == 364 and not model.cfg.freeze_vit
    lavis = load_key_table(TABLES / "blip2_pretrained.json")
    eva = load_key_table(TABLES / "eva_vit_g.json")
    eva["pos_embed"] = [1, 26 * 26 + 1, 1408]  # as saved by the 364 px model
    state = meta_state_dict({**lavis, **{f"visual_encoder.{k}": v for k, v in eva.items()}})
    converted = model.convert_state_dict(state)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict_checked(converted, source="coco", strict=True)
    # a 224 px ViT file resamples to the 364 px grid
    state["visual_encoder.pos_embed"] = torch.empty(1, 257, 1408, device="meta")
    assert model.convert_state_dict(state)["visual_encoder.pos_embed"].shape == (1, 677, 1408)


def test_stored_tables_describe_lavis_sizes():
    table = load_key_table(TABLES / "blip2_pretrained.json")
    assert len(table) == 346
    assert table["query_tokens"] == [1, 32, 768]
    assert table["Qformer.bert.embeddings.word_embeddings.weight"] == [30523, 768]
    assert table["Qformer.bert.encoder.layer.10.crossattention.self.key.weight"] == [768, 1408]
    assert "Qformer.bert.encoder.layer.11.crossattention.self.key.weight" not in table
    assert len(load_key_table(TABLES / "eva_vit_g.json")) == 4 + 39 * 13


def test_key_table_cli(tmp_path, monkeypatch, capsys):
    torch.save({"model": {"a.weight": torch.zeros(2, 3), "temp": torch.tensor(1.0)}}, tmp_path / "c.pth")
    assert key_shapes({"x": torch.zeros(4, 1)}) == {"x": [4, 1]}
    monkeypatch.setattr(sys, "argv", ["convert", str(tmp_path / "c.pth")])
    main()
    assert json.loads(capsys.readouterr().out)["keys"] == {"a.weight": [2, 3], "temp": []}


def test_tied_pairs_stored_once_load(tmp_path):
    # safetensors' save_model (and HF save_pretrained) keep one name per shared tensor: the LM head's
    # decoder.weight (tied to the word embeddings) and decoder.bias (= predictions.bias) go missing
    from safetensors.torch import load_file, save_model

    from tests.models.tiny_blip2 import tiny_model

    trained = tiny_model(seed=1)
    save_model(trained, str(tmp_path / "tied.safetensors"))
    stored = load_file(str(tmp_path / "tied.safetensors"))
    assert len(set(trained.state_dict()) - set(stored)) == 2
    model = tiny_model(seed=2)
    model.load_checkpoint(tmp_path / "tied.safetensors")
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_meta_key_listing_of_a_real_size_model_needs_no_files(tmp_path, monkeypatch, capsys):
    # no llm_path directory (facebook/opt-2.7b, relative), vit_pretrained or pretrained exists here
    monkeypatch.chdir(tmp_path)
    model = meta_model("blip2_opt", "pretrain_opt2.7b")
    table = key_shapes(model.state_dict())
    assert model.tokenizer is None and all(p.is_meta for p in model.parameters())
    assert len(table) == 1287  # 511 EVA-CLIP-g (39 blocks) + 254 Q-Former + 517 OPT-2.7b + 5
    assert sum(k.startswith("llm_model.") for k in table) == 517
    assert table["query_tokens"] == [1, 32, 768] and table["llm_proj.weight"] == [2560, 768]
    assert table["llm_model.model.decoder.embed_tokens.weight"] == [50272, 2560]
    assert table["visual_encoder.blocks.38.mlp.fc1.weight"] == [6144, 1408]
    # the command line prints the same table; stage 1 skips its missing BERT tokenizer too
    monkeypatch.setattr(sys, "argv", ["convert", "--arch", "blip2_opt", "--model-type", "pretrain_opt2.7b", "--keys"])
    main()
    assert json.loads(capsys.readouterr().out)["keys"] == table
    stage1 = key_shapes(meta_model("blip2", "pretrain").state_dict())
    assert stage1["Qformer.bert.embeddings.word_embeddings.weight"] == [30523, 768]
    with pytest.raises(FileNotFoundError, match="no known sizes for 'models/my-llm'"):
        meta_model("blip2_opt", "pretrain_opt2.7b", llm_path="models/my-llm")
