"""Densified one-permutation MinHash: equality with a plain-Python reading of its definition, batch
invariance, estimator accuracy (long texts and short ones that need densification), and near-dup
precision/recall on planted duplicates of known Jaccard, in memory and through the Beam stages."""

import gzip
import json

import numpy as np

from zhchat.tasks.clean import minhash, pipeline
from zhchat.tasks.clean.dedup import DedupConfig
from zhchat.tasks.clean.readers import Source

IN_MEMORY = ("--runner=DirectRunner", "--direct_running_mode=in_memory")


def _shingles(text, n=5):
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def _jaccard(a, b):
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _planted_corpus(seed=0, per_level=12, length=400):
    """Random CJK base texts, each with one mutated copy at a target Jaccard level."""
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    texts, pairs = [], []
    for target in (0.97, 0.9, 0.85, 0.7, 0.5, 0.3):
        for _ in range(per_level):
            base = list(rng.choice(alphabet, length))
            copy = list(base)
            # m substituted characters break about 5m of the ~length shingles
            m = max(1, int(round(length * (1 - target) / (5 * (1 + target)))))
            for pos in rng.choice(length, m, replace=False):
                copy[pos] = alphabet[rng.integers(len(alphabet))]
            a, b = "".join(base), "".join(copy)
            texts += [a, b]
            pairs.append((len(texts) - 2, len(texts) - 1, _jaccard(a, b)))
    return texts, pairs


def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _reference_signature(hasher, text):
    """The definition, one shingle and one bin at a time with Python ints."""
    k, n, empty = hasher.num_perm, hasher.ngram, 0xFFFFFFFF
    grams = [text[i:i + n] for i in range(len(text) - n + 1)] if len(text) >= n else (
        [text] if text else [])
    sig = [empty] * k
    for g in grams:
        h = 0
        for ch in g:
            h = (h * 0x01000193 + ord(ch)) & 0xFFFFFFFF
        h = _fmix32((h + hasher._salt + len(g)) & 0xFFFFFFFF)
        b = ((h >> 16) * k) >> 16
        sig[b] = min(sig[b], h)
    filled = [v != empty for v in sig]
    if any(filled):  # densification: bin j copies the first non-empty bin in its probe order
        sig = [v if filled[j] else sig[next(c for c in hasher._probe[:, j] if filled[c])]
               for j, v in enumerate(sig)]
    return np.array(sig, np.uint32)


def test_signatures_equal_reference_and_batch_invariant(monkeypatch):
    hasher = minhash.MinHasher(num_perm=64, ngram=3, seed=7)
    rng = np.random.default_rng(0)
    texts = ["", "好", "你好", "你好吗", "一二三四五六七八九十", "\ud800孤立代理"] + [
        "".join(chr(c) for c in rng.integers(0x4E00, 0x4E40, int(n))) for n in (5, 40, 300, 3000)]
    texts += ["".join(chr(c) for c in rng.integers(0x4E00, 0x5E00, 60)) for _ in range(40)]
    want = np.stack([_reference_signature(hasher, t) for t in texts])
    assert np.array_equal(hasher.signatures(texts), want)
    assert np.array_equal(hasher.signature(texts[8]), want[8])
    monkeypatch.setattr(minhash, "_GROUP_CHARS", 64)  # many groups, and windows inside a long text
    assert np.array_equal(hasher.signatures(texts), want)
    assert (want[0] == 0xFFFFFFFF).all() and (want[1] == want[1][0]).all()  # empty; one shingle
    # every densification path ran: min over few bins' codes, single probes, argmin of the rest
    filled = np.array([len(np.unique(w)) for w in want[-40:]])
    assert (filled > minhash._FEW_BINS).all() and (64 - filled).sum() > minhash._DENSE_BELOW


def test_estimator_unbiased_with_binomial_variance():
    hasher = minhash.MinHasher(num_perm=128, ngram=5)
    texts, pairs = _planted_corpus(seed=1, per_level=15)
    sigs = hasher.signatures(texts)
    err = np.array([(sigs[a] == sigs[b]).mean() - j for a, b, j in pairs])
    assert abs(err.mean()) < 0.01
    assert err.std() < 0.06  # binomial std at J=0.5 with 128 permutations is 0.044


def test_estimator_unbiased_on_short_texts():
    """30-char texts fill about 26 of 128 bins; densification must keep the estimate unbiased (its
    spread is a little above the 128-permutation binomial: the copies are correlated)."""
    hasher = minhash.MinHasher(num_perm=128, ngram=5)
    texts, pairs = _planted_corpus(seed=2, per_level=30, length=30)
    sigs = hasher.signatures(texts)
    filled = np.array([len(np.unique(s)) for s in sigs])
    assert filled.mean() < 30  # most bins were empty before densification
    err = np.array([(sigs[a] == sigs[b]).mean() - j for a, b, j in pairs])
    assert abs(err.mean()) < 0.015
    assert err.std() < 0.07


def test_optimal_bands_and_bucket_pairs():
    assert minhash.optimal_bands(0.8, 128) == (9, 13)  # same as datasketch's choice
    assert DedupConfig().band_params() == (14, 9)  # recall-leaning default (pairs are verified)
    keys = np.array([5, 5, 5, 7, 9, 9], np.uint64)
    pairs = {tuple(p) for p in minhash.bucket_pairs(keys, np.arange(6, dtype=np.uint64)).tolist()}
    assert pairs == {(0, 1), (0, 2), (1, 2), (4, 5)}


def _check(found: set, pairs) -> None:
    truth = {(a, b) for a, b, j in pairs if j >= 0.88}  # 2.5 estimator std above 0.8
    far = {(a, b) for a, b, j in pairs if j <= 0.65}
    assert len(truth) >= 24 and len(far) >= 24
    assert len(found & truth) / len(truth) >= 0.95, "recall"
    assert not found & far, "precision"


def test_reference_precision_recall():
    texts, pairs = _planted_corpus()
    bands, rows = DedupConfig().band_params()
    found, _ = minhash.near_duplicate_pairs(texts, hasher=minhash.MinHasher(), threshold=0.8,
                                            bands=bands, rows=rows)
    _check({tuple(p) for p in found.tolist()}, pairs)


def test_beam_dedup_precision_recall(tmp_path):
    texts, pairs = _planted_corpus()
    with gzip.open(tmp_path / "synth.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"{i:04d}", "text": t}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    rep = pipeline.clean_corpus(
        sources=[Source(name="synth", files=["synth.jsonl.gz"], format="jsonl")],
        output_dir=str(out), root=str(tmp_path), num_shards=2,
        dedup_config=DedupConfig(line_min_chars=0), beam_args=IN_MEMORY)
    clusters = json.loads((out / "dedup_clusters.json").read_text(encoding="utf-8"))
    kept = set()
    for shard in sorted(out.glob("cleaned-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            kept |= {int(json.loads(line)["id"]) for line in f}
    # a planted pair is "found" when one of its two texts was removed as a near duplicate
    found = {(a, b) for a, b, _ in pairs if (a in kept) != (b in kept)}
    _check(found, pairs)
    assert all(a in kept for a, b, _ in pairs)  # keeper: same length, so the smaller id
    assert rep["dedup"]["docs_removed"]["near"] == len(found) == clusters["clusters"]
