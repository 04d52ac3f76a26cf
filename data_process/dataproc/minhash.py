"""MinHash signatures and LSH band keys, computed for a whole batch of texts with numpy.

Why not datasketch: it hashes every shingle with SHA-1 in a Python loop and builds one object per
document; here a batch of texts becomes one array of code points, shingles are rolling polynomial hashes
over that array, and the permutations are one (shingles x permutations) uint32 product reduced per
document with `np.minimum.reduceat`. The permutation family is the one datasketch 2.x uses by default
("affine32": a well-mixed 32-bit hash, then `a * h + b mod 2**32` with odd `a`), so estimates behave
the same; only the Python overhead is gone. tests/benchmarks/bench_near_dedup.py measures both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

_BASE = np.uint64(0x100000001B3)  # odd: a unit modulo 2**64, so the polynomial hash keeps all information
_WORD_BASE = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MAX32 = np.uint32(0xFFFFFFFF)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
_CHUNK = 1 << 21  # shingles x permutations per step (8 MiB of uint32): bounded memory, few numpy calls
# Characters that end a word in word mode: ASCII space, controls and punctuation, and the CJK/full-width
# punctuation blocks.
_SEPARATORS = np.zeros(0x10000, dtype=bool)
for _lo, _hi in ((0x00, 0x30), (0x3A, 0x41), (0x5B, 0x61), (0x7B, 0xC0), (0x2000, 0x2070), (0x3000, 0x3040),
                 (0xFE30, 0xFE70), (0xFF00, 0xFF10), (0xFF1A, 0xFF21), (0xFF3B, 0xFF41), (0xFF5B, 0xFF66)):
    _SEPARATORS[_lo:_hi] = True


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the whole word (polynomial hashes alone don't)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _ngrams(units: np.ndarray, doc: np.ndarray, n: int, ndocs: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n consecutive units inside one document (ordered by document), and their documents.

    A document with fewer than n units gets a single shingle of all of them, so it still has a signature.
    """
    m = len(units)
    if m >= n:
        h = units[: m - n + 1].copy()
        for k in range(1, n):
            h *= _BASE
            h += units[k: m - n + 1 + k]
        valid = doc[: m - n + 1] == doc[n - 1:]
        hashes, owner = h[valid], doc[: m - n + 1][valid]
    else:
        hashes, owner = np.empty(0, np.uint64), np.empty(0, np.int64)
    has_units = np.bincount(doc, minlength=ndocs) > 0
    short = np.flatnonzero(has_units & (np.bincount(owner, minlength=ndocs) == 0))
    if len(short):
        starts = np.searchsorted(doc, short)
        ends = np.searchsorted(doc, short, side="right")
        extra = np.empty(len(short), np.uint64)
        for i, (s, e) in enumerate(zip(starts, ends)):
            h1 = units[s:s + 1].copy()
            for k in range(s + 1, e):
                h1 *= _BASE
                h1 += units[k:k + 1]
            extra[i] = h1[0]
        hashes = np.concatenate([hashes, extra])
        owner = np.concatenate([owner, short])
        order = np.argsort(owner, kind="stable")
        hashes, owner = hashes[order], owner[order]
    return hashes, owner


