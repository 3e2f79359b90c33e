"""Every real-size project config runs at the real widths by overriding paths and depth only (issue 12, item 6).

For each project under projects/blip2/ that is not a shapes (CPU-sized) recipe, and each model type it
documents (its own ``model.arch``/``model.model_type`` and every ``model.arch=... model.model_type=...``
alternative its header names), the runner is built from the project yaml with ``--options`` that set
only local paths, the depth and the run's size, then trains 2 iterations and evaluates its validation
split (train projects) or evaluates its test split (eval projects): one batch of 2 samples either way.

Real: every file format (LAVIS's eva_vit_g.pth and blip2_pretrained.pth layouts, a bert-base-uncased
folder saved by transformers, OPT and official InternLM2 folders, COCO Karpathy / VQAv2 / OK-VQA / GQA /
VG annotation files and JPEGs), every width (EVA-CLIP-g 1408 at 224 or 364 px, BERT-base 768 with 32
queries, opt-2.7b 2560, internlm2-1_8b 2048 with 16 heads over 8 kv heads), the BERT vocabulary
(30,522 entries in bert-base-uncased's special-token layout, the data's words among them) and the LLM
embedding tables (50,272 and 92,544 rows). The LLM tokenizers are the fixtures' small trained ones
(a few hundred tokens, tests/fixtures/llm_checkpoints.py): their tables are larger than their
tokenizers, as opt-2.7b's own is (50,272 rows for 50,265 tokens). Reduced: 2 of the ViT's 39 blocks
(``model.vit_depth``), 2 of the Q-Former's 12 layers, 2 LLM layers; weights are random.

Precision: the files are fp16 (ViT, OPT) and bf16 (InternLM2) as shipped; on CPU the test sets
``model.vit_precision=fp32 model.llm_dtype=float32``, as the project headers tell CPU users to. Half
precision runs on CPU but is emulated on most CPUs (on this 2-core machine the 2-block ViT forward is 7 to
12x slower in fp16, one backward through the 2-layer opt-2.7b-wide LLM takes 220 s in fp16, 1.4 s in float32).
"""
from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import lavis_lite  # noqa: F401  (registers everything)
from lavis_lite.config import load_config
from lavis_lite.runner.runner import Runner
from tests.fixtures import real_data
from tests.fixtures.llm_checkpoints import train_tiny_sentencepiece, write_tiny_internlm2, write_tiny_opt
from tests.fixtures.real_checkpoints import words_of, write_bert_base, write_eva_vit_g, write_lavis_stage1

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 2  # ViT blocks, Q-Former layers and LLM layers
IMAGE_SIZE = {"caption_coco_opt2.7b": 364}  # model types at another size than BLIP-2's 224 px
LLM_SIZES = {  # config.json sizes of the real checkpoints (2 layers here)
    "opt": dict(hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048),  # facebook/opt-2.7b
    "internlm2": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=8192,
                      vocab_size=92544, max_position_embeddings=32768),  # internlm/internlm2-1_8b
}
# a weight of the frozen LLM: (name in its folder, name in the loaded transformers model)
LLM_PROBE = {"opt": ("model.decoder.layers.1.fc2.weight", "model.decoder.layers.1.fc2.weight"),
             "internlm2": ("model.layers.1.feed_forward.w2.weight", "model.layers.1.mlp.down_proj.weight")}
STORAGE = {"coco_caption": "coco", "coco_retrieval": "coco", "coco_vqa": "coco", "vg_caption": "vg",
           "ok_vqa": "okvqa", "gqa": "gqa"}  # data set -> folder under the data root


def real_size_cases() -> list[tuple[Path, str, str]]:
    """(project, arch, model type) for every real-size project and model type it documents."""
    cases = []
    for path in sorted((ROOT / "projects" / "blip2").rglob("*.yaml")):
        if "shapes" in path.stem:
            continue
        own = OmegaConf.load(path).model
        documented = re.findall(r"model\.arch=(\S+)\s+model\.model_type=(\S+)", path.read_text())
        for arch, model_type in dict.fromkeys([(own.arch, own.model_type), *documented]):
            cases.append((path, arch, model_type))
    return cases


