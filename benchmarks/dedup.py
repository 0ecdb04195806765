"""Near-dedup benchmark: our Beam MinHash/LSH stages vs datasketch.MinHashLSH on all raw corpora.

Both see the same documents (the raw readers' output, no cleaning), the same character n-gram
shingles, number of permutations and Jaccard threshold, and both are timed from the same point: files
on disk (after imports) to the verified duplicate pairs. Each system runs in its own process so peak
memory is its own.
  ours:        DirectRunner, 2 worker processes: pipeline construction, worker start-up, reading and
               decompressing the files (each worker its own files), densified one-permutation MinHash,
               LSH buckets, verification, collecting the pairs in the driver.
  datasketch:  the same readers into memory, then MinHash.update_batch per document + MinHashLSH
               insert + query of every document; candidates kept when MinHash.jaccard >= t.
Peak memory: the largest sum of RSS over the process and its children, sampled every 0.1 s (ours:
driver + both workers).
Recall = share of datasketch's verified pairs whose two documents fall in one of our clusters.
Order: ours, datasketch, then ours `--ours_runs - 1` more times; our time is the median of our runs
(the machine is shared, so each run also records the 1-minute load average before and after).

  python -m zhchat.benchmarks.dedup [--out out/bench/dedup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np

RAW = [("niutrans", "niutrans_modern.jsonl.gz", "jsonl"), ("shu_books", "shu_books.jsonl.gz", "jsonl"),
       ("peoples_daily", "peoples_daily_199801_tagged.txt.gz", "pku_tagged"),
       ("peoples_daily_seg", "peoples_daily_199801_seg.txt.gz", "pku_seg"),
       ("reviews_pos", "reviews_pos.txt", "txt_lines"), ("reviews_neg", "reviews_neg.txt", "txt_lines")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW_DIR = os.path.join(REPO, "..", "shared", "data", "raw")


class PeakRss:
    """Samples the summed RSS of this process and all its descendants (Linux /proc) until stopped."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree_rss() -> int:
        parent, rss = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(pid)], rss[int(pid)] = int(fields[1]), int(fields[21])
            except (OSError, IndexError, ValueError):
                continue
        me, total = os.getpid(), 0
        for pid in rss:
            p = pid
            while p > 1 and p != me:
                p = parent.get(p, 0)
            if p == me:
                total += rss[pid]
        return total * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._tree_rss())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def _load_docs() -> list[tuple[str, str]]:
    from zhchat.tasks.clean.readers import iter_documents
    docs = []
    for name, path, fmt in RAW:
        for doc_id, text in iter_documents(files=[os.path.join(RAW_DIR, path)], format=fmt):
            docs.append((f"{name}:{doc_id}", text))
    return docs


def run_ours(args) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from zhchat.tasks.clean import dedup, pipeline, report
    from zhchat.tasks.clean.readers import Source

    cfg = dedup.DedupConfig(threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram,
                            line_min_chars=0)
    files = [(rank, Source(name=name, files=[path], format=fmt), os.path.join(RAW_DIR, path))
             for rank, (name, path, fmt) in enumerate(RAW)]
    with PeakRss() as peak:
        start = time.time()
        p = beam.Pipeline(options=PipelineOptions(list(pipeline.FASTEST_LOCAL)))
        docs = p | pipeline.SpreadFiles(files) | beam.ParDo(pipeline.ReadFile(16 << 20))
        _, verified = docs | dedup.FindDuplicates(cfg)

        def write(parts):
            names = []
            for pairs, _, _, labels in parts:
                labels = [f"{lab[0]}:{lab[1]}" for lab in pickle.loads(labels)]
                names += [[labels[i], labels[len(pairs) + i]] for i in range(len(pairs))]
            with open(args.pairs_file, "w", encoding="utf-8") as f:
                json.dump(sorted(names), f)

        _ = verified | dedup.Gather() | beam.Map(write)
        result = p.run()
        result.wait_until_finish()
        seconds = time.time() - start
    with open(args.pairs_file, encoding="utf-8") as f:
        pairs = json.load(f)
    n_docs = sum(v for k, v in report.counter_values(result.metrics()).items()
                 if k.startswith("read|") and k.endswith("|docs_out"))
    with open(args.pairs_file, "w", encoding="utf-8") as f:
        json.dump({"docs": n_docs, "pairs": pairs}, f)
    return {"seconds": seconds, "docs": n_docs, "peak_mb": peak.mb,
            "bands_rows": list(cfg.band_params()), "timed": "files on disk -> verified pairs"}


