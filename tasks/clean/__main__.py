"""CLI: `python -m zhchat.tasks.clean --gin_file=gin_configs/clean/all_raw.gin [--gin.X=Y ...]`.

Gin files are looked up as given, then under the repository's gin_configs/. Progress lines come from
the workers (documents read/cleaned per worker every 10 s, shards written); the report is printed at
the end and written beside the shards (report.json, report.md, dedup_clusters.json).
"""

from __future__ import annotations

import argparse
import logging
import sys

import gin

from zhchat.gin_configs import cli as gin_cli
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
    try:
        gin_cli.parse_checked(args.gin_file, bindings)  # misspelt macros are errors, not no-ops
        gin.finalize()
    except (ValueError, OSError) as e:  # a missing gin file, a bad binding, an unknown macro
        msg = str(e).splitlines()[0]
        parser.exit(2, ("" if msg.startswith("gin config error") else "gin config error: ")
                    + msg + "\n")
    try:
        rep = pipeline.clean_corpus()
    except (FileNotFoundError, PermissionError) as e:  # inputs and output folder, checked first
        parser.exit(2, f"clean: error: {str(e).splitlines()[0]}\n")
    print(report.to_table(rep))
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
