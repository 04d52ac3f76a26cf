"""MinHash signatures, LSH candidates and clustering: estimates match true Jaccard, planted duplicates are found."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_process.dataproc.dedup import candidate_pairs, components, exact_representatives, near_duplicates
from data_process.dataproc.minhash import MinHasher, band_keys, candidate_bands, optimal_bands

VOCAB = ["".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + i % 6))
         for i in range(3000)]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def hanzi(rng: random.Random, n: int) -> list[str]:
    return [chr(0x4E00 + rng.randrange(3000)) for _ in range(n)]


def jaccard(a: list[str], b: list[str], n: int) -> float:
    sa = {tuple(a[i:i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(b[i:i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


@pytest.mark.parametrize("unit,make,sep", [("word", words, " "), ("char", hanzi, "")])
def test_signatures_estimate_the_true_jaccard(unit: str, make: object, sep: str) -> None:
    rng = random.Random(1)
    hasher = MinHasher(num_perm=256, ngram=5, unit="auto", seed=3)  # auto must pick `unit` for these texts
    errors = []
    for _ in range(60):
        a = make(rng, 150)  # type: ignore[operator]
        b = list(a)
        for _ in range(rng.randrange(0, 25)):
            b[rng.randrange(len(b))] = make(rng, 1)[0]  # type: ignore[operator]
        sig = hasher.signatures([sep.join(a), sep.join(b)])
        errors.append(float((sig[0] == sig[1]).mean()) - jaccard(a, b, 5))
    # 256 permutations: one estimate has a standard deviation of at most 0.031.
    assert abs(np.mean(errors)) < 0.015
    assert np.max(np.abs(errors)) < 0.13


def test_word_and_character_units() -> None:
    words1 = MinHasher(num_perm=64, ngram=1, unit="auto")
    sig = words1.signatures(["alpha beta", "beta  alpha", "alpha gamma", "高血压病", "病压血高", "ab", "ba"])
    assert (sig[0] == sig[1]).all()  # the same set of words, wherever they stand
    assert not (sig[0] == sig[2]).all()
    assert (sig[3] == sig[4]).all()  # Chinese is shingled by characters
    assert not (sig[5] == sig[6]).all()  # English by words: 'ab' and 'ba' are different words


def test_texts_shorter_than_one_shingle_still_get_a_signature() -> None:
    sig = MinHasher(num_perm=32, ngram=5, unit="char").signatures(["短文", "短文", "长文", ""])
    assert (sig[0] == sig[1]).all() and not (sig[0] == sig[2]).all()
    assert (sig[3] == np.iinfo(np.uint32).max).all() and not (sig[0] == np.iinfo(np.uint32).max).all()


def test_signatures_do_not_depend_on_the_batch() -> None:
    rng = random.Random(5)
    texts = [" ".join(words(rng, rng.randrange(1, 80))) for _ in range(50)] + ["".join(hanzi(rng, 40))]
    hasher = MinHasher(num_perm=64, ngram=3)
    whole = hasher.signatures(texts)
    one_by_one = np.concatenate([hasher.signatures([t]) for t in texts])
    assert (whole == one_by_one).all()


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("num_perm", [64, 128])
def test_optimal_bands_match_datasketch(threshold: float, num_perm: int) -> None:
    lsh = pytest.importorskip("datasketch.lsh")
    assert optimal_bands(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_exact_representatives_point_at_the_first_copy() -> None:
    keys = np.array([[1, 2], [3, 4], [1, 2], [1, 3], [3, 4], [1, 2]], dtype=np.uint64)
    assert exact_representatives(keys).tolist() == [0, 1, 0, 3, 1, 0]


def test_components_follow_chains_to_the_smallest_index() -> None:
    left, right = np.array([5, 1, 4, 0, 8]), np.array([3, 2, 3, 1, 7])
    assert components(9, left, right).tolist() == [0, 0, 0, 3, 3, 3, 6, 7, 7]


def test_a_large_bucket_gives_linear_pairs() -> None:
    sig = np.tile(np.arange(16, dtype=np.uint32), (500, 1))
    keys = band_keys(sig, 4, 4)
    assert len(candidate_pairs(keys)) == 499  # each row paired with the bucket's first row, across all bands
    near = near_duplicates(sig, np.arange(500), 4, 4, 0.8)
    assert near.removed.sum() == 499 and (near.rep == 0).all()


def test_planted_near_duplicates_are_removed_and_distinct_texts_kept() -> None:
    rng = random.Random(11)
    base = [words(rng, 200) for _ in range(60)]
    texts = [" ".join(b) for b in base]
    planted = {}
    for k, source in enumerate(range(0, 60, 6)):  # 10 near copies: one or two words replaced
        copy = list(base[source])
        for _ in range(1 + k % 2):
            copy[rng.randrange(10, 190)] = rng.choice(VOCAB)
        assert 0.88 < jaccard(base[source], copy, 5) < 1.0
        planted[len(texts)] = source
        texts.append(" ".join(copy))
    for source in range(1, 60, 12):  # 5 texts sharing half of another: similar, but no duplicates
        texts.append(" ".join(base[source][:100] + words(rng, 100)))
    for source in range(2, 60, 4):  # 15 copies with ten words replaced: LSH candidates often, still no duplicates
        copy = list(base[source])
        for place in range(5, 200, 20):
            copy[place + rng.randrange(10)] = rng.choice(VOCAB)
        assert 0.5 < jaccard(base[source], copy, 5) < 0.72
        texts.append(" ".join(copy))
    hasher = MinHasher(num_perm=128, ngram=5)
    sig = hasher.signatures(texts)
    bands, rows = candidate_bands(0.8, 128)  # the pipeline's default: tuned for recall, so verification matters
    near = near_duplicates(sig, np.arange(len(texts)), bands, rows, 0.8)
    removed = {int(i): int(near.rep[i]) for i in np.flatnonzero(near.removed)}
    assert removed == planted
    assert near.candidate_pairs > near.verified_pairs  # the check against the signatures had work to do
    assert all(near.similarity[i] >= 0.8 for i in planted)
