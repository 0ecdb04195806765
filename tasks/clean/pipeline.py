"""The cleaning pipeline on Apache Beam: read -> normalize -> filters -> dedup -> jsonl.gz shards + report.

Documents travel as tuples (key, source, rank, id, text): key = 64-bit hash of source and id (the
dedup indexes use it), rank = the source's position in the config (earlier sources win ties).
Output: `<output_dir>/<prefix>-SSSSS-of-NNNNN.jsonl.gz`, lines `{"id", "source", "text"}` sorted by
(source rank, id) inside a shard, written with a fixed gzip header, so runs are byte-identical.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import time
from typing import Sequence

import apache_beam as beam
import gin
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from zhchat.tasks.clean import dedup, minhash, report, stats
from zhchat.tasks.clean.filters import Filter
from zhchat.tasks.clean.normalize import Normalizer
from zhchat.tasks.clean.readers import Source, iter_documents

FASTEST_LOCAL = ("--runner=DirectRunner", "--direct_num_workers=2",
                 "--direct_running_mode=multi_processing")


def doc_key(source: str, doc_id: str) -> int:
    return minhash.hash64(f"{source}\x00{doc_id}")


class ReadFile(beam.DoFn):
    """(rank, source, path) -> documents; every skip is counted by reason."""

    def __init__(self, max_doc_chars: int):
        self.max_doc_chars = max_doc_chars
        self.counters = stats.Counters()

    def process(self, item):
        rank, src, path = item
        progress = stats.Progress(f"read {os.path.basename(path)}")

        logged: dict[str, int] = {}

        def count(reason, chars):
            self.counters.skip(src.name, reason, chars)
            logged[reason] = logged.get(reason, 0) + 1
            if logged[reason] <= 3:  # the report has the totals; the log shows the first few
                logging.warning("skipped (%s) in %s: %s", src.name, os.path.basename(path), reason)

        docs = chars = 0  # counted once per file: a counter update per document costs ~1 us
        for doc_id, text in iter_documents(files=[path], format=src.format,
                                           text_field=src.text_field, id_field=src.id_field,
                                           counter=count, max_doc_chars=self.max_doc_chars):
            docs, chars = docs + 1, chars + len(text)
            progress.tick()
            yield doc_key(src.name, doc_id), src.name, rank, doc_id, text
        self.counters.inc(f"read|{src.name}|docs_out", docs)
        self.counters.inc(f"read|{src.name}|chars_out", chars)


class SpreadFiles(beam.PTransform):
    """Deals the (rank, source, path) items over the workers, biggest file first, one key per file.

    Only these small tuples are shuffled, so each worker reads, cleans and sketches its own files.
    The local runner deals grouped keys round-robin in arrival order (the 2 workers each get about
    half the bytes); other runners spread the keys by hash."""

    def __init__(self, files: Sequence[tuple]):
        super().__init__()
        self.files = sorted(files, key=lambda f: (-os.path.getsize(f[2]), f[0], f[2]))

    def expand(self, pbegin):
        return (pbegin | "Files" >> beam.Create(list(enumerate(self.files)), reshuffle=False)
                | "PerFile" >> beam.GroupByKey()
                | "Deal" >> beam.FlatMap(lambda kv: kv[1]))


class CleanDoc(beam.DoFn):
    """Normalizes, then applies the filters in order; each stage is counted per source."""

    def __init__(self, normalizer: Normalizer | None, filters: Sequence[Filter]):
        self.normalizer, self.filters = normalizer, list(filters)
        self.counters = stats.Counters()

    def setup(self):
        for f in self.filters:
            f.setup()
        self.progress = stats.Progress("clean")

    def process(self, doc):
        key, source, rank, doc_id, text = doc
        self.progress.tick()
        if self.normalizer is not None:
            out = self.normalizer(text)
            self.counters.stage("normalize", source, text, out or None)
            if not out:
                return
            text = out
        for f in self.filters:
            out = f.apply(text, source)
            self.counters.stage(f"filter:{f.name}", source, text, out)
            if out is None:
                return
            text = out
        yield key, source, rank, doc_id, text


class WriteShard(beam.DoFn):
    """Applies dedup decisions to one output shard's documents, sorts them and writes the shard."""

    def __init__(self, output_dir: str, prefix: str, num_shards: int, min_chars_after_lines: int):
        self.output_dir, self.prefix, self.num_shards = output_dir, prefix, num_shards
        self.min_chars_after_lines = min_chars_after_lines
        self.counters = stats.Counters()

    def process(self, item):
        shard, grouped = item
        drops = {k: reason for _, k, reason in grouped["drops"]}
        line_drops: dict[int, set] = {}
        for _, k, idx in grouped["lines"]:  # one entry per line-index shard that hit the doc
            line_drops.setdefault(k, set()).update(idx)
        kept = []
        for key, source, rank, doc_id, text in grouped["docs"]:
            reason = drops.get(key)
            self.counters.stage("dedup:exact", source, text, None if reason == "exact" else text)
            if reason == "exact":
                continue
            self.counters.stage("dedup:near", source, text, None if reason == "near" else text)
            if reason == "near":
                continue
            if key in line_drops:
                lines = [ln for i, ln in enumerate(text.split("\n")) if i not in line_drops[key]]
                new = "\n".join(lines).strip()
                out = new if len(new) >= self.min_chars_after_lines else None
                self.counters.stage("dedup:lines", source, text, out)
                if out is None:
                    continue
                text = out
            else:
                self.counters.stage("dedup:lines", source, text, text)
            self.counters.stage("output", source, None, text)
            kept.append((rank, doc_id, source, text))
        kept.sort()
        name = f"{self.prefix}-{shard:05d}-of-{self.num_shards:05d}.jsonl.gz"
        path = FileSystems.join(self.output_dir, name)
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
            for _, doc_id, source, text in kept:
                gz.write(json.dumps({"id": doc_id, "source": source, "text": text},
                                    ensure_ascii=False).encode("utf-8") + b"\n")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(buf.getvalue())  # already gzip (fixed header); AUTO would compress it twice
        yield name, len(kept)


