"""The cleaning report: Beam counters -> JSON (per source and per stage docs/chars in/out, skips per
reason, duplicate clusters with examples, run time) and a readable Markdown table."""

from __future__ import annotations

from typing import Sequence

from apache_beam.metrics.metric import MetricsFilter

from zhchat.tasks.clean import stats


def counter_values(metrics) -> dict[str, int]:
    out = {}
    for c in metrics.query(MetricsFilter().with_namespace(stats.NAMESPACE))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def build(metrics, *, clusters: dict, seconds: float, sources: Sequence[str],
          filters: Sequence[str], settings: dict) -> dict:
    """Assembles the report dict from the pipeline's counters (or a plain {name: value} dict)."""
    values = metrics if isinstance(metrics, dict) else counter_values(metrics)
    stage_names = (["read", "normalize"] + [f"filter:{f}" for f in filters]
                   + ["dedup:exact", "dedup:near", "dedup:lines", "output"])
    stages = {}
    skips: dict[str, dict[str, dict[str, int]]] = {}
    for name, value in sorted(values.items()):
        what, source, field = name.split("|")
        if what.startswith("skip:"):
            skips.setdefault(source, {}).setdefault(what[5:], {"docs": 0, "chars": 0})[field] = value
        else:
            row = stages.setdefault(what, {}).setdefault(
                source, {"docs_in": 0, "chars_in": 0, "docs_out": 0, "chars_out": 0})
            row[field] = value
    ordered = {s: stages[s] for s in stage_names if s in stages}
    ordered.update({s: v for s, v in stages.items() if s not in ordered})
    totals = {}
    for stage, per_source in ordered.items():
        totals[stage] = {f: sum(r[f] for r in per_source.values())
                         for f in ("docs_in", "chars_in", "docs_out", "chars_out")}
    return {"seconds": round(seconds, 2), "sources": list(sources), "settings": settings,
            "stages": ordered, "stage_totals": totals, "skips": skips,
            "skips_total": sum(v["docs"] for per in skips.values() for v in per.values()),
            "dedup": clusters}


def to_table(rep: dict) -> str:
    """Markdown: one table per stage x source, skips, duplicate clusters."""
    lines = [f"# Cleaning report ({rep['seconds']:.1f} s)", "",
             "| stage | source | docs in | docs out | chars in | chars out | chars kept |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for stage, per_source in rep["stages"].items():
        rows = list(per_source.items()) + [("**all**", rep["stage_totals"][stage])]
        for source, r in rows:
            ref = r["chars_in"] or r["chars_out"]
            kept = f"{100 * r['chars_out'] / ref:.1f}%" if ref else "-"
            din = r["docs_in"] if stage != "read" else "-"
            cin = r["chars_in"] if stage not in ("read", "output") else "-"
            lines.append(f"| {stage} | {source} | {din} | {r['docs_out']} | {cin} | "
                         f"{r['chars_out']} | {kept if cin != '-' else '-'} |")
    lines += ["", f"## Skipped input ({rep['skips_total']} records)", ""]
    if rep["skips"]:
        lines += ["| source | reason | records | bytes/chars |", "|---|---|---:|---:|"]
        for source, reasons in rep["skips"].items():
            for reason, v in sorted(reasons.items()):
                lines.append(f"| {source} | {reason} | {v['docs']} | {v['chars']} |")
    else:
        lines.append("none")
    d = rep["dedup"]
    lines += ["", f"## Duplicate clusters: {d['clusters']} (removed: exact "
              f"{d['docs_removed']['exact']}, near {d['docs_removed']['near']})", ""]
    for pair, n in d["cross_source_clusters"].items():
        lines.append(f"- across sources {pair}: {n} clusters")
    lines += ["", "| size | kept | examples |", "|---:|---|---|"]
    for c in d["largest"]:
        kept = next(m for m in c["members"] if m["kept"])
        ex = " / ".join(f"{m['source']}:{m['id']} «{m['preview'][:30]}»".replace("|", "¦")
                        .replace("\n", " ") for m in c["members"][:3])
        lines.append(f"| {c['size']} | {kept['source']}:{kept['id']} | {ex} |")
    return "\n".join(lines) + "\n"
