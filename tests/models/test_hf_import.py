"""Hugging Face BLIP-2 directories (transformers' ``save_pretrained``) load into our archs, sized from their
config.json: a tiny ``Blip2ForConditionalGeneration`` (OPT text model) gives transformers' own logits and
greedy ids in ``blip2_opt``, sharded or not; ``Blip2ForImageTextRetrieval`` gives its ITM and ITC scores
in a stage-1 arch; a nonzero k bias, which LAVIS's EVA cannot hold, is refused. Also the config-driven
EVA image encoder (``vit_model: eva``) behind them."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lavis_lite.models import load_model
from lavis_lite.models.vision import VitArch, create_vision_encoder
from tests.models.tiny_blip2 import TINY_TOKENIZER

transformers = pytest.importorskip("transformers")

NUM_QUERIES = 4
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)  # layer_norm_eps: HF's 1e-6, not the 1e-5 of LAVIS's ln_vision
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               cross_attention_frequency=2)
FP32 = dict(vit_precision="fp32", llm_dtype="float32")  # exact comparisons


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights no fresh build has (HF initialises the vision tower with std 1e-10, the queries with 0);
    the k third of every fused vision qkv bias stays zero, as in checkpoints converted from LAVIS."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
            if name.endswith("self_attn.qkv.bias"):
                param[param.shape[0] // 3: 2 * param.shape[0] // 3] = 0


@pytest.fixture(scope="module")
def hf_opt_blip2(tiny_opt_dir, tmp_path_factory):
    """(directory, sharded copy, the transformers model, its tokenizer): a tiny Blip2ForConditionalGeneration
    saved with the OPT tokenizer plus "<image>", as Blip2Processor saves it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_opt_dir)
    tokenizer.add_tokens([transformers.AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = transformers.OPTConfig(vocab_size=-(-len(tokenizer) // 16) * 16, hidden_size=32, word_embed_proj_dim=32,
                                  ffn_dim=37, num_hidden_layers=2, num_attention_heads=4, pad_token_id=1,
                                  bos_token_id=2, eos_token_id=2)
    config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(),
                                      num_query_tokens=NUM_QUERIES, image_token_index=image_id)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    randomise(model, seed=1)
    root = tmp_path_factory.mktemp("hf_blip2")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    for path in (root / "single", root / "sharded"):
        tokenizer.save_pretrained(path)
    return root / "single", root / "sharded", model, tokenizer


def hf_inputs(tokenizer, prompt: str, batch: int) -> torch.Tensor:
    """Blip2Processor's input_ids: one "<image>" per query, then the prompt with OPT's bos "</s>"."""
    image = tokenizer.convert_tokens_to_ids("<image>")
    ids = [image] * NUM_QUERIES + tokenizer(prompt).input_ids
    return torch.tensor([ids] * batch)


def test_conditional_generation_gives_transformers_logits_and_greedy_ids(hf_opt_blip2):
    single, sharded, hf, tokenizer = hf_opt_blip2
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    model = load_model("blip2_opt", "pretrain_opt2.7b", is_eval=True, pretrained=str(single), **FP32)
    # sizes from config.json, the LLM and its tokenizer from the same directory
    assert model.cfg.vit_model == "eva" and model.cfg.img_size == 32 and model.cfg.ln_vision_eps == 1e-6
    assert model.cfg.vit_arch.mlp_width == 37 and model.visual_encoder.blocks[0].mlp.fc1.out_features == 37
    assert len(model.Qformer.bert.encoder.layer) == 2 and model.Qformer.bert.encoder.layer[1].crossattention is None
    assert model.cfg.llm_path == str(single) and type(model.llm_model).__name__ == "OPTForCausalLM"
    assert model.query_tokens.shape == (1, NUM_QUERIES, 32) and torch.equal(model.query_tokens, hf.query_tokens)

    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = "a photo of"
    input_ids = hf_inputs(tokenizer, prompt, batch=2)
    with torch.no_grad():
        expected = hf(pixel_values=image, input_ids=input_ids).logits
        inputs, mask, _ = model.build_inputs(model.query_embeds(image), [prompt] * 2)
        logits = model.llm_model(inputs_embeds=inputs, attention_mask=mask).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    config = model.generation_config(num_beams=1, max_new_tokens=6, min_new_tokens=1, length_penalty=1.0)
    with torch.no_grad():
        hf_ids = hf.generate(pixel_values=image, input_ids=input_ids, generation_config=config)[:, input_ids.shape[1]:]
        inputs, mask, _ = model.build_inputs(model.query_embeds(image), [prompt] * 2, padding_side="left")
        ids = model.llm_model.generate(inputs_embeds=inputs, attention_mask=mask, generation_config=config)
    assert ids.tolist() == hf_ids.tolist()
    texts = model.generate({"image": image, "prompt": [prompt] * 2}, num_beams=1, max_new_tokens=6)
    assert texts == [model.postprocess(t) for t in tokenizer.batch_decode(hf_ids, skip_special_tokens=True)]

    # the sharded copy, given as load_model's checkpoint, builds and loads the same model
    resharded = load_model("blip2_opt", "pretrain_opt2.7b", is_eval=True, checkpoint=str(sharded), **FP32)
    ours, theirs = model.state_dict(), resharded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_llm_path_given_wins_over_the_directorys_language_model(hf_opt_blip2, tiny_opt_dir):
    # the tiny OPT directory is 64 wide, the BLIP-2 directory's projection 32: one line names the tensor
    with pytest.raises(RuntimeError, match=r"llm_proj\.weight: checkpoint \[32, 32\] but the model \[64, 32\]"):
        load_model("blip2_opt", "pretrain_opt2.7b", pretrained=str(hf_opt_blip2[0]), llm_path=str(tiny_opt_dir), **FP32)


def test_nonzero_k_bias_is_refused(hf_opt_blip2, tmp_path):
    single = hf_opt_blip2[0]
    broken = Path(shutil.copytree(single, tmp_path / "k_bias"))
    state = load_file(broken / "model.safetensors")
    state["vision_model.encoder.layers.1.self_attn.qkv.bias"][40] = 0.5  # inside the k third (32..63)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv\.bias: the k part of the fused qkv bias is nonzero"):
        load_model("blip2_opt", "pretrain_opt2.7b", pretrained=str(broken), **FP32)


def test_a_directory_without_tokenizer_says_what_to_do(hf_opt_blip2, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_opt_blip2[0] / name, bare / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer files .* save the Blip2Processor"):
        load_model("blip2_opt", "pretrain_opt2.7b", pretrained=str(bare), **FP32)


def test_conditional_generation_into_a_stage1_arch_keeps_its_query_path(hf_opt_blip2, caplog):
    single, _, hf, _ = hf_opt_blip2
    with caplog.at_level(logging.WARNING):
        model = load_model("blip2_feature_extractor", "pretrain", is_eval=True, pretrained=str(single),
                           tokenizer_path=str(TINY_TOKENIZER), qformer={"vocab_size": None}, vit_precision="fp32")
    assert any("text branch" in r.getMessage() for r in caplog.records)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=image).qformer_outputs.last_hidden_state
        features = model.extract_features({"image": image}, mode="image").image_embeds
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_image_text_retrieval_gives_transformers_itm_and_itc(tmp_path, caplog):
    from lavis_lite.models.blip2_qformer import build_tokenizer

    vocab = len(build_tokenizer(str(TINY_TOKENIZER)))  # with [DEC], as LAVIS's and HF's retrieval models
    config = transformers.Blip2Config(vision_config=VISION,
                                      qformer_config={**QFORMER, "vocab_size": vocab, "use_qformer_text_input": True},
                                      num_query_tokens=NUM_QUERIES, image_text_hidden_size=16)
    torch.manual_seed(0)
    hf = transformers.Blip2ForImageTextRetrieval(config).eval()
    randomise(hf, seed=3)
    hf.save_pretrained(tmp_path / "itm")
    with caplog.at_level(logging.WARNING):
        model = load_model("blip2_image_text_matching", "pretrain", is_eval=True, checkpoint=str(tmp_path / "itm"),
                           tokenizer_path=str(TINY_TOKENIZER), vit_precision="fp32")
    assert any("temp and the LM head" in r.getMessage() for r in caplog.records)
    assert model.cfg.embed_dim == 16 and model.cfg.qformer.vocab_size == vocab
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    texts = ["a red circle", "two blue squares on the left"]
    ids, mask = model.tokenize(texts, padding="longest")
    with torch.no_grad():
        itm = hf(pixel_values=image, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        itc = hf(pixel_values=image, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        torch.testing.assert_close(model({"image": image, "text_input": texts}, match_head="itm"),
                                   itm.logits_per_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(model({"image": image, "text_input": texts}, match_head="itc"),
                                   itc.logits_per_image.diagonal(), atol=1e-5, rtol=0)


def test_eva_encoder_is_built_from_config_values():
    arch = VitArch(width=48, depth=3, num_heads=3, mlp_width=100, patch_size=4, layer_norm_eps=1e-5, qkv_bias=False)
    encoder = create_vision_encoder("eva", img_size=24, arch=arch)
    block = encoder.blocks[0]
    assert len(encoder.blocks) == 3 and encoder.num_features == 48 and block.attn.num_heads == 3
    assert block.mlp.fc1.out_features == 100 and block.norm1.eps == 1e-5 and block.attn.q_bias is None
    assert encoder.forward_features(torch.zeros(1, 3, 24, 24)).shape == (1, 1 + 36, 48)
    with pytest.raises(ValueError, match="vit_arch.width=48 is not a multiple of model.vit_arch.num_heads=5"):
        create_vision_encoder("eva", img_size=24, arch=VitArch(width=48, num_heads=5))
