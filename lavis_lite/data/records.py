"""Annotation storage that forked DataLoader workers share instead of copying page by page.

A list of dicts is millions of small Python objects; every access in a forked worker touches their
reference counts, so copy-on-write slowly duplicates the whole list in each worker. Here the records
are pickled into one uint8 array plus int64 offsets: two objects, whatever the number of records.
"""
from __future__ import annotations

import operator
import pickle
from typing import Any, Iterable, Iterator

import numpy as np


class PackedRecords:
    """An immutable sequence of records (any picklable objects), each unpickled on access."""

    def __init__(self, records: Iterable[Any]):
        blobs = [pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) for record in records]
        self._offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        index, n = operator.index(index), len(self)
        if not -n <= index < n:
            raise IndexError(f"record index {index} out of range for {n} records")
        index %= n
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].data)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes + self._offsets.nbytes
