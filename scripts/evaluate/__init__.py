"""Offline evaluation of a checkpoint: language modelling, CMMLU, C3 (scripts/evaluate/suites.py).

    python -m zhchat.scripts.evaluate --run_dir=RUN --vocab=SPM --out=DIR [--suite_gin=evals/X.gin]

Writes report.json, report.md and PNG plots. CMMLU is CC BY-NC-SA 4.0 and C3 is for non-commercial
research only: the report header says which licences apply to the sets it used.
"""
