"""report.json, report.md and PNG bar charts of an evaluation."""

from __future__ import annotations

import json
import os
from typing import Any

from zhchat.tasks.eval_sets import LICENCES


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of {report['checkpoint']} (step {report['step']})", ""]
    used = [k for k in ("cmmlu", "c3", "fewclue") if k in report["results"]]
    if "multitask" in report["results"]:
        used += [k for k in ("c3", "fewclue") if k not in used]
    if used:
        lines += ["Licences of the sets used: " + "; ".join(LICENCES[k] for k in used) + ".", ""]
    res = report["results"]
    if "lm" in res:
        lines += ["## Language modelling", "", "| corpus | documents | tokens | nats/token | "
                  "perplexity | bits/char |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in res["lm"].items():
            if r.get("tokens"):
                lines.append(f"| {name} | {r['documents']} | {r['tokens']} | "
                             f"{r['nats_per_token']:.3f} | {r['perplexity']:.1f} | "
                             f"{r['bits_per_char']:.3f} |")
        lines.append("")
    if "cmmlu" in res:
        lines += ["## CMMLU (letter log-likelihood after 答案是：; chance 25%)", "",
                  "As the CMMLU repository's harness (the next-token choice of A-D); "
                  "lm-evaluation-harness scores ` A` with a space and names the subject.", "",
                  "| shots | questions | accuracy |", "|---:|---:|---:|"]
        for r in res["cmmlu"].values():
            lines.append(f"| {r['shots']} | {r['questions']} | {_pct(r['accuracy'])} |")
        first = next(iter(res["cmmlu"].values()))
        lines += ["", "| subject | " + " | ".join(f"{r['shots']}-shot" for r in res["cmmlu"].values())
                  + " |", "|---|" + "---:|" * len(res["cmmlu"])]
        for subject in first["per_subject"]:
            lines.append(f"| {subject} | " + " | ".join(_pct(r["per_subject"].get(subject))
                                                      for r in res["cmmlu"].values()) + " |")
        lines.append("")
    if "c3" in res:
        r = res["c3"]
        lines += ["## C3 (choice log-likelihood after passage + question)", "",
                  f"{r['questions']} questions: acc_norm (per character) {_pct(r['acc_norm'])}, "
                  f"acc (summed) {_pct(r['acc'])}, chance {_pct(r['chance'])}.", ""]
    if "fewclue" in res:
        lines += ["## FewCLUE zero-shot (verbaliser log-likelihood per character)", "",
                  "| task | examples | accuracy | macro-F1 | majority acc | majority F1 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for task, r in res["fewclue"].items():
            if r.get("examples"):
                lines.append(f"| {task} | {r['examples']} | {_pct(r['accuracy'])} | "
                             f"{_pct(r['macro_f1'])} | {_pct(r['majority_accuracy'])} | "
                             f"{_pct(r['majority_macro_f1'])} |")
        lines.append("")
    if "multitask" in res:
        lines += ["## Multitask prompt tasks (generated answers, seqio metric_fns)", "",
                  "| task | metrics |", "|---|---|"]
        for task, metrics in res["multitask"].items():
            lines.append(f"| {task} | " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                   if isinstance(v, (int, float))) + " |")
        lines.append("")
    if "reward_model" in res:
        r = res["reward_model"]
        lines += ["## Reward model", "", f"{r['pairs']} pairs: pairwise accuracy "
                  f"{_pct(r['pairwise_accuracy'])}, mean margin {r['margin']:.3f}.", ""]
    if "policy" in res:
        r = res["policy"]
        lines += ["## Policy against the reference", "",
                  f"{r['prompts']} held-back prompts: reward-model win rate {_pct(r['win_rate'])} "
                  f"(score {r['rm_score_policy']:.3f} vs {r['rm_score_reference']:.3f}), "
                  f"KL to the reference {r['kl']:.3f} nats per reply.", ""]
    if "samples" in res:
        lines += ["## Samples (chat template)", ""]
        for s in res["samples"]:
            lines += [f"- **user**: {s['prompt']}", f"  **assistant**: {s['reply']}".replace(
                "\n", " / ")]
        lines.append("")
    if report.get("skipped"):
        lines += ["## Skipped records", "", *[f"- {k}: {n}" for k, n in report["skipped"].items()],
                  ""]
    return "\n".join(lines)


def plots(report: dict[str, Any], out: str) -> list[str]:
    """One PNG per multiple-choice suite (accuracy with chance marked); [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    res = report["results"]
    if "cmmlu" in res:
        runs = list(res["cmmlu"].values())
        subjects = list(runs[0]["per_subject"])
        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(subjects)), 4))
        width = 0.8 / len(runs)
        for i, r in enumerate(runs):
            ax.bar([j + i * width for j in range(len(subjects))],
                   [r["per_subject"][s] for s in subjects], width, label=f"{r['shots']}-shot")
        ax.axhline(0.25, color="k", ls="--", lw=1, label="chance")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(subjects))], subjects, rotation=75,
                      fontsize=7)
        ax.set_ylabel("accuracy")
        ax.set_title("CMMLU per subject")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, "cmmlu.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if "fewclue" in res:
        tasks = [t for t, r in res["fewclue"].items() if r.get("examples")]
        fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(tasks)), 3.5))
        xs = range(len(tasks))
        ax.bar([x - 0.2 for x in xs], [res["fewclue"][t]["accuracy"] for t in tasks], 0.4,
               label="zero-shot")
        ax.bar([x + 0.2 for x in xs], [res["fewclue"][t]["majority_accuracy"] for t in tasks], 0.4,
               label="majority class")
        ax.set_xticks(list(xs), tasks)
        ax.set_ylabel("accuracy")
        ax.set_title("FewCLUE")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, "fewclue.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write(report: dict[str, Any], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    return [os.path.join(out, "report.json"), os.path.join(out, "report.md"), *plots(report, out)]
