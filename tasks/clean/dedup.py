"""Exact, near-duplicate (MinHash + LSH) and repeated-line dedup as Beam transforms.

Element counts are kept small: documents are sketched in batches and every index (band buckets, text
hashes, line hashes, signatures) travels as numpy arrays grouped into `index_shards` keys, so a
shuffle moves a few thousand arrays instead of millions of tuples. Steps:
  1. Sketch (ParDo over batches): signature, band hashes, text hash, line hashes per document.
  2. Buckets (GroupByKey on band-hash shard): docs sharing a band or a text hash -> candidate pairs.
  3. Verify (two CoGroupByKeys with the signature shards): keep pairs with estimated Jaccard >=
     threshold or equal text hash.
  4. Components (one worker; the verified pairs are small): union-find, one keeper per cluster chosen
     deterministically (longest text, then earlier source in the config, then smaller id).
  5. Lines (GroupByKey on line-hash shard, survivors only): every later copy of a line of at least
     `line_min_chars` characters is marked for removal (keeps the first in (source, doc, line) order).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import apache_beam as beam
import gin
import numpy as np

from zhchat.tasks.clean import minhash

_EXACT_SALT = np.uint64(0xA5A5A5A5DEADBEEF)
_LINE_DTYPE = np.dtype([("h", "<u8"), ("rank", "<u4"), ("key", "<u8"), ("idx", "<u4")])


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Dedup settings. bands/rows None = the (b, r) minimising fp_weight·(false-positive area) +
    (1 - fp_weight)·(false-negative area) of the LSH S-curve. Candidates are verified afterwards, so
    the default leans to recall (0.1): at threshold 0.8 / 128 permutations that is 14 bands of 9 rows
    (P[candidate] = 0.87 at J=0.8, 0.975 at 0.85) instead of the balanced 9x13 (0.69 at 0.85)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    bands: int | None = None
    rows: int | None = None
    seed: int = 1
    fp_weight: float = 0.1
    line_min_chars: int = 10  # 0 disables repeated-line removal
    index_shards: int = 16
    examples: int = 20  # duplicate clusters shown in the report

    def band_params(self) -> tuple[int, int]:
        if self.bands and self.rows:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"DedupConfig: bands*rows={self.bands * self.rows} > num_perm")
            return self.bands, self.rows
        return minhash.optimal_bands(self.threshold, self.num_perm, self.fp_weight,
                                     1.0 - self.fp_weight)


def _text_hash(text: str) -> int:
    return minhash.hash64(text)


class Sketch(beam.DoFn):
    """Batch of docs -> tagged index arrays: 'bands', 'sigs', 'lines' (each keyed by index shard)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def setup(self):
        self.hasher = minhash.MinHasher(self.cfg.num_perm, self.cfg.ngram, self.cfg.seed)
        self.bands, self.rows = self.cfg.band_params()

    def process(self, batch):
        cfg, shards = self.cfg, np.uint64(self.cfg.index_shards)
        keys = np.array([d[0] for d in batch], np.uint64)
        ths = np.array([_text_hash(d[4]) for d in batch], np.uint64)
        cols = []
        if cfg.near:
            sigs = self.hasher.signatures([d[4] for d in batch])
            cols.append(minhash.band_hashes(sigs, self.bands, self.rows))
        else:
            sigs = np.zeros((len(batch), 1), np.uint32)
        if cfg.exact:
            cols.append((ths ^ _EXACT_SALT)[:, None])
        if cols:
            bkeys = np.concatenate(cols, axis=1)
            flat_keys = np.repeat(keys, bkeys.shape[1])
            bkeys = bkeys.ravel()
            for s, sel in _split(bkeys % shards):
                yield beam.pvalue.TaggedOutput("bands", (s, (flat_keys[sel], bkeys[sel])))
            meta = [(d[1], d[2], d[3], len(d[4]), int(t), d[4][:80]) for d, t in zip(batch, ths)]
            for s, sel in _split(keys % shards):
                yield beam.pvalue.TaggedOutput(
                    "sigs", (s, (keys[sel], sigs[sel], [meta[i] for i in sel])))
        if cfg.line_min_chars > 0:
            rows = [(minhash.hash64(ln), d[2], d[0], i) for d in batch
                    for i, ln in enumerate(d[4].split("\n")) if len(ln) >= cfg.line_min_chars]
            lines = np.array(rows, _LINE_DTYPE)
            for s, sel in _split(lines["h"] % shards):
                yield beam.pvalue.TaggedOutput("lines", (s, lines[sel]))


