"""Adapters that let other evaluation frameworks run lavis_lite models. Each lives in its own module and
imports its framework there, so none of them is a dependency of the core package:

- ``lmms_eval.py``: the lmms-eval model ``lavis_lite`` (``pip install -e '.[lmms]'``; docs/evaluation.md).
"""
