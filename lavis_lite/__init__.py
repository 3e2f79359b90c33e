"""lavis_lite: a small research framework for Q-Former vision-language models (BLIP-2)."""
from lavis_lite import runner, tasks  # noqa: F401  (register runners, LR schedules, tasks)
from lavis_lite.config import load_config
from lavis_lite.models import create_model, load_model, load_model_and_preprocess, model_zoo
from lavis_lite.registry import MODELS


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["create_model", "list_models", "load_config", "load_model", "load_model_and_preprocess", "model_zoo"]
