"""Split protocols of the compatible-training literature, as stateless row filters.

Membership is decided by a hash of the row id (data splits) or of the label (class splits) with a
seed, so every Ray Data task applies the same split to its block without coordination.

| protocol | old model trains on | new model trains on |
| --- | --- | --- |
| all | everything | everything |
| extended-data | ``old_fraction`` of the rows | all rows |
| extended-class | ``old_fraction`` of the classes | all classes |
| open-data | ``old_fraction`` of the rows | the other rows |
| open-class | ``old_fraction`` of the classes | the other classes |
"""

from __future__ import annotations

import numpy as np

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def unit_hash(x: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic value in [0, 1) for each int (splitmix64 of x + seed)."""
    with np.errstate(over="ignore"):  # wrap-around is the point of the mixing
        z = x.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_mask(
    protocol: str, role: str, ids: np.ndarray, labels: np.ndarray, old_fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of the rows that ``role`` ("old" or "new") trains on under ``protocol``."""
    if protocol == "all":
        return np.ones(len(ids), dtype=bool)
    by_class = protocol.endswith("-class")
    key = labels if by_class else ids
    in_old = unit_hash(np.asarray(key), seed) < old_fraction
    if role == "old":
        return in_old
    if protocol.startswith("extended"):
        return np.ones(len(ids), dtype=bool)
    if protocol.startswith("open"):
        return ~in_old
    raise ValueError(f"unknown split protocol {protocol!r}")


def old_classes(protocol: str, num_classes: int, old_fraction: float, seed: int) -> np.ndarray:
    """Boolean (num_classes,) of the classes the old model saw (all of them for data splits)."""
    if protocol.endswith("-class"):
        return unit_hash(np.arange(num_classes), seed) < old_fraction
    return np.ones(num_classes, dtype=bool)
