import pytest
from omegaconf import OmegaConf

from lavis_lite.config import ConfigError, RunConfig, load_config, merge_onto, split_run_config
from lavis_lite.models.bow_tagger import BowTaggerConfig


def write(path, text):
    path.write_text(text)
    return path


PROJECT = """
model:
  arch: bow_tagger
  model_type: tiny
  num_buckets: 128
run:
  task: image_text_pretrain
  init_lr: 0.001
  max_epoch: 3
"""


def test_layers_merge_in_order(tmp_path):
    cfg, sources = load_config(write(tmp_path / "p.yaml", PROJECT), ["run.max_epoch=5", "model.width=32"])
    assert cfg.model.width == 32  # --options beat configs/models/bow_tagger/tiny.yaml (16)
    assert cfg.model.num_buckets == 128  # project beats the dataclass default
    assert cfg.run.max_epoch == 5 and cfg.run.init_lr == 0.001
    assert "preprocess" not in cfg.model
    assert sources.origin("model.width") == "--options"
    assert sources.origin("model.num_buckets").endswith("p.yaml")
    run, task = split_run_config(cfg.run, None, sources)
    assert run.max_epoch == 5 and run.batch_size_train == RunConfig.batch_size_train and task is None


def test_model_defaults_come_from_model_type_yaml(tmp_path):
    cfg, _ = load_config(write(tmp_path / "p.yaml", PROJECT))
    assert cfg.model.width == 16
    model_cfg = merge_onto(BowTaggerConfig, cfg.model, "model")
    assert isinstance(model_cfg, BowTaggerConfig) and model_cfg.freeze_encoder is False


def test_misspelled_run_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "p.yaml", PROJECT + "  init_lrr: 0.1\n")
    cfg, sources = load_config(path)
    with pytest.raises(ConfigError) as err:
        split_run_config(cfg.run, None, sources)
    assert "run.init_lrr" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key_and_origin(tmp_path):
    cfg, sources = load_config(write(tmp_path / "p.yaml", PROJECT), ["run.max_epoch=many"])
    with pytest.raises(ConfigError, match=r"run\.max_epoch \(set in --options\)"):
        split_run_config(cfg.run, None, sources)


def test_misspelled_model_key(tmp_path):
    cfg, sources = load_config(write(tmp_path / "p.yaml", PROJECT), ["model.widht=3"])
    with pytest.raises(ConfigError, match=r"model\.widht.*Valid keys for model: arch, model_type, width"):
        merge_onto(BowTaggerConfig, cfg.model, "model", sources)


def test_enumerated_option_is_checked(tmp_path):
    cfg, sources = load_config(write(tmp_path / "p.yaml", PROJECT), ["run.amp_dtype=float8"])
    with pytest.raises(ConfigError, match="run.amp_dtype"):
        split_run_config(cfg.run, None, sources)


def test_structural_errors(tmp_path):
    with pytest.raises(ConfigError, match="no file at"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown top-level section.*modle"):
        load_config(write(tmp_path / "a.yaml", "modle: {arch: x}\n"))
    with pytest.raises(ConfigError, match="model.arch is missing"):
        load_config(write(tmp_path / "b.yaml", "run: {max_epoch: 1}\n"))
    with pytest.raises(ConfigError, match=r"no default config at .*huge.yaml; choose one of \['tiny'\]"):
        load_config(write(tmp_path / "c.yaml", "model: {arch: bow_tagger, model_type: huge}\n"))


def test_task_keys_validated_by_task_dataclass(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class VqaLike:
        num_beams: int = 5

    node = OmegaConf.create({"max_epoch": 2, "num_beams": 3})
    run, task = split_run_config(node, VqaLike, None)
    assert run.max_epoch == 2 and task.num_beams == 3
    with pytest.raises(ConfigError, match="run.num_beam"):
        split_run_config(OmegaConf.create({"num_beam": 3}), VqaLike, None)


def test_switching_a_registered_name_replaces_the_node(tmp_path):
    project = PROJECT + """datasets:
  shapes_caption:
    vis_processor:
      train: {name: blip_image_eval, image_size: 32}
"""
    cfg, _ = load_config(write(tmp_path / "p.yaml", project))
    # configs/datasets/shapes_caption.yaml sets {name: blip_image_train, hflip: false}: not merged in
    assert dict(cfg.datasets.shapes_caption.vis_processor.train) == {"name": "blip_image_eval", "image_size": 32}
    cfg, _ = load_config(write(tmp_path / "q.yaml", PROJECT + "datasets: {shapes_caption: {}}\n"),
                         ["datasets.shapes_caption.vis_processor.train.image_size=48"])
    assert cfg.datasets.shapes_caption.vis_processor.train.hflip is False  # same name: merged
    assert cfg.datasets.shapes_caption.vis_processor.train.image_size == 48
