"""Vectorized MinHash over character n-grams, LSH banding and union-find.

Shingles are character n-grams hashed from their code points (polynomial hash + a 64-bit mixer, all
numpy); the permutation family is h_i(x) = (a_i·x + b_i) mod 2^32 with odd a_i (a bijection of the
32-bit hash space), evaluated as one [shingles, num_perm] matrix per chunk and reduced with a min.
That keeps a signature at ~0.1 µs per shingle, an order of magnitude under datasketch's per-shingle
SHA-1 + modular-prime arithmetic, with the same estimator accuracy (tests check bias and variance).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

import numpy as np

_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # multiplier of the rolling polynomial over code points
_CHUNK = 4096  # shingles per matrix block: [4096, 128] uint32 = 2 MiB stays in cache


def hash64(text: str) -> int:
    """A stable 64-bit hash of a string (independent of PYTHONHASHSEED and of the process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer: spreads polynomial hashes over all bits."""
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> _U64(33))


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint32 hashes of all character n-grams of `text` (the whole text if it is shorter than n)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(_U64)
    if cp.size == 0:
        return np.zeros(0, np.uint32)
    n = min(ngram, cp.size)
    count = cp.size - n + 1
    h = np.zeros(count, _U64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _POLY + cp[k:k + count]
        h = h + _U64(n)  # n-grams of different lengths never share a hash by construction
        return (_mix64(h) >> _U64(32)).astype(np.uint32)


@dataclasses.dataclass(frozen=True)
class MinHasher:
    """MinHash signatures with `num_perm` permutations over character `ngram` shingles."""

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**32, self.num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        b = rng.integers(0, 2**32, self.num_perm, dtype=np.uint64).astype(np.uint32)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)

    def signature(self, text: str) -> np.ndarray:
        """uint32[num_perm] signature; an empty text gets all-ones (it matches only empty texts)."""
        x = shingle_hashes(text, self.ngram)
        out = np.full(self.num_perm, np.iinfo(np.uint32).max, np.uint32)
        block = np.empty((min(_CHUNK, max(x.size, 1)), self.num_perm), np.uint32)
        for start in range(0, x.size, _CHUNK):
            c = x[start:start + _CHUNK]
            t = block[:c.size]
            np.multiply(c[:, None], self._a, out=t)  # wraps mod 2^32: the permutation family
            np.add(t, self._b, out=t)
            np.minimum(out, t.min(axis=0), out=out)
        return out

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.signature(t) for t in texts]) if texts else np.zeros(
            (0, self.num_perm), np.uint32)


def _integrate(f, lo: float, hi: float, steps: int = 200) -> float:
    xs = np.linspace(lo, hi, steps + 1)
    ys = f(xs)
    return float(np.sum((ys[1:] + ys[:-1]) * 0.5 * np.diff(xs)))


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive/negative areas of the S-curve."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = _integrate(lambda s: 1 - (1 - (1 - s ** r) ** b), threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[docs, bands]: one hash per band of `rows` consecutive signature values."""
    sig = signatures[:, :bands * rows].astype(_U64).reshape(len(signatures), bands, rows)
    h = np.zeros(sig.shape[:2], _U64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            h = _mix64(h * _POLY + sig[:, :, j])
        return h ^ (np.arange(bands, dtype=_U64) * _U64(0x9E3779B97F4A7C15))


def bucket_pairs(keys: np.ndarray, docs: np.ndarray, window: int = 16) -> np.ndarray:
    """Candidate pairs int[n, 2] of `docs` values that share a key.

    Every doc is paired with the bucket's first doc and with the next `window` docs of its bucket, so
    buckets of up to window+1 docs give all their pairs and a huge bucket (k identical short texts)
    gives O(k·window) pairs, not k^2; connected components need no more.
    """
    if keys.size == 0:
        return np.zeros((0, 2), docs.dtype)
    order = np.lexsort((docs, keys))
    k, d = keys[order], docs[order]
    starts = np.r_[True, k[1:] != k[:-1]]
    head = d[np.maximum.accumulate(np.where(starts, np.arange(k.size), 0))]
    out = [np.stack([head[~starts], d[~starts]], axis=1)]
    for o in range(1, min(window, k.size - 1) + 1):
        same = k[o:] == k[:-o]
        out.append(np.stack([d[:-o][same], d[o:][same]], axis=1))
    pairs = np.concatenate(out)
    return pairs[pairs[:, 0] != pairs[:, 1]]


class UnionFind:
    """Union-find over arbitrary hashable ids with path halving and union by size."""

    def __init__(self):
        self.parent: dict = {}
        self.size: dict = {}

    def find(self, x):
        parent = self.parent
        if x not in parent:
            parent[x], self.size[x] = x, 1
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def components(self) -> list[list]:
        groups: dict = {}
        for x in self.parent:
            groups.setdefault(self.find(x), []).append(x)
        return list(groups.values())


def near_duplicate_pairs(texts: Sequence[str], *, hasher: MinHasher, threshold: float,
                         bands: int | None = None, rows: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """In-memory reference: (verified pairs int[n, 2] of text indices, their estimated Jaccard)."""
    if bands is None or rows is None:
        bands, rows = optimal_bands(threshold, hasher.num_perm)
    sigs = hasher.signatures(texts)
    bh = band_hashes(sigs, bands, rows)
    idx = np.arange(len(texts), dtype=np.int64)
    cand = np.concatenate([bucket_pairs(bh[:, j], idx) for j in range(bands)]
                          ) if len(texts) else np.zeros((0, 2), np.int64)
    cand = np.unique(np.sort(cand, axis=1), axis=0)
    jac = (sigs[cand[:, 0]] == sigs[cand[:, 1]]).mean(axis=1) if len(cand) else np.zeros(0)
    ok = jac >= threshold
    return cand[ok], jac[ok]


def clusters_from_pairs(pairs: Iterable[tuple]) -> list[list]:
    uf = UnionFind()
    for a, b in pairs:
        uf.union(a, b)
    return uf.components()