def _split(shard_of: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
    order = np.argsort(shard_of, kind="stable")
    values, starts = np.unique(shard_of[order], return_index=True)
    for v, a, b in zip(values, starts, np.r_[starts[1:], order.size]):
        yield int(v), order[a:b]


def candidate_pairs(item, index_shards: int):
    """(shard, [(doc keys, bucket keys)]) -> (shard of a, unique pairs uint64[n, 2]) with a < b."""
    _, parts = item
    keys = np.concatenate([p[0] for p in parts])
    bkeys = np.concatenate([p[1] for p in parts])
    pairs = minhash.bucket_pairs(bkeys, keys)
    if len(pairs):
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
        for s, sel in _split(pairs[:, 0] % np.uint64(index_shards)):
            yield s, pairs[sel]


def _index(sig_parts):
    keys = np.concatenate([p[0] for p in sig_parts])
    sigs = np.concatenate([p[1] for p in sig_parts])
    meta = [m for p in sig_parts for m in p[2]]
    order = np.argsort(keys)
    return keys[order], sigs[order], [meta[i] for i in order]


def _lookup(sorted_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, wanted)
    if np.any(pos >= sorted_keys.size) or np.any(sorted_keys[np.minimum(pos, sorted_keys.size - 1)]
                                                 != wanted):
        raise RuntimeError("dedup: a candidate pair names a document with no signature")
    return pos


def attach_first(item, index_shards: int):
    """Join 1: pairs keyed by a's shard meet a's signature; re-key by b's shard."""
    _, grouped = item
    if not grouped["pairs"]:
        return
    keys, sigs, meta = _index(grouped["sigs"])
    pairs = np.unique(np.concatenate(grouped["pairs"]), axis=0)
    ia = _lookup(keys, pairs[:, 0])
    for s, sel in _split(pairs[:, 1] % np.uint64(index_shards)):
        yield s, (pairs[sel], sigs[ia[sel]], [meta[ia[i]] for i in sel])


def verify_pairs(item, threshold: float):
    """Join 2: b's signature; keeps (a, b, jaccard, meta_a, meta_b) with J >= threshold or same text."""
    _, grouped = item
    if not grouped["half"]:
        return
    keys, sigs, meta = _index(grouped["sigs"])
    for pairs, sig_a, meta_a in grouped["half"]:
        ib = _lookup(keys, pairs[:, 1])
        jac = (sig_a == sigs[ib]).mean(axis=1)
        for i in range(len(pairs)):
            exact = meta_a[i][4] == meta[ib[i]][4]
            if exact or jac[i] >= threshold:
                yield int(pairs[i, 0]), int(pairs[i, 1]), float(jac[i]), meta_a[i], meta[ib[i]]


def keep_order(meta) -> tuple:
    """Cluster keeper = smallest of these: longest text, then earlier source, then smaller id."""
    source, rank, doc_id, length, _, _ = meta
    return -length, rank, doc_id


def components(records: list, max_examples: int) -> dict:
    """Verified pairs -> {'drops': {key: reason}, 'summary': report dict}."""
    uf, meta, best_j = minhash.UnionFind(), {}, {}
    for a, b, jac, ma, mb in sorted(records, key=lambda r: (r[0], r[1])):
        uf.union(a, b)
        meta[a], meta[b] = ma, mb
    drops, clusters = {}, []
    by_reason = {"exact": 0, "near": 0}
    cross = {}
    for members in uf.components():
        members.sort(key=lambda k: keep_order(meta[k]))
        keeper = meta[members[0]]
        for k in members[1:]:
            reason = "exact" if meta[k][4] == keeper[4] else "near"
            drops[k] = reason
            by_reason[reason] += 1
        sources = sorted({meta[k][0] for k in members})
        if len(sources) > 1:
            cross["+".join(sources)] = cross.get("+".join(sources), 0) + 1
        clusters.append({"size": len(members), "sources": sources,
                         "members": [{"source": meta[k][0], "id": meta[k][2],
                                      "chars": meta[k][3], "kept": k == members[0],
                                      "preview": meta[k][5]} for k in members[:5]]})
    clusters.sort(key=lambda c: (-c["size"], c["members"][0]["source"], c["members"][0]["id"]))
    summary = {"clusters": len(clusters), "docs_removed": by_reason,
               "cross_source_clusters": dict(sorted(cross.items())),
               "largest": clusters[:max_examples],
               "cross_source_examples": [c for c in clusters if len(c["sources"]) > 1][:5]}
    return {"drops": drops, "summary": summary}


def repeated_lines(item, removed: np.ndarray, out_shards: int):
    """Line shard -> (output shard, ('lines', doc key, line indices to drop)) for every later copy."""
    _, parts = item
    rows = np.concatenate(parts)
    if removed.size:
        rows = rows[~np.isin(rows["key"], removed)]
    if rows.size == 0:
        return
    rows = rows[np.lexsort((rows["idx"], rows["key"], rows["rank"], rows["h"]))]
    later = np.r_[False, rows["h"][1:] == rows["h"][:-1]]
    dup = rows[later]
    dup = dup[np.lexsort((dup["idx"], dup["key"]))]
    for key, sel in _split(dup["key"]):
        yield int(key) % out_shards, ("lines", int(key), dup["idx"][sel].tolist())


class FindDuplicates(beam.PTransform):
    """Docs -> (index outputs, verified pairs): the Sketch / Buckets / Verify steps above."""

    def __init__(self, cfg: DedupConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, docs):
        cfg, n = self.cfg, self.cfg.index_shards
        idx = (docs | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=512)
               | "Sketch" >> beam.ParDo(Sketch(cfg)).with_outputs("bands", "sigs", "lines"))
        pairs = (idx.bands | "GroupBuckets" >> beam.GroupByKey()
                 | "Candidates" >> beam.FlatMap(candidate_pairs, n))
        half = ({"sigs": idx.sigs, "pairs": pairs} | "JoinA" >> beam.CoGroupByKey()
                | "AttachA" >> beam.FlatMap(attach_first, n))
        verified = ({"sigs": idx.sigs, "half": half} | "JoinB" >> beam.CoGroupByKey()
                    | "Verify" >> beam.FlatMap(verify_pairs, cfg.threshold))
        return idx, verified

