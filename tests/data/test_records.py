"""PackedRecords: round trip, indexing, and storage as two flat arrays."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from lavis_lite.data.records import PackedRecords

RECORDS = [{"image": "a.jpg", "caption": "a red circle", "image_id": "shapes_1"},
           {"image": "b.jpg", "caption": ["两个", "shapes"], "image_id": 7, "answer": None},
           {}]


def test_round_trip_and_indexing():
    packed = PackedRecords(RECORDS)
    assert len(packed) == 3
    assert [packed[i] for i in range(3)] == RECORDS == list(packed)
    assert packed[-1] == {} and packed[np.int64(1)] == RECORDS[1]
    packed[0]["caption"] = "changed"  # each access unpickles a fresh copy
    assert packed[0] == RECORDS[0]
    with pytest.raises(IndexError):
        packed[3]
    with pytest.raises(IndexError):
        packed[-4]


def test_storage_is_two_arrays_and_survives_pickling():
    packed = PackedRecords(RECORDS * 100)
    assert [type(v) for v in vars(packed).values()] == [np.ndarray, np.ndarray]
    assert packed._buffer.dtype == np.uint8 and packed._offsets.dtype == np.int64
    assert packed.nbytes == packed._buffer.nbytes + 8 * 301
    clone = pickle.loads(pickle.dumps(packed))  # what a spawned DataLoader worker receives
    assert list(clone) == RECORDS * 100


def test_empty():
    assert len(PackedRecords([])) == 0 and list(PackedRecords(iter([]))) == []
