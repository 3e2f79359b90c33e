"""The LAVIS verbs take weights: ``load_model(..., checkpoint=..., **overrides)`` rebuilds the model a
runner checkpoint was trained with, config overrides are validated, and a real-size model whose image
encoder or Q-Former got no weights says so once."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lavis_lite.config import ConfigError, load_config
from lavis_lite.models import blip2_qformer, create_model, load_model, load_model_and_preprocess
from lavis_lite.registry import MODELS
from lavis_lite.runner import checkpoint as runner_checkpoint
from tests.models.tiny_blip2 import TINY_TOKENIZER

# what the stage-1 shapes project changes on the tiny model type (its tokenizer is the data set's)
STAGE1 = {"arch": "blip2", "model_type": "tiny", "freeze_vit": False, "max_txt_len": 32}


def runner_style_checkpoint(tmp_path: Path, model_overrides: dict, seed: int = 1, name: str = "ckpt.pth"):
    """(path, trained model): a checkpoint in ``Runner.state()``'s format, its config resolved by
    ``load_config`` from a project yaml as the runner does."""
    project = tmp_path / f"{name}.yaml"
    project.write_text(OmegaConf.to_yaml({"model": {**STAGE1, **model_overrides}, "run": {"task": "retrieval"}}))
    cfg, _ = load_config(project)
    torch.manual_seed(seed)
    model = MODELS.get("blip2").from_config(cfg.model)  # as Runner.from_config builds it
    with torch.no_grad():  # weights that no fresh build has
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = {
        "model": model.trainable_state_dict(), "optim": None, "iteration": 2, "data_epoch": 0, "data_position": 2,
        "best": {"metric": 0.5, "iteration": 2}, "rng": [runner_checkpoint.rng_state()], "world_size": 1,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
    }
    return runner_checkpoint.save_atomic(state, tmp_path / name), model


def untrained_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "randomly initialised" in r.getMessage()]


# ------------------------------------------------------------------------------------------- overrides
def test_overrides_reach_the_model(tiny_opt_dir):
    model = load_model("blip2_feature_extractor", "tiny", qformer={"num_hidden_layers": 1}, max_txt_len=8)
    assert len(model.Qformer.bert.encoder.layer) == 1 and model.cfg.max_txt_len == 8
    # a real model type made small by overrides; the LLM comes from an official-format OPT directory
    model = load_model("blip2_opt", "pretrain_opt2.7b", is_eval=True, llm_path=tiny_opt_dir, llm_dtype="float32",
                       vit_model="tiny", img_size=64, vit_precision="fp32",
                       qformer={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 128, "num_query_token": 4})
    assert model.cfg.llm_path == str(tiny_opt_dir) and not model.training
    assert type(model.llm_model).__name__ == "OPTForCausalLM" and model.llm_model.config.hidden_size == 64
    assert model.query_embeds(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64)


def test_a_misspelled_override_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.qformer\.num_hiden_layers \(set in load_model keyword "
                                          r"arguments\).*Did you mean: 'num_hidden_layers'"):
        load_model("blip2_feature_extractor", "tiny", qformer={"num_hiden_layers": 2})
    with pytest.raises(ConfigError, match=r"model\.tokenizer_pth \(set in load_model keyword arguments\)"):
        load_model_and_preprocess("blip2_feature_extractor", "tiny", tokenizer_pth="x")
    with pytest.raises(ConfigError, match=r"model\.img_size .*load_model keyword arguments"):
        load_model("blip2", "tiny", img_size="large")


# ----------------------------------------------------------------------------------------- checkpoints
def test_runner_checkpoint_rebuilds_its_model(tmp_path, shapes_root):
    """A stage-1 checkpoint trained with the shapes tokenizer (321 tokens, the tiny model type's is 167)
    loads into the feature extractor: vocabulary and sizes from its stored config, weights bit-exact."""
    path, trained = runner_style_checkpoint(tmp_path, {"tokenizer_path": str(shapes_root / "bert_vocab")})
    assert len(trained.tokenizer) != len(create_model("blip2", "tiny").tokenizer)

    model, vis, _ = load_model_and_preprocess("blip2_feature_extractor", "tiny", is_eval=True, checkpoint=path)
    assert type(model).__name__ == "Blip2FeatureExtractor" and model.cfg.arch == "blip2_feature_extractor"
    assert len(model.tokenizer) == len(trained.tokenizer) and model.cfg.max_txt_len == 32
    state = model.state_dict()
    for key, value in trained.trainable_state_dict().items():
        assert torch.equal(state[key], value), key

    image = next(shapes_root.glob("images/**/*.jpg"))
    with Image.open(image) as pil:
        images = torch.stack([vis["eval"](pil.convert("RGB"))] * 2)
    features = model.extract_features({"image": images}, mode="image")
    assert features.image_embeds.shape == (2, 4, 64) and features.image_embeds_proj.shape == (2, 4, 32)
    assert torch.isfinite(features.image_embeds).all()
    multimodal = model({"image": images, "text_input": ["a red circle", "two blue squares"]})
    assert multimodal.multimodal_embeds.shape == (2, 4, 64)

    # explicit overrides win over the stored config: the tiny tokenizer does not fit these weights
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model("blip2_feature_extractor", "tiny", checkpoint=path, tokenizer_path=str(TINY_TOKENIZER))
    assert len(load_model("blip2", "tiny", checkpoint=path, max_txt_len=8).tokenizer) == len(trained.tokenizer)


def test_stage1_checkpoint_into_a_stage2_arch(tmp_path, shapes_root, tiny_internlm2_dir):
    """Another family's stored config (Blip2QformerConfig, not Blip2LLMConfig) is not used: the stage-2
    model type's defaults, with the stage-1 Q-Former's weights (its text branch dropped)."""
    path, trained = runner_style_checkpoint(tmp_path, {"tokenizer_path": str(shapes_root / "bert_vocab"),
                                                       "max_txt_len": 20})
    model = load_model("blip2_internlm", "tiny", checkpoint=path, llm_path=tiny_internlm2_dir)
    assert model.cfg.max_txt_len == 32 and model.cfg.freeze_vit  # Blip2LLMConfig's defaults, not stage 1's
    torch.testing.assert_close(model.query_tokens, trained.query_tokens, rtol=0, atol=0)


def test_lavis_checkpoint_keeps_the_model_type(tmp_path):
    """No stored config (a LAVIS .pth): the model type's defaults, as before."""
    torch.manual_seed(1)
    source = create_model("blip2", "tiny")
    torch.save({"model": source.state_dict()}, tmp_path / "lavis.pth")
    model = load_model("blip2_image_text_matching", "tiny", checkpoint=tmp_path / "lavis.pth")
    torch.testing.assert_close(model.itm_head.weight, source.itm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["pretrained", "tokenizer_path"])
def test_a_stored_path_that_is_gone_says_how_to_override_it(tmp_path, shapes_root, key):
    gone = tmp_path / "moved"
    gone.mkdir()
    if key == "pretrained":  # the checkpoint it started from (here: the same weights)
        torch.manual_seed(1)
        torch.save({"model": create_model("blip2", "tiny").state_dict()}, gone / "stage1.pth")
        stored, replacement = {"pretrained": str(gone / "stage1.pth")}, None
    else:
        (gone / "vocab.txt").write_bytes((shapes_root / "bert_vocab" / "vocab.txt").read_bytes())
        stored, replacement = {"tokenizer_path": str(gone)}, str(shapes_root / "bert_vocab")
    path, trained = runner_style_checkpoint(tmp_path, stored)
    for file in gone.iterdir():
        file.unlink()
    gone.rmdir()

    with pytest.raises(FileNotFoundError) as err:
        load_model("blip2_feature_extractor", "tiny", checkpoint=path)
    message = str(err.value)
    assert "\n" not in message
    assert f"model.{key}={gone}" in message and f"load_model(..., {key}=...)" in message and str(path) in message
    model = load_model("blip2_feature_extractor", "tiny", checkpoint=path, **{key: replacement})
    torch.testing.assert_close(model.query_tokens, trained.query_tokens, rtol=0, atol=0)


# ---------------------------------------------------------------------------- "randomly initialised"
@pytest.mark.random_vit_guard
def test_random_real_size_parts_warn_once(tmp_path, caplog, monkeypatch):
    """The logic on the tiny encoder treated as real-size (building ViT-g here would take too long)."""
    create_model("blip2", "tiny")
    assert untrained_warnings(caplog) == []  # tiny trains from scratch on purpose

    monkeypatch.setattr(blip2_qformer, "RANDOM_BY_DESIGN", ())
    caplog.clear()
    torch.manual_seed(1)
    source = create_model("blip2", "tiny")
    assert untrained_warnings(caplog) == [
        "blip2/tiny: the image encoder and the Q-Former are randomly initialised: set model.vit_pretrained "
        "(a tiny state dict) and model.pretrained or model.bert_init_path"]

    torch.save(source.visual_encoder.state_dict(), tmp_path / "vit.pth")
    caplog.clear()
    load_model("blip2_feature_extractor", "tiny", vit_pretrained=str(tmp_path / "vit.pth"))
    assert untrained_warnings(caplog) == [
        "blip2_feature_extractor/tiny: the Q-Former is randomly initialised: set model.pretrained or "
        "model.bert_init_path"]

    # the weights come from the checkpoint, loaded after building: no warning in between
    torch.save({"model": source.state_dict()}, tmp_path / "full.pth")
    caplog.clear()
    load_model("blip2_feature_extractor", "tiny", checkpoint=tmp_path / "full.pth")
    create_model("blip2", "tiny", pretrained=str(tmp_path / "full.pth"))
    assert untrained_warnings(caplog) == []

    # a checkpoint of the Q-Former alone over a loaded encoder
    qformer_only = {k: v for k, v in source.state_dict().items() if not k.startswith("visual_encoder.")}
    torch.save({"model": qformer_only}, tmp_path / "qformer.pth")
    caplog.clear()
    load_model("blip2", "tiny", checkpoint=tmp_path / "qformer.pth", vit_pretrained=str(tmp_path / "vit.pth"))
    assert untrained_warnings(caplog) == []
    # without an encoder from anywhere the existing refusal still holds
    with pytest.raises(KeyError, match="no visual_encoder.* weights"):
        load_model("blip2", "tiny", checkpoint=tmp_path / "qformer.pth")


@pytest.mark.random_vit_guard
def test_stage2_untrained_warning_names_a_stage1_checkpoint(caplog, monkeypatch, tiny_internlm2_dir):
    monkeypatch.setattr(blip2_qformer, "RANDOM_BY_DESIGN", ())
    load_model("blip2_internlm", "tiny", llm_path=tiny_internlm2_dir)
    assert untrained_warnings(caplog) == [
        "blip2_internlm/tiny: the image encoder and the Q-Former are randomly initialised: set model.vit_pretrained "
        "(a tiny state dict) and model.pretrained (a stage-1 checkpoint)"]
