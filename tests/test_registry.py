import pytest

from lavis_lite.registry import Registry


def test_register_build_and_names():
    reg = Registry("widget", "my.module")

    @reg.register("square")
    class Square:
        def __init__(self, side):
            self.side = side

    assert reg.build("square", 3).side == 3
    assert reg.names() == ["square"] and "square" in reg


def test_unknown_name_lists_close_matches_and_all_names():
    reg = Registry("widget", "my.module")
    for name in ["blip2_opt", "blip2_internlm", "blip2"]:
        reg.register(name)(type(name, (), {}))
    with pytest.raises(KeyError) as err:
        reg.get("blip2_optt")
    msg = str(err.value)
    assert "Did you mean 'blip2_opt'" in msg
    assert "['blip2', 'blip2_internlm', 'blip2_opt']" in msg
    assert "import its module" in msg and "my.module" in msg


def test_registering_twice_names_both():
    reg = Registry("widget", "my.module")

    @reg.register("dup")
    def first():
        pass

    with pytest.raises(KeyError, match="registered twice.*first.*second"):
        @reg.register("dup")
        def second():
            pass


def test_builtin_registries_are_filled_by_imports():
    import lavis_lite  # noqa: F401
    from lavis_lite.registry import LR_SCHEDULERS, MODELS, RUNNERS, TASKS

    assert "bow_tagger" in MODELS
    assert "image_text_pretrain" in TASKS
    assert {"linear_warmup_cosine_lr", "linear_warmup_step_lr"} <= set(LR_SCHEDULERS.names())
    assert RUNNERS.names() == ["runner_base", "runner_iter"]


def test_model_zoo_and_load_model():
    from lavis_lite.models import load_model, model_zoo

    table = str(model_zoo)
    assert "bow_tagger" in table and "tiny" in table
    model = load_model("bow_tagger", "tiny", is_eval=True)
    assert not model.training
    with pytest.raises(KeyError, match="choose one of \\['tiny'\\]"):
        load_model("bow_tagger", "huge")