CASES = real_size_cases()


def case_id(case: tuple[Path, str, str]) -> str:
    path, arch, model_type = case
    return f"{path.parent.name}/{path.stem}-{arch}/{model_type}"


# ------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="session")
def eva_vit_g_file(tmp_path_factory) -> Path:
    return write_eva_vit_g(tmp_path_factory.mktemp("eva") / "eva_vit_g.pth", depth=DEPTH)


@pytest.fixture(scope="session")
def bert_base_dir(tmp_path_factory) -> Path:
    return write_bert_base(tmp_path_factory.mktemp("bert-base-uncased"), DEPTH, words_of(real_data.TEXTS))


@pytest.fixture(scope="session")
def lavis_stage1_file(tmp_path_factory) -> Path:
    return write_lavis_stage1(tmp_path_factory.mktemp("lavis") / "blip2_pretrained.pth", DEPTH)


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory) -> Path:
    return write_tiny_opt(tmp_path_factory.mktemp("opt-2.7b"), num_hidden_layers=DEPTH, **LLM_SIZES["opt"])


@pytest.fixture(scope="session")
def internlm2_dir(tmp_path_factory) -> Path:
    return write_tiny_internlm2(tmp_path_factory.mktemp("internlm2-1_8b"), train_tiny_sentencepiece(),
                                num_hidden_layers=DEPTH, **LLM_SIZES["internlm2"])


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    size = (640, 480)  # COCO's usual size (at 224 px the processors decode it at half size: JPEG draft)
    real_data.make_coco(root / "coco", size)
    real_data.make_vg(root / "vg", size)
    real_data.make_okvqa(root / "okvqa", size)
    real_data.make_gqa(root / "gqa", size)
    return root


# ------------------------------------------------------------------------------------------ helpers
def options_for(project: Path, arch: str, model_type: str, output_dir: Path, request) -> list[str]:
    """Local paths, depth and run size: everything the test changes in the project."""
    head, _ = load_config(project, [f"model.arch={arch}", f"model.model_type={model_type}"])
    vit = request.getfixturevalue("eva_vit_g_file")
    options = [f"model.arch={arch}", f"model.model_type={model_type}", f"model.vit_pretrained={vit}",
               f"model.vit_depth={DEPTH}", f"model.qformer.num_hidden_layers={DEPTH}", "model.vit_precision=fp32",
               f"run.output_dir={output_dir}", "run.batch_size_train=2", "run.batch_size_eval=2",
               "run.num_workers=0", "run.log_freq=1", "run.progress_bar=false"]
    if "llm" in head.model:  # stage 2: the frozen LLM, the Q-Former from a LAVIS stage-1 checkpoint
        if head.model.llm not in LLM_SIZES:
            pytest.fail(f"{project.name} ({arch}/{model_type}) uses LLM {head.model.llm!r}: add its real sizes to "
                        f"LLM_SIZES and LLM_PROBE and a fixture {head.model.llm}_dir writing it in its official format")
        llm_dir = request.getfixturevalue(f"{head.model.llm}_dir")
        options += [f"model.llm_path={llm_dir}", "model.llm_dtype=float32",
                    f"model.pretrained={request.getfixturevalue('lavis_stage1_file')}"]
    else:  # stage 1: the Q-Former from BERT
        bert = request.getfixturevalue("bert_base_dir")
        options += [f"model.bert_init_path={bert}", f"model.tokenizer_path={bert}"]
    data = request.getfixturevalue("data_root")
    for name in head.datasets:
        if name not in STORAGE:
            pytest.fail(f"{project.name} reads data set {name!r}, which has no real-format files here: add a writer "
                        f"to tests/fixtures/real_data.py, call it in the data_root fixture and map {name!r} in STORAGE")
        options.append(f"datasets.{name}.build_info.storage={data / STORAGE[name]}")
        if name == "ok_vqa":  # OK-VQA's annotations name COCO images: build_info.images points at them
            options.append(f"datasets.ok_vqa.build_info.images={data / STORAGE[name] / 'coco_images'}")
    if head.run.task in ("captioning", "vqa"):  # generation is exercised, not measured: one beam, few tokens
        options += ["run.num_beams=1", "run.max_len=3", "run.min_len=1"]
    if project.parent.name == "train":
        options += ["run.runner=runner_iter", "run.max_iters=2", "run.iters_per_inner_epoch=2",
                    "run.save_freq_epochs=0"]
    else:
        options.append("run.evaluate=true")
    return options