def run_datasketch(args) -> dict:
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    n = args.ngram
    peak = PeakRss().__enter__()
    start = time.time()
    docs = _load_docs()
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm)
    sketches = []
    for i, (doc_id, text) in enumerate(docs):
        m = MinHash(num_perm=args.num_perm, seed=1)
        grams = [text[j:j + n] for j in range(max(1, len(text) - n + 1))]
        for k in range(0, len(grams), 200_000):  # bounded [chunk, num_perm] temporaries
            m.update_batch([g.encode("utf-8") for g in grams[k:k + 200_000]])
        lsh.insert(i, m)
        sketches.append(m)
    pairs = set()
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if j != i and m.jaccard(sketches[j]) >= args.threshold:
                pairs.add((min(i, j), max(i, j)))
    seconds = time.time() - start
    peak.__exit__()
    with open(args.pairs_file, "w", encoding="utf-8") as f:
        json.dump({"docs": len(docs), "pairs": sorted([docs[a][0], docs[b][0]] for a, b in pairs)},
                  f)
    return {"seconds": seconds, "docs": len(docs), "peak_mb": peak.mb,
            "bands_rows": [lsh.b, lsh.r], "np": np.__version__,
            "timed": "files on disk -> verified pairs"}


def _components(pairs) -> dict:
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    return {x: find(x) for x in parent}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=["both", "ours", "datasketch"], default="both")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num_perm", type=int, default=128)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--pairs_file", default="")
    ap.add_argument("--ours_runs", type=int, default=3, help="our runs (median reported)")
    ap.add_argument("--compare_only", action="store_true",
                    help="recompute the summary from the stats/pairs files of an earlier run")
    ap.add_argument("--out", default=os.path.join(REPO, "out", "bench", "dedup.json"))
    args = ap.parse_args(argv)
    if args.system != "both":
        res = (run_ours if args.system == "ours" else run_datasketch)(args)
        print(json.dumps(res))
        return res
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results = {}
    # one after the other, each in its own process; ours again after datasketch so that a load
    # spike from the other jobs on this shared machine shows up as spread, and the median is used
    for i, system in enumerate(["ours", "datasketch"] + ["ours"] * (args.ours_runs - 1)):
        pairs_file = os.path.join(os.path.dirname(args.out), f"pairs_{system}.json")
        stats_file = os.path.join(os.path.dirname(args.out), f"stats_{system}.json")
        if not args.compare_only:
            cmd = [sys.executable, "-m", "zhchat.benchmarks.dedup", "--system", system,
                   "--threshold", str(args.threshold), "--num_perm", str(args.num_perm),
                   "--ngram", str(args.ngram), "--pairs_file", pairs_file]
            load_before = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            stats["load_avg_1min"] = [load_before, os.getloadavg()[0]]  # before, after
            runs = results.get(system, {}).get("runs", []) + [stats]
            stats = dict(stats, runs=runs, seconds=float(np.median([r["seconds"] for r in runs])))
            with open(stats_file, "w", encoding="utf-8") as f:
                json.dump(stats, f)
        with open(stats_file, encoding="utf-8") as f:
            results[system] = json.load(f)
        with open(pairs_file, encoding="utf-8") as f:
            results[system]["pairs"] = [tuple(p) for p in json.load(f)["pairs"]]
    ours, ds = results["ours"], results["datasketch"]
    comp = _components(ours["pairs"])
    found = sum(1 for a, b in ds["pairs"] if a in comp and comp.get(a) == comp.get(b))
    ds_comp = _components(ds["pairs"])
    agreed = sum(1 for a, b in ours["pairs"] if a in ds_comp and ds_comp.get(a) == ds_comp.get(b))
    summary = {
        "date": time.strftime("%Y-%m-%d"), "device": f"CPU, {os.cpu_count()} cores",
        "docs": ours["docs"], "threshold": args.threshold, "num_perm": args.num_perm,
        "ngram": args.ngram,
        "ours": {k: v for k, v in ours.items() if k != "pairs"} | {"pairs": len(ours["pairs"])},
        "ours_seconds_each_run": [r["seconds"] for r in ours.get("runs", [])],
        "datasketch": {k: v for k, v in ds.items() if k != "pairs"} | {"pairs": len(ds["pairs"])},
        "docs_per_s": {"ours": ours["docs"] / ours["seconds"], "datasketch": ds["docs"] / ds["seconds"]},
        "speedup": ds["seconds"] / ours["seconds"],
        "recall_vs_datasketch": found / max(1, len(ds["pairs"])),
        "our_pairs_in_datasketch_clusters": agreed / max(1, len(ours["pairs"])),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
