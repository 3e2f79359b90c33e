"""Fixtures shared by all tests: a small shapes data set (generated once per session)."""
from __future__ import annotations

pytest_plugins = ["tests.fixtures.llm_checkpoints"]  # tiny LLM checkpoints in official formats

import dataclasses
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch

from lavis_lite.data.shapes import ShapesSpec, ensure_shapes

SMALL = ShapesSpec(seed=0, train=20, val=6, test=6, image_size=64)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: extra threads only spin, and on a shared 2-core box slow training down. A test module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_spec() -> dict[str, int]:
    """The generator fields of the shared data set, as ``ensure_shapes`` / yaml ``generator`` take them."""
    return dataclasses.asdict(SMALL)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory, small_spec) -> Path:
    """Read-only: tests that change files use ``shapes_copy``."""
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "shapes", **small_spec)


@pytest.fixture
def shapes_copy(shapes_root, tmp_path) -> Path:
    return Path(shutil.copytree(shapes_root, tmp_path / "shapes"))
