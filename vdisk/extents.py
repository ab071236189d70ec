"""Extents: sorted, merged byte ranges, as numpy arrays."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import numpy.typing as npt


class Extents:
    """Sorted, non-overlapping, merged runs of bytes.

    ``offsets`` and ``lengths`` are numpy uint64 arrays; iterating yields
    ``(offset, length)`` tuples of Python ints; ``len()`` is the number of
    runs and ``nbytes`` their total length.
    """

    __slots__ = ("offsets", "lengths")

    def __init__(self, offsets: npt.ArrayLike = (), lengths: npt.ArrayLike = ()):
        self.offsets = np.ascontiguousarray(offsets, dtype=np.uint64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.uint64)
        if self.offsets.shape != self.lengths.shape or self.offsets.ndim != 1:
            raise ValueError("offsets and lengths must be 1-D arrays of one length")

    @classmethod
    def from_block_runs(cls, starts: npt.ArrayLike, counts: npt.ArrayLike, block_shift: int,
                        size: int) -> "Extents":
        """Byte extents of block runs, the last clipped to the virtual size."""
        starts = np.asarray(starts, dtype=np.uint64)
        counts = np.asarray(counts, dtype=np.uint64)
        offsets = starts << np.uint64(block_shift)
        ends = np.minimum((starts + counts) << np.uint64(block_shift), np.uint64(size))
        keep = ends > offsets
        return cls(offsets[keep], (ends - offsets)[keep])

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum(dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.offsets.tolist(), self.lengths.tolist())

    def __bool__(self) -> bool:
        return len(self.offsets) > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Extents):
            return NotImplemented
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.lengths, other.lengths)

    def __repr__(self) -> str:
        head = ", ".join(f"({o}, {n})" for o, n in list(self)[:4])
        more = f", ... {len(self) - 4} more" if len(self) > 4 else ""
        return f"Extents([{head}{more}], nbytes={self.nbytes})"

    def to_list(self) -> list[dict[str, int]]:
        return [{"offset": o, "length": n} for o, n in self]
