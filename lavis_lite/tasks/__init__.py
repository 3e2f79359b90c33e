"""Tasks. Importing this package registers every built-in task."""
from lavis_lite.tasks import base  # noqa: F401  (registers image_text_pretrain)
