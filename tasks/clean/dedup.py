"""Exact, near-duplicate (MinHash + LSH) and repeated-line dedup as Beam transforms.

Element counts are kept small: documents are sketched in batches and every index (band buckets, text
hashes, line hashes, signatures) travels as numpy arrays grouped into `index_shards` keys, so a
shuffle moves a few thousand arrays instead of millions of tuples. Steps:
  1. Sketch (ParDo over batches): signature, band hashes, text hash, line hashes per document.
  2. Buckets (GroupByKey on band-hash shard): docs sharing a band or a text hash -> candidate pairs.
  3. Verify (two CoGroupByKeys with the signature shards, which carry only `verify_bits` low bits
     of each bin): keep pairs with estimated Jaccard >= threshold or equal text hash.
  4. Components (one worker; the verified pairs are small): union-find, one keeper per cluster chosen
     deterministically (longest text, then earlier source in the config, then smaller id). Previews
     are joined afterwards for the few members the report shows.
  5. Lines (GroupByKey on line-hash shard, survivors only): every later copy of a line of at least
     `line_min_chars` characters is marked for removal (keeps the first in (source, doc, line) order).
"""

from __future__ import annotations

import dataclasses
import pickle
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
    verify_bits: int = 8  # low bits of each signature value shipped to the verify joins (8, 16, 32)
    line_min_chars: int = 10  # 0 disables repeated-line removal
    index_shards: int = 16
    examples: int = 20  # duplicate clusters shown in the report

    def __post_init__(self):
        if self.verify_bits not in _BITS_DTYPE:
            raise ValueError(f"DedupConfig.verify_bits={self.verify_bits}: use one of 8, 16, 32")

    def band_params(self) -> tuple[int, int]:
        if self.bands and self.rows:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"DedupConfig: bands*rows={self.bands * self.rows} > num_perm")
            return self.bands, self.rows
        return minhash.optimal_bands(self.threshold, self.num_perm, self.fp_weight,
                                     1.0 - self.fp_weight)


_BITS_DTYPE = {8: np.uint8, 16: np.uint16, 32: np.uint32}


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray, bits: int) -> np.ndarray:
    """b-bit MinHash estimate (Li & Koenig 2010): two different minima share their low `bits` bits
    with probability 2^-bits, so J = (match rate - 2^-bits) / (1 - 2^-bits). With 8 bits the
    standard error at J = 0.8 and 128 bins is 0.0353 instead of 0.0352 (all 32 bits), for 1/4 of the
    bytes that the two verify joins move."""
    match = (sig_a == sig_b).mean(axis=1, dtype=np.float32)
    floor = np.float32(2.0 ** -bits)
    return (match - floor) / (1 - floor)


def _text_hash(text: str) -> int:
    return minhash.hash64(text)


# Per-document numbers the later steps need; strings (source, id) travel beside them as one
# pickled list per array, so an element is a few arrays and one bytes object, never 1000s of objects
# (Beam sizes side inputs object by object).
META_DTYPE = np.dtype([("key", "<u8"), ("rank", "<u4"), ("length", "<u8"), ("thash", "<u8")])


