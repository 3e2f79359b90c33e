"""Fixtures for the model tests: tiny BLIP-2 models and a bert-base-sized vocabulary on disk."""
from __future__ import annotations

import pytest

from tests.models.tiny_blip2 import tiny_model


@pytest.fixture
def tiny():
    """Factory: ``tiny(arch="blip2", seed=0, **overrides)`` builds the ``tiny`` model type."""
    return tiny_model


@pytest.fixture(scope="session")
def bert_base_vocab_dir(tmp_path_factory):
    """A vocab.txt with bert-base-uncased's size (30522, [PAD]=0), so len(tokenizer) = 30523 with [DEC]."""
    path = tmp_path_factory.mktemp("bert_base_vocab")
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(30522 - len(special))]
    (path / "vocab.txt").write_text("\n".join(special + words) + "\n")
    return path


@pytest.fixture(autouse=True)
def vit_counts_as_loaded(request, monkeypatch):
    """Model tests load checkpoints without image-encoder weights into tiny random encoders; outside
    tests that is refused (the encoder would silently stay random: see test_random_vit_is_refused)."""
    if "random_vit_guard" not in request.keywords:
        from lavis_lite.models.blip2_qformer import Blip2Base

        monkeypatch.setattr(Blip2Base, "vit_loaded", True)