def _word_units(codes: np.ndarray, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One hash per word (a run of non-separator characters), via prefix sums of a polynomial hash.

    With S[k] = sum_{t<k} c[t] * B^-t, the word [s, e) hashes to B^(e-1) * (S[e] - S[s]) modulo 2**64:
    every word of the batch in a few vector operations, whatever its length.
    """
    sep = np.ones(len(codes), dtype=bool)
    bmp = codes < 0x10000
    sep[bmp] = _SEPARATORS[codes[bmp]]
    boundary = np.r_[True, doc[1:] != doc[:-1]] if len(doc) else np.empty(0, bool)
    word = ~sep
    starts = np.flatnonzero(word & (boundary | np.r_[True, sep[:-1]]))
    ends = np.flatnonzero(word & (np.r_[boundary[1:], True] | np.r_[sep[1:], True])) + 1
    if not len(starts):
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    inv = pow(int(_WORD_BASE), -1, 1 << 64)
    powers = np.full(len(codes), _WORD_BASE, np.uint64).cumprod() if len(codes) else np.empty(0, np.uint64)
    inv_powers = np.full(len(codes), np.uint64(inv), np.uint64)
    inv_powers[0] = 1
    inv_powers = inv_powers.cumprod()
    prefix = np.zeros(len(codes) + 1, np.uint64)
    np.cumsum(codes.astype(np.uint64) * inv_powers, out=prefix[1:])
    # powers[k] = B^(k+1), so B^(e-1) is powers[e-2]; a one-letter word at 0 has e-1 == 0 and needs B^0.
    scale = np.where(ends >= 2, powers[np.maximum(ends - 2, 0)], np.uint64(1))
    return scale * (prefix[ends] - prefix[starts]), doc[starts]


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 128
    ngram: int = 5
    unit: str = "auto"  # auto | char | word
    seed: int = 42

    @cached_property
    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 1 << 32, size=self.num_perm, dtype=np.uint64) | np.uint64(1)  # odd: a bijection
        b = rng.integers(0, 1 << 32, size=self.num_perm, dtype=np.uint64)
        return a.astype(np.uint32), b.astype(np.uint32)

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit shingle hashes of all texts, ordered by text, and the index of the text of each."""
        ndocs = len(texts)
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=ndocs)
        doc = np.repeat(np.arange(ndocs), lengths)
        if self.unit == "auto":
            # Characters from U+2E80 on are the CJK blocks (and full-width forms): a text where they make
            # up 30% is written without spaces between words, so words cannot be the unit.
            wide = np.r_[0, np.cumsum(codes >= 0x2E80)]
            ends = np.cumsum(lengths)
            use_char = (lengths > 0) & (wide[ends] - wide[ends - lengths] >= 0.3 * lengths)
        else:
            use_char = np.full(ndocs, self.unit == "char")
        parts = []
        if use_char.all() or not use_char.any():
            chars, word_codes, word_doc = (codes, None, None) if use_char.all() else (None, codes, doc)
            char_doc = doc
        else:
            char_rows = use_char[doc]
            chars, char_doc = codes[char_rows], doc[char_rows]
            word_codes, word_doc = codes[~char_rows], doc[~char_rows]
        if chars is not None:
            parts.append(_ngrams(chars.astype(np.uint64), char_doc, self.ngram, ndocs))
        if word_codes is not None:
            parts.append(_ngrams(*_word_units(word_codes, word_doc), self.ngram, ndocs))
        hashes = np.concatenate([p[0] for p in parts])
        owner = np.concatenate([p[1] for p in parts])
        if len(parts) > 1:
            order = np.argsort(owner, kind="stable")
            hashes, owner = hashes[order], owner[order]
        return (mix64(hashes) >> np.uint64(32)).astype(np.uint32), owner

    def signatures(self, texts: list[str]) -> np.ndarray:
        """uint32 array (len(texts), num_perm); a text with no characters gets all-max values."""
        hashes, owner = self.shingles(texts)
        a, b = self.permutations
        sig = np.full((len(texts), self.num_perm), _MAX32, dtype=np.uint32)
        docs = np.flatnonzero(np.bincount(owner, minlength=len(texts)))
        starts = np.searchsorted(owner, docs)
        bounds = np.r_[starts, len(hashes)]
        per_chunk = max(1, _CHUNK // self.num_perm)
        lo = 0
        while lo < len(docs):
            # Whole documents per step, about per_chunk shingles each, so memory stays bounded.
            hi = max(lo + 1, int(np.searchsorted(bounds, bounds[lo] + per_chunk, side="right")) - 1)
            hi = min(hi, len(docs))
            # (permutations x shingles): the reduction runs along contiguous memory, ten times faster
            # than reducing the transposed layout.
            block = a[:, None] * hashes[None, bounds[lo]:bounds[hi]]
            block += b[:, None]
            sig[docs[lo:hi]] = np.minimum.reduceat(block, bounds[lo:hi] - bounds[lo], axis=1).T
            lo = hi
        return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band): documents that agree on all `rows` values of a band share it."""
    part = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)
    keys = np.zeros((len(sig), bands), dtype=np.uint64)
    for r in range(rows):
        keys = mix64(keys + part[:, :, r] + np.uint64(r + 1))
    return keys


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false positive + false negative area of the LSH S-curve.

    The criterion of datasketch's MinHashLSH (which integrates with scipy); a trapezoid rule over 201
    points picks the same pair. See `candidate_bands` for the weights this toolkit uses.
    """
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    best, best_error = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - below ** r) ** b, below)
            fn = _trapezoid((1 - above ** r) ** b, above)
            error = fp * fp_weight + fn * fn_weight
            if error < best_error:
                best, best_error = (b, r), error
    return best


def candidate_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """The default (bands, rows): weighted 0.05 / 0.95 towards recall.

    Every candidate pair is verified against the signatures afterwards, so a false positive of the LSH
    step costs one vector comparison while a false negative is a duplicate left in the data. At
    threshold 0.8 and 128 permutations this gives 16 x 8: a pair at Jaccard 0.8 becomes a candidate
    with probability 0.95 (0.40 with datasketch's equal weights, 9 x 13), one at 0.5 with 0.06.
    """
    return optimal_bands(threshold, num_perm, fp_weight=0.05, fn_weight=0.95)