class Sketch(beam.DoFn):
    """Batch of docs -> tagged index arrays: 'bands', 'sigs', 'lines' (each keyed by index shard)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def setup(self):
        self.hasher = minhash.MinHasher(self.cfg.num_perm, self.cfg.ngram, self.cfg.seed)
        self.bands, self.rows = self.cfg.band_params()

    def process(self, batch):
        cfg, shards = self.cfg, np.uint64(self.cfg.index_shards)
        meta = np.array([(d[0], d[2], len(d[4]), _text_hash(d[4])) for d in batch], META_DTYPE)
        keys, ths = meta["key"], meta["thash"]
        cols = []
        if cfg.near:
            sigs = self.hasher.signatures([d[4] for d in batch])
            cols.append(minhash.band_hashes(sigs, self.bands, self.rows))
            sigs = sigs.astype(_BITS_DTYPE[cfg.verify_bits])  # keeps the low bits
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
            for s, sel in _split(keys % shards):
                yield beam.pvalue.TaggedOutput("sigs", (s, (meta[sel], sigs[sel], _pack(
                    [(batch[i][1], batch[i][3]) for i in sel]))))
                yield beam.pvalue.TaggedOutput("previews", (s, (keys[sel], _pack(
                    [batch[i][4][:PREVIEW_CHARS] for i in sel]))))
        if cfg.line_min_chars > 0:
            rows = [(minhash.hash64(ln), d[2], d[0], i) for d in batch
                    for i, ln in enumerate(d[4].split("\n")) if len(ln) >= cfg.line_min_chars]
            lines = np.array(rows, _LINE_DTYPE)
            for s, sel in _split(lines["h"] % shards):
                yield beam.pvalue.TaggedOutput("lines", (s, lines[sel]))


PREVIEW_CHARS = 80  # text shown per cluster member in the report


def _pack(labels: list) -> bytes:
    return pickle.dumps(labels, protocol=pickle.HIGHEST_PROTOCOL)


def _unique_rows(pairs: np.ndarray) -> np.ndarray:
    """Sorted unique rows of uint64[n, 2] (a lexsort: far cheaper than np.unique(axis=0))."""
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs[np.r_[True, (pairs[1:] != pairs[:-1]).any(axis=1)]] if len(pairs) else pairs


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
        pairs = _unique_rows(np.sort(pairs, axis=1))
        for s, sel in _split(pairs[:, 0] % np.uint64(index_shards)):
            yield s, pairs[sel]


def _index(sig_parts):
    """Sig shard parts -> (meta sorted by key, their signatures, their labels)."""
    meta = np.concatenate([p[0] for p in sig_parts])
    sigs = np.concatenate([p[1] for p in sig_parts])
    labels = [lab for p in sig_parts for lab in pickle.loads(p[2])]
    order = np.argsort(meta["key"], kind="stable")
    return meta[order], sigs[order], [labels[i] for i in order]


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
    meta, sigs, labels = _index(grouped["sigs"])
    pairs = _unique_rows(np.concatenate(grouped["pairs"]))
    ia = _lookup(meta["key"], pairs[:, 0])
    for s, sel in _split(pairs[:, 1] % np.uint64(index_shards)):
        yield s, (pairs[sel], sigs[ia[sel]], meta[ia[sel]], _pack([labels[ia[i]] for i in sel]))


def verify_pairs(item, threshold: float, bits: int):
    """Join 2: b's signature; keeps pairs with estimated Jaccard >= threshold or the same text.

    Yields (pairs uint64[n, 2], jaccard float32[n], meta of a's then b's, their (source, id))."""
    _, grouped = item
    if not grouped["half"]:
        return
    meta, sigs, labels = _index(grouped["sigs"])
    for pairs, sig_a, meta_a, labels_a in grouped["half"]:
        ib = _lookup(meta["key"], pairs[:, 1])
        jac = estimate_jaccard(sig_a, sigs[ib], bits)
        keep = np.nonzero((meta_a["thash"] == meta["thash"][ib]) | (jac >= threshold))[0]
        if keep.size:
            labels_a = pickle.loads(labels_a)
            yield (pairs[keep], jac[keep], np.concatenate([meta_a[keep], meta[ib[keep]]]),
                   _pack([labels_a[i] for i in keep] + [labels[ib[i]] for i in keep]))


def keep_order(meta, label) -> tuple:
    """Cluster keeper = smallest of these: longest text, then earlier source, then smaller id."""
    return -int(meta["length"]), int(meta["rank"]), label[1]


def components(verified: list, max_examples: int) -> dict:
    """Verified pair arrays -> {'drops': {key: reason}, 'summary': report dict}."""
    pairs = (np.concatenate([v[0] for v in verified]) if verified
             else np.zeros((0, 2), np.uint64))
    info = {}  # doc key -> (meta row, (source, id))
    for _, _, meta, labels in verified:
        for row, label in zip(meta, pickle.loads(labels)):
            info[int(row["key"])] = (row, label)
    uf = minhash.UnionFind()
    for a, b in _unique_rows(pairs).tolist():
        uf.union(a, b)
    drops, clusters = {}, []
    by_reason = {"exact": 0, "near": 0}
    cross = {}
    for members in uf.components():
        members.sort(key=lambda k: keep_order(*info[k]))
        keeper = info[members[0]][0]
        for k in members[1:]:
            reason = "exact" if info[k][0]["thash"] == keeper["thash"] else "near"
            drops[k] = reason
            by_reason[reason] += 1
        sources = sorted({info[k][1][0] for k in members})
        if len(sources) > 1:
            cross["+".join(sources)] = cross.get("+".join(sources), 0) + 1
        clusters.append({"size": len(members), "sources": sources,
                         "members": [{"source": info[k][1][0], "id": info[k][1][1],
                                      "chars": int(info[k][0]["length"]), "kept": k == members[0],
                                      "key": k} for k in members[:5]]})
    clusters.sort(key=lambda c: (-c["size"], c["members"][0]["source"], c["members"][0]["id"]))
    summary = {"clusters": len(clusters), "docs_removed": by_reason,
               "cross_source_clusters": dict(sorted(cross.items())),
               "largest": clusters[:max_examples],
               "cross_source_examples": [c for c in clusters if len(c["sources"]) > 1][:5]}
    return {"drops": drops, "summary": summary}


def shown_keys(summary: dict) -> np.ndarray:
    """Doc keys of the cluster members the report shows (they get a preview)."""
    return np.array(sorted({m["key"] for part in ("largest", "cross_source_examples")
                            for c in summary[part] for m in c["members"]}), np.uint64)


def previews(item, wanted: np.ndarray):
    """Preview shard -> (key, first PREVIEW_CHARS characters) of the wanted documents in it."""
    _, parts = item
    for keys, texts in parts:
        hit = np.nonzero(np.isin(keys, wanted))[0]
        if hit.size:
            texts = pickle.loads(texts)
            yield from ((int(keys[i]), texts[i]) for i in hit)


def with_previews(summary: dict, found: list) -> dict:
    """Replaces each shown member's `key` by its `preview`."""
    text = dict(found)
    for part in ("largest", "cross_source_examples"):
        for c in summary[part]:
            for m in c["members"]:
                m["preview"] = text.get(m.pop("key"), "")
    return summary


