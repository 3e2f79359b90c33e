"""lmms-eval's entry point for the model ``lavis_lite`` (setup.py: group ``lmms_eval.models``).

lmms-eval loads every entry point of that group whenever ``lmms_eval.models`` is imported, for any model and
any command, so this module sits outside the ``lavis_lite`` package: importing it must not import lavis_lite
(torch models, transformers, timm: seconds). lmms-eval imports the adapter,
``lavis_lite/integrations/lmms_eval.py``, only when ``--model lavis_lite`` is asked for.
"""
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="lavis_lite", simple_class_path="lavis_lite.integrations.lmms_eval.LavisLite")