def _write_json(obj, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8"))


def _check_writable(output_dir: str) -> None:
    """Writes and deletes a probe file, so an unwritable or read-only output folder fails before
    the pipeline runs (a permission check alone passes for root on a read-only mount)."""
    probe = FileSystems.join(output_dir, ".write_probe")
    try:
        with FileSystems.create(probe) as f:
            f.write(b"ok")
        FileSystems.delete([probe])
    except Exception as e:  # beam wraps OSErrors in its own IOError/BeamIOError
        raise PermissionError(f"clean_corpus.output_dir {output_dir} is not writable: {e}") from e


@gin.configurable
def clean_corpus(*, sources: Sequence[Source], output_dir: str, root: str = ".",
                 num_shards: int = 8, prefix: str = "cleaned", normalizer: Normalizer | None = None,
                 filters: Sequence[Filter] = (), dedup_config: dedup.DedupConfig | None = None,
                 max_doc_chars: int = 16 << 20, min_chars_after_line_dedup: int = 20,
                 beam_args: Sequence[str] = FASTEST_LOCAL) -> dict:
    """Runs the whole pipeline; returns the report dict (also written as report.json / report.md)."""
    if not sources:
        raise ValueError("clean_corpus.sources is empty")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"clean_corpus.sources: duplicate source names {names}")
    cfg = dedup_config or dedup.DedupConfig()
    files = [(rank, src, path) for rank, src in enumerate(sources) for path in src.resolve(root)]
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    _check_writable(output_dir)
    for old in FileSystems.match([FileSystems.join(output_dir, f"{prefix}-*.jsonl.gz")])[0].metadata_list:
        FileSystems.delete([old.path])
    clusters_path = FileSystems.join(output_dir, "dedup_clusters.json")
    start = time.time()
    logging.info("cleaning %d files of %d sources into %d shards", len(files), len(sources),
                 num_shards)
    pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args)))
    docs = (pipeline
            | "Files" >> SpreadFiles(files)
            | "Read" >> beam.ParDo(ReadFile(max_doc_chars))
            | "Spread" >> beam.Reshuffle()
            | "Clean" >> beam.ParDo(CleanDoc(normalizer, filters)))
    out_n = num_shards
    idx, verified = docs | "FindDuplicates" >> dedup.FindDuplicates(cfg)
    comps = (verified | "AllPairs" >> dedup.Gather()
             | "Components" >> beam.Map(dedup.components, cfg.examples))
    shown = comps | "Shown" >> beam.Map(lambda c: dedup.shown_keys(c["summary"]))
    found = (idx.previews | "GroupPreviews" >> beam.GroupByKey()
             | "Previews" >> beam.FlatMap(dedup.previews, beam.pvalue.AsSingleton(shown)))
    _ = comps | "WriteClusters" >> beam.Map(
        lambda c, f: _write_json(dedup.with_previews(c["summary"], f), clusters_path),
        beam.pvalue.AsList(found))
    drops = comps | "Drops" >> beam.FlatMap(
        lambda c: [(k % out_n, ("drop", k, r)) for k, r in sorted(c["drops"].items())])
    removed = comps | "Removed" >> beam.Map(
        lambda c: np.array(sorted(c["drops"]), np.uint64))
    lines = (idx.lines | "GroupLines" >> beam.GroupByKey()
             | "RepeatedLines" >> beam.FlatMap(dedup.repeated_lines,
                                               beam.pvalue.AsSingleton(removed), out_n))
    keyed = docs | "KeyByShard" >> beam.Map(lambda d: (d[0] % out_n, d))
    every = pipeline | "Shards" >> beam.Create([(s, None) for s in range(out_n)])
    written = ({"docs": keyed, "drops": drops, "lines": lines, "all": every}
               | "JoinShards" >> beam.CoGroupByKey()
               | "Write" >> beam.ParDo(WriteShard(output_dir, prefix, out_n,
                                                  min_chars_after_line_dedup)))
    _ = written | "Written" >> beam.Map(lambda x: logging.info("wrote %s (%d docs)", *x))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.time() - start
    with FileSystems.open(clusters_path) as f:
        clusters = json.loads(f.read().decode("utf-8"))
    rep = report.build(result.metrics(), clusters=clusters, seconds=seconds,
                       sources=names, filters=[f.name for f in filters],
                       settings={"num_shards": num_shards, "threshold": cfg.threshold,
                                 "num_perm": cfg.num_perm, "ngram": cfg.ngram,
                                 "bands_rows": list(cfg.band_params()),
                                 "line_min_chars": cfg.line_min_chars,
                                 "beam_args": list(beam_args)})
    _write_json(rep, FileSystems.join(output_dir, "report.json"))
    with FileSystems.create(FileSystems.join(output_dir, "report.md")) as f:
        f.write(report.to_table(rep).encode("utf-8"))
    return rep