def equals_file(param: torch.Tensor, stored: torch.Tensor) -> bool:
    return torch.equal(param.detach().cpu(), stored.to(param.dtype))


def check_weights_come_from_files(model) -> None:
    cfg, params = model.cfg, dict(model.named_parameters())
    vit = torch.load(cfg.vit_pretrained, map_location="cpu", weights_only=True)
    for key in ("blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight"):
        assert equals_file(params[f"visual_encoder.{key}"], vit[key]), key
    if not hasattr(cfg, "llm"):
        folder = Path(cfg.bert_init_path)
        with safe_open(str(folder / "model.safetensors"), "pt") as bert:
            for key in ("encoder.layer.1.output.dense.weight", "embeddings.position_embeddings.weight"):
                assert equals_file(params[f"Qformer.bert.{key}"], bert.get_tensor(f"bert.{key}")), key
        return
    stage1 = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)["model"]
    for key in ("Qformer.bert.encoder.layer.0.crossattention.self.key.weight", "query_tokens", "ln_vision.weight"):
        assert equals_file(params[key], stage1[key]), key
    stored, loaded = LLM_PROBE[cfg.llm]
    with safe_open(str(Path(cfg.llm_path) / "model.safetensors"), "pt") as llm:
        assert equals_file(params[f"llm_model.{loaded}"], llm.get_tensor(stored)), stored


def record_shapes(model) -> dict[str, set[tuple[int, ...]]]:
    """Per-sample shapes of what flows through the model while the runner trains and evaluates: the images,
    the image features after ``ln_vision``, the query outputs and (stage 2) the LLM inputs they become."""
    seen: dict[str, set[tuple[int, ...]]] = {}

    def record(name: str, of_input: bool):
        def hook(module, args, output):
            seen.setdefault(name, set()).add(tuple((args[0] if of_input else output).shape[1:]))
        return hook

    model.visual_encoder.patch_embed.register_forward_hook(record("image", of_input=True))
    model.ln_vision.register_forward_hook(record("image_embeds", of_input=False))
    if hasattr(model, "llm_proj"):
        model.llm_proj.register_forward_hook(record("queries", of_input=True))
        model.llm_proj.register_forward_hook(record("llm_inputs", of_input=False))
    else:
        model.vision_proj.register_forward_hook(record("queries", of_input=True))
    return seen


