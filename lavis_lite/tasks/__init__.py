"""Tasks. Importing this package registers every built-in task."""
from lavis_lite.tasks import base, retrieval  # noqa: F401  (registers image_text_pretrain, retrieval)
