"""Exact and near-duplicate decisions over the whole corpus, from per-row hashes and MinHash signatures.

Both keep the first occurrence in input order (files in the order given, rows in file order), so a rerun
or a different number of worker processes removes exactly the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_process.dataproc.minhash import band_keys

_PAIR_CHUNK = 200_000


def exact_representatives(keys: np.ndarray) -> np.ndarray:
    """For each row the index of the first row with the same 128-bit key (itself when it is the first).

    `keys` is (n, 2) uint64. Sorting fixed-width keys needs a few bytes per row, not a set of strings.
    """
    if len(keys) == 0:
        return np.empty(0, np.int64)
    order = np.lexsort((np.arange(len(keys)), keys[:, 1], keys[:, 0]))
    sorted_keys = keys[order]
    new_group = np.r_[True, np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)]
    first = order[np.maximum.accumulate(np.where(new_group, np.arange(len(keys)), 0))]
    rep = np.empty(len(keys), np.int64)
    rep[order] = first
    return rep


@dataclass
class NearDuplicates:
    """Connected components of verified candidate pairs: `rep[i]` is the smallest index in i's component."""

    rep: np.ndarray
    similarity: np.ndarray  # estimated Jaccard of each row with its representative (1.0 for representatives)
    candidate_pairs: int
    verified_pairs: int
    bands: int
    rows: int

    @property
    def removed(self) -> np.ndarray:
        return self.rep != np.arange(len(self.rep))


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs (first, other) of rows sharing a band key, as sorted unique (m, 2) int64.

    Each row of a bucket is paired with the bucket's first row only: O(bucket) pairs instead of
    O(bucket^2), and the components come out the same whenever the bucket's rows are all similar.
    """
    n = len(keys)
    found = []
    for band in range(keys.shape[1]):
        column = np.asarray(keys[:, band])
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        new_group = np.r_[True, ordered[1:] != ordered[:-1]]
        first = order[np.maximum.accumulate(np.where(new_group, np.arange(n), 0))]
        member = ~new_group
        found.append(first[member].astype(np.int64) * n + order[member])
    if not found:
        return np.empty((0, 2), np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1) if n else np.empty((0, 2), np.int64)


def similarity(sig: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of row pairs: the share of equal MinHash values."""
    out = np.empty(len(left), np.float32)
    for lo in range(0, len(left), _PAIR_CHUNK):
        hi = lo + _PAIR_CHUNK
        out[lo:hi] = (np.asarray(sig[left[lo:hi]]) == np.asarray(sig[right[lo:hi]])).mean(axis=1)
    return out


def components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Smallest index of each node's connected component (hook to the smaller label, then pointer jumping)."""
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[left], labels[right])
        new = labels.copy()
        # Hook both endpoints and their current labels, so a whole tree moves in one step.
        for nodes in (left, right, labels[left], labels[right]):
            np.minimum.at(new, nodes, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new


def near_duplicates(sig: np.ndarray, rows: np.ndarray, bands: int, band_rows: int,
                    threshold: float) -> NearDuplicates:
    """Near duplicates among `sig[rows]`; indices in the result are positions in `rows`.

    Candidates come from LSH buckets and are kept when their estimated Jaccard reaches `threshold`: the
    check removes the S-curve's false positives (pairs that shared a band by chance) at the cost of one
    vector comparison per candidate. `sig` may be a memory map: it is read in chunks and by pair.
    """
    n = len(rows)
    keys = np.empty((n, bands), np.uint64)
    for lo in range(0, n, _PAIR_CHUNK):
        keys[lo:lo + _PAIR_CHUNK] = band_keys(np.asarray(sig[rows[lo:lo + _PAIR_CHUNK]]), bands, band_rows)
    pairs = candidate_pairs(keys)
    del keys
    sims = similarity(sig, rows[pairs[:, 0]], rows[pairs[:, 1]])
    edges = pairs[sims >= threshold]
    rep = components(n, edges[:, 0], edges[:, 1])
    sim = np.ones(n, np.float32)
    moved = np.flatnonzero(rep != np.arange(n))
    sim[moved] = similarity(sig, rows[moved], rows[rep[moved]])
    return NearDuplicates(rep, sim, len(pairs), len(edges), bands, band_rows)
