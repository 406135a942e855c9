"""Block-diagonal attention over variable-length segments, as a static layout.

Qwen2.5-VL's vision encoder reorders its patches window by window and attends within each
window (`cu_window_seqlens`: consecutive segments of the reordered sequence, of unequal
lengths at the grid's edges), and within each frame in its full-attention layers (`cu_seqlens`).
The image grid is known when tracing, so the layout is numpy: each segment is gathered into
one row of `width` slots (the longest segment), its padding slots marked invalid; attention
then runs on [B·S, width] rows with right padding, which every kernel takes (the fused GPU
kernel as `key_value_seq_lengths`), and one gather puts the tokens back in sequence order.
Padding slots cost (width·S - L) extra rows: for 64-patch windows on a 24 x 42 grid, 14%.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """index int32 [S, W]: the sequence position each slot holds (padding slots: 0);
    valid bool [S, W]; back int32 [L]: the flat slot (s·W + w) of each sequence position."""

    index: np.ndarray
    valid: np.ndarray
    back: np.ndarray

    @classmethod
    def from_lengths(cls, lengths, order=None) -> Segments:
        """Segments of `lengths` consecutive tokens of the sequence taken in `order` (a
        permutation of range(L); default the sequence's own order)."""
        lengths = np.asarray(lengths, np.int64)
        if lengths.ndim != 1 or lengths.size == 0 or (lengths < 1).any():
            raise ValueError(f"segment lengths must be a non-empty list of positive counts, got {lengths.tolist()}")
        total = int(lengths.sum())
        order = np.arange(total) if order is None else np.asarray(order, np.int64)
        if sorted(order.tolist()) != list(range(total)):
            raise ValueError(f"order must be a permutation of range({total}), the segments' total length")
        width = int(lengths.max())
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        w = np.arange(width)
        valid = w[None, :] < lengths[:, None]
        taken = np.where(valid, starts[:, None] + w[None, :], 0)
        index = np.where(valid, order[taken], 0).astype(np.int32)
        back = np.empty(total, np.int32)
        back[index[valid]] = np.flatnonzero(valid.ravel())
        return cls(index, valid, back)

    @property
    def shape(self) -> tuple[int, int]:
        return self.index.shape

    def mask(self) -> np.ndarray:
        """The equivalent dense mask over the sequence: bool [L, L], True where two positions
        share a segment (the reference the tests hold every kernel to)."""
        seg = np.empty(self.back.size, np.int64)
        seg[self.index[self.valid]] = np.nonzero(self.valid)[0]
        return seg[:, None] == seg[None, :]
