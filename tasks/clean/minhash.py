"""One-permutation MinHash over character n-grams (batch-vectorized), LSH banding and union-find.

A batch of documents is hashed as one uint32 code-point array: every n-gram gets a polynomial hash
mod 2^32 and murmur3's 32-bit finalizer (a handful of SIMD passes over the batch, no per-document
loop). One-permutation hashing (Li, Owen & Zhang 2012) splits that one hash range into `num_perm`
bins by its top bits; a bin's signature value is its smallest hash (one scatter-min for the whole
batch), so a signature costs O(shingles) instead of O(shingles x permutations). Bins a short document
leaves empty are filled by optimal densification (Shrivastava 2017): bin j copies the first non-empty
bin along its own fixed random probe order. Two documents then agree on a bin with probability equal
to their Jaccard similarity, as with k independent permutations (tests check bias and variance).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Iterator, Sequence

import numpy as np

_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # band-hash multiplier (64-bit; bands are few per document)
_P32 = np.uint32(0x01000193)  # n-gram polynomial multiplier mod 2^32 (odd: each step is a bijection)
_EMPTY = np.uint32(0xFFFFFFFF)  # an empty bin (an empty text keeps it in every bin)
_GROUP_CHARS = 1 << 21  # code points hashed per numpy pass: 8 MiB uint32 arrays
_DENSE_BELOW = 512  # open bins left when densification switches from single probes to argmin
_FEW_BINS = 32  # documents with at most this many non-empty bins densify by a min over code rows


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


def _fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finalizer, in place (uint32 SIMD: about 1 ns per value for all five steps)."""
    t = np.empty_like(h)
    for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        np.right_shift(h, np.uint32(shift), out=t)
        np.bitwise_xor(h, t, out=h)
        if mul is not None:
            np.multiply(h, np.uint32(mul), out=h)
    return h


def _codepoints(texts: Sequence[str]) -> np.ndarray:
    """uint32 code points of the concatenated texts (lone surrogates kept as their own values)."""
    return np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)


