"""A sum-tree over priorities, vectorised in numpy: batched updates and stratified sampling cost
O(batch · log capacity) numpy work with no Python loop over the batch."""

from __future__ import annotations

import numpy as np


class SumTree:
    """Leaves hold non-negative priorities; each inner node holds the sum of its two children.

    The tree is one flat float64 array in heap order (root at 1, children of i at 2i and 2i+1),
    with the leaves at `[size, 2 * size)` where `size` is `capacity` rounded up to a power of two.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.size = 1 << max(0, (capacity - 1).bit_length())
        self.depth = self.size.bit_length() - 1
        self.tree = np.zeros(2 * self.size, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    @property
    def nbytes(self) -> int:
        return int(self.tree.nbytes)

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.tree[np.asarray(indices) + self.size]

    def leaves(self) -> np.ndarray:
        return self.tree[self.size : self.size + self.capacity]

    def set(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaf priorities (repeated indices: the last value wins) and refresh their ancestors."""
        nodes = np.asarray(indices, dtype=np.int64) + self.size
        self.tree[nodes] = priorities
        # Duplicate nodes are harmless: each level is recomputed from the finished level below.
        for _ in range(self.depth):
            nodes = nodes >> 1
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]

    def rebuild(self) -> None:
        """Recompute every inner node from the leaves (after loading leaves wholesale)."""
        for level in range(self.depth - 1, -1, -1):
            lo, hi = 1 << level, 1 << (level + 1)
            self.tree[lo:hi] = self.tree[2 * lo : 2 * hi : 2] + self.tree[2 * lo + 1 : 2 * hi : 2]

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf index for each prefix-sum value in [0, total): the i with
        sum(p[:i]) <= value < sum(p[:i+1])."""
        values = np.array(values, dtype=np.float64)
        nodes = np.ones(values.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = self.tree[2 * nodes]
            right = values >= left
            values -= left * right
            nodes = 2 * nodes + right
        return nodes - self.size

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified proportional sampling: one draw from each of `n` equal slices of the mass."""
        total = self.total
        if total <= 0.0:
            raise ValueError("cannot sample from a sum-tree whose priorities are all zero")
        values = (np.arange(n) + rng.random(n)) * (total / n)
        idx = self.find(np.minimum(values, np.nextafter(total, 0.0)))
        # Float rounding can walk into an empty leaf at the right edge; step back to a filled one.
        bad = self.tree[idx + self.size] <= 0.0
        if bad.any():
            filled = np.flatnonzero(self.leaves() > 0.0)
            pos = np.searchsorted(filled, idx[bad], side="right") - 1
            idx[bad] = filled[pos.clip(min=0)]
        return idx
