"""Tasks. Importing this package registers every built-in task."""
from lavis_lite.tasks import base, captioning, retrieval, vqa  # noqa: F401  (register the tasks)