def check_sizes(model, seen: dict[str, set[tuple[int, ...]]], model_type: str) -> None:
    """Real widths at reduced depth, in the model and in the tensors its run saw."""
    size = IMAGE_SIZE.get(model_type, 224)
    assert model.cfg.img_size == size
    assert model.visual_encoder.num_features == 1408 and len(model.visual_encoder.blocks) == DEPTH
    qformer = model.Qformer.config
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.num_attention_heads) == (768, DEPTH, 12)
    expected = {"image": {(3, size, size)}, "image_embeds": {((size // 14) ** 2 + 1, 1408)}, "queries": {(32, 768)}}
    if hasattr(model.cfg, "llm"):
        sizes, config = LLM_SIZES[model.cfg.llm], model.llm_model.config
        assert {key: getattr(config, key) for key in sizes} == sizes and config.num_hidden_layers == DEPTH
        table = model.llm_model.get_input_embeddings().weight
        assert tuple(table.shape) == (sizes["vocab_size"], sizes["hidden_size"]) and table.dtype == torch.float32
        expected["llm_inputs"] = {(32, sizes["hidden_size"])}
    else:
        assert qformer.vocab_size == 30523  # bert-base-uncased's 30522 + [DEC]
        ids, _ = model.tokenize(real_data.COCO_VAL[42])
        assert model.tokenizer.unk_token_id not in ids  # the data's words are in the vocabulary
    assert seen == expected


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def check_results(runner: Runner, output_dir: Path) -> None:
    """Each evaluated sample has a result (VQA answers, captions) in the run's result files."""
    files = sorted((output_dir / "result").glob("*_result.json")) if (output_dir / "result").is_dir() else []
    if runner.cfg.task == "retrieval":
        assert not files  # recall comes from scores, no result file
        return
    loaders = [loader for name, loader in runner.eval_loaders.items()
               if name.rsplit("/", 1)[-1] in runner.cfg.valid_splits + runner.cfg.test_splits]
    assert len(files) == 1 and len(loaders) == 1, (files, sorted(runner.eval_loaders))
    file, loader = files[0], loaders[0]
    results = json.loads(file.read_text())
    key, text = ("question_id", "answer") if runner.cfg.task == "vqa" else ("image_id", "caption")
    data = loader.dataset
    if key == "question_id":
        expected = [data.annotation[i]["question_id"] for i in range(len(data))]
    else:  # captioning: the images of the ground truth
        expected = [image["id"] for image in json.loads(data.gt_path.read_text())["images"]]
    assert sorted(r[key] for r in results) == sorted(expected) and len(expected) == 2
    assert all(isinstance(r[text], str) for r in results)


# -------------------------------------------------------------------------------------------- tests
def test_every_documented_real_model_type_is_a_case():
    ids = {case_id(c) for c in CASES}
    assert {"train/pretrain_stage1-blip2/pretrain", "train/pretrain_stage2-blip2_opt/pretrain_opt2.7b",
            "train/pretrain_stage2-blip2_internlm/pretrain_internlm2_1.8b",
            "eval/vqav2_zeroshot_internlm-blip2_internlm/pretrain_internlm2_1.8b",
            "eval/caption_coco_opt2.7b-blip2_opt/caption_coco_opt2.7b"} <= ids
    assert not any("tiny" in i for i in ids)


@pytest.mark.slow
@pytest.mark.parametrize("project,arch,model_type", CASES, ids=[case_id(c) for c in CASES])
def test_real_size_project_trains_and_evaluates(project, arch, model_type, tmp_path, request):
    output_dir = tmp_path / "run"
    cfg, sources = load_config(project, options_for(project, arch, model_type, output_dir, request))
    runner = Runner.from_config(cfg, sources)
    model = runner.model
    check_weights_come_from_files(model)
    seen = record_shapes(model)

    if project.parent.name == "train":
        query_tokens = model.query_tokens.detach().clone()
        runner.train()
        log = read_log(output_dir)
        steps = [r for r in log if "train_loss" in r]
        assert [r["iteration"] for r in steps] == [1, 2]
        losses = [v for r in steps for k, v in r.items() if k.startswith("train_loss")]
        assert losses and all(math.isfinite(v) for v in losses), steps
        if arch == "blip2":
            assert {"train_loss_itc", "train_loss_itm", "train_loss_lm"} <= set(steps[0])
        best = f"val_{runner.cfg.best_metric}"
        assert any(key.endswith(best) for r in log for key in r), log  # the validation batch was scored
        assert not torch.equal(model.query_tokens.detach(), query_tokens)  # the optimizer stepped
    else:
        metrics = runner.evaluate(runner.cfg.test_splits)
        assert metrics and all("agg_metrics" in m for m in metrics.values()), metrics
    check_results(runner, output_dir)

    check_sizes(model, seen, model_type)
    del runner, model
    gc.collect()