class Gather(beam.PTransform):
    """PCollection (no None elements) -> exactly one list of all its elements (empty if none), via
    a GroupByKey: unlike combiners.ToList it makes no side input, which the runner sizes object by
    object."""

    def expand(self, pcoll):
        one = pcoll | "One" >> beam.Map(lambda x: (0, x))
        seed = pcoll.pipeline | "Seed" >> beam.Create([(0, None)])
        return ((one, seed) | "Flatten" >> beam.Flatten() | "Group" >> beam.GroupByKey()
                | "List" >> beam.Map(lambda kv: [x for x in kv[1] if x is not None]))


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
        idx = (docs | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=2048)
               | "Sketch" >> beam.ParDo(Sketch(cfg)).with_outputs("bands", "sigs", "previews", "lines"))
        pairs = (idx.bands | "GroupBuckets" >> beam.GroupByKey()
                 | "Candidates" >> beam.FlatMap(candidate_pairs, n))
        half = ({"sigs": idx.sigs, "pairs": pairs} | "JoinA" >> beam.CoGroupByKey()
                | "AttachA" >> beam.FlatMap(attach_first, n))
        verified = ({"sigs": idx.sigs, "half": half} | "JoinB" >> beam.CoGroupByKey()
                    | "Verify" >> beam.FlatMap(verify_pairs, cfg.threshold, cfg.verify_bits))
        return idx, verified

