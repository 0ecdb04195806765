"""CLI: `python -m zhchat.tasks.clean --gin_file=gin_configs/clean/all_raw.gin [--gin.X=Y ...]`.

Gin files are looked up as given, then under the repository's gin_configs/. Progress lines come from
the workers (documents read/cleaned per worker every 10 s, shards written); the report is printed at
the end and written beside the shards (report.json, report.md, dedup_clusters.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import gin

import zhchat.gin_configs
from zhchat.tasks.clean import pipeline, report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[], help="gin config (repeatable)")
    args, rest = parser.parse_known_args(argv)
    bindings = []
    for arg in rest:
        if not arg.startswith("--gin."):
            parser.error(f"unknown argument {arg!r} (bindings are --gin.name=value)")
        bindings.append(arg[len("--gin."):])
    if not args.gin_file:
        parser.error("give at least one --gin_file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    gin.add_config_file_search_path(os.path.dirname(zhchat.gin_configs.__file__))
    gin.parse_config_files_and_bindings(args.gin_file, bindings)
    rep = pipeline.clean_corpus()
    print(report.to_table(rep))
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
