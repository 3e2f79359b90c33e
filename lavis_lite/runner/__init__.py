"""The training loop. Importing this package registers the LR schedules and runners."""
from lavis_lite.runner import optim  # noqa: F401  (registers the LR schedules)
from lavis_lite.runner.runner import Runner

__all__ = ["Runner"]