def _ngram_hashes(cp: np.ndarray, lens: np.ndarray, n: int, salt: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mixed uint32 hashes of every character n-gram of the documents concatenated in `cp`, and the
    document index of each. A text shorter than n is one shingle (its whole text); the gram length
    is hashed in, so such a shingle never equals an n-gram."""
    total = cp.size
    starts = np.cumsum(lens) - lens
    pad = np.zeros(total + n - 1, np.uint32)
    pad[:total] = cp
    h = pad[:total].copy()
    short = (lens > 0) & (lens < n)
    whole = np.zeros(lens.size, np.uint32)  # polynomial of each short text
    with np.errstate(over="ignore"):
        for j in range(1, n):
            sel = short & (lens == j)
            whole[sel] = h[starts[sel]]
            np.multiply(h, _P32, out=h)
            np.add(h, pad[j:j + total], out=h)
        h += np.uint32((salt + n) & 0xFFFFFFFF)
        whole += (lens + salt).astype(np.uint32)
    h[starts[short]] = whole[short]
    _fmix32(h)
    valid = np.ones(total, bool)
    ends = starts + lens
    for o in range(1, n):  # the last n-1 positions of a document start no full n-gram
        valid[ends[lens > o] - o] = False
    doc = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
    return h[valid], doc[valid]


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint32 hashes of all character n-grams of `text` (the whole text if it is shorter than n)."""
    return _ngram_hashes(_codepoints([text]), np.array([len(text)], np.int64), ngram, 0)[0]


def _groups(lens: np.ndarray, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive document ranges of at most `limit` characters (a longer document alone)."""
    ends = np.cumsum(lens)
    lo = 0
    while lo < lens.size:
        base = ends[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, base + limit, side="right")))
        yield lo, hi
        lo = hi


@dataclasses.dataclass(frozen=True)
class MinHasher:
    """Densified one-permutation MinHash: `num_perm` bins over character `ngram` shingles."""

    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def __post_init__(self):
        k = self.num_perm
        if not 1 <= k <= 1 << 16 or self.ngram < 1:
            raise ValueError(f"MinHasher: num_perm={k} must be in [1, 65536], ngram={self.ngram} >= 1")
        rng = np.random.default_rng(self.seed)
        order = np.argsort(rng.random((k, k)), axis=1)  # bin j's probe order over all bins
        object.__setattr__(self, "_salt", int(rng.integers(0, 2**32)))
        object.__setattr__(self, "_probe", np.ascontiguousarray(order.T))  # [t, j]: t-th probe of j
        rank = np.argsort(order, axis=1).astype(np.int32)  # [j, c]: position of c in j's order
        object.__setattr__(self, "_rank", rank)
        object.__setattr__(self, "_code", rank.T * k + np.arange(k, dtype=np.int32)[:, None])

    def signature(self, text: str) -> np.ndarray:
        """uint32[num_perm] signature; an empty text gets all-ones (it matches only empty texts)."""
        return self.signatures([text])[0]

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """uint32[len(texts), num_perm]; the batch is hashed in a few numpy passes per 2M chars."""
        k = self.num_perm
        sig = np.full((len(texts), k), _EMPTY, np.uint32)
        flat = sig.reshape(-1)
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        n, step = self.ngram, _GROUP_CHARS
        for lo, hi in _groups(lens, step):
            cp = _codepoints(texts[lo:hi])
            if hi - lo == 1 and cp.size > step:  # one huge text: windows overlapping by n-1
                pieces = [(cp[s:s + step + n - 1], None) for s in range(0, cp.size - n + 1, step)]
            else:
                pieces = [(cp, lens[lo:hi])]
            for piece, plens in pieces:
                if plens is None:
                    plens = np.array([piece.size], np.int64)
                h, doc = _ngram_hashes(piece, plens, n, self._salt)
                bins = ((h >> np.uint32(16)) * np.uint32(k)) >> np.uint32(16)  # top bits -> bin
                np.minimum.at(flat, (doc + lo) * k + bins, h)
        self._densify(sig)
        return sig

    def _densify(self, sig: np.ndarray) -> None:
        """Fills every empty bin j of a non-empty document from the first non-empty bin in j's probe
        order. A document with few non-empty bins takes, per bin, the min over its non-empty bins'
        rows of a (probe position, bin) code table (cost k per non-empty bin); the others probe one
        step at a time while many bins are open (about k/non-empty steps), then argmin the rest."""
        k = self.num_perm
        filled = sig != _EMPTY
        per_doc = filled.sum(axis=1)
        few = np.nonzero((per_doc > 0) & (per_doc <= _FEW_BINS) & (per_doc < k))[0]
        if few.size:
            rows, bins = np.nonzero(filled[few])
            seg = np.searchsorted(rows, np.arange(few.size))
            src = np.minimum.reduceat(self._code[bins], seg, axis=0) % k  # [few, k] source bins
            sub = sig[few]
            sig[few] = np.where(filled[few], sub, np.take_along_axis(sub, src, axis=1))
        flat, open_ = sig.reshape(-1), ~filled
        open_[per_doc <= _FEW_BINS] = False
        todo = np.nonzero(open_.reshape(-1))[0]
        cols = todo % k
        base = todo - cols
        filled = filled.reshape(-1)
        for t in range(k):
            if todo.size <= _DENSE_BELOW:
                break
            src = base + self._probe[t][cols]
            hit = filled[src]
            flat[todo[hit]] = flat[src[hit]]
            miss = ~hit
            todo, base, cols = todo[miss], base[miss], cols[miss]
        if todo.size:
            first = np.where(filled.reshape(sig.shape)[base // k], self._rank[cols], k).argmin(axis=1)
            flat[todo] = flat[base + first]


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
