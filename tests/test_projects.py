"""Every project yaml loads and validates against the dataclasses; a misspelled key fails."""
from pathlib import Path

import pytest

import lavis_lite  # noqa: F401  (registers everything)
from lavis_lite.config import ConfigError, load_config
from lavis_lite.runner.runner import validate

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = sorted((ROOT / "projects").rglob("*.yaml"))


def test_there_are_projects():
    names = {p.relative_to(ROOT / "projects").as_posix() for p in PROJECTS}
    assert {"blip2/train/pretrain_stage1.yaml", "blip2/train/pretrain_stage2.yaml"} <= names


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_project_validates(path):
    cfg, sources = load_config(path)
    run, _ = validate(cfg, sources)
    assert run.output_dir.startswith("output/")


@pytest.mark.parametrize("section,key", [("run", "max_epochs"), ("model", "llm_pth"), ("datasets.shapes_caption", "skip_bad_image")])
def test_misspelled_key_fails_with_its_name(section, key):
    path = ROOT / "projects/blip2/train/pretrain_stage2.yaml"
    cfg, sources = load_config(path, [f"{section}.{key}=1"])
    with pytest.raises(ConfigError, match=f"{section}.{key}".replace(".", r"\.")):
        validate(cfg, sources)


def test_every_model_type_config_validates():
    from lavis_lite.config import CONFIG_ROOT, merge_onto
    from lavis_lite.registry import MODELS
    from omegaconf import OmegaConf

    checked = 0
    for arch in MODELS.names():
        for path in sorted((CONFIG_ROOT / "models" / arch).glob("*.yaml")):
            node = OmegaConf.load(path)
            node.pop("preprocess", None)
            merge_onto(MODELS.get(arch).config_class, node, f"model ({path})")
            checked += 1
    assert checked >= 20
