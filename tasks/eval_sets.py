"""Readers of the offline evaluation sets (TF-free): CMMLU CSV, C3 JSON, FewCLUE JSON lines.

Each reader returns plain records and counts what it could not use in a `sources.SkipCounter`
(a malformed row is skipped and reported, never fatal). Licences: CMMLU CC BY-NC-SA 4.0; C3
"non-commercial research purpose only"; FewCLUE states none (research benchmark). `LICENCES` holds
the lines the evaluation report prints.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Sequence

from zhchat.tasks.sources import SkipCounter

LICENCES = {
    "cmmlu": "CMMLU (haonan-li/CMMLU): CC BY-NC-SA 4.0 - non-commercial, share-alike",
    "c3": "C3 (nlpdata/c3): non-commercial research purpose only",
    "fewclue": "FewCLUE (CLUEbenchmark/FewCLUE): no licence stated - research use",
}
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """One question: the text before the choices, the choice texts, the gold index."""
    id: str
    group: str           # CMMLU subject / C3 file
    question: str
    choices: tuple[str, ...]
    answer: int
    context: str = ""    # C3's passage


def read_cmmlu(directory: str, counter: SkipCounter, subjects: Sequence[str] | None = None
               ) -> dict[str, list[MultipleChoice]]:
    """{subject: questions} from `directory`/*.csv (header `,Question,A,B,C,D,Answer`)."""
    files = sorted(glob.glob(os.path.join(directory, "*.csv")))
    if not files:
        raise FileNotFoundError(f"CMMLU: no *.csv files in {directory!r}")
    out: dict[str, list[MultipleChoice]] = {}
    for path in files:
        subject = os.path.splitext(os.path.basename(path))[0]
        if subjects and subject not in subjects:
            continue
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        header = [h.strip() for h in rows[0]] if rows else []
        try:
            cols = [header.index(k) for k in ("Question", "A", "B", "C", "D", "Answer")]
        except ValueError:
            counter.add("cmmlu_bad_header", f"{path}: {header}")
            continue
        for n, row in enumerate(rows[1:], start=2):
            where = f"{os.path.basename(path)}:{n}"
            if len(row) <= max(cols):
                counter.add("cmmlu_short_row", where)
                continue
            q, a, b, c, d, ans = (row[i].strip() for i in cols)
            if ans not in LETTERS or not q:
                counter.add("cmmlu_bad_answer" if q else "cmmlu_empty_question", where)
                continue
            out.setdefault(subject, []).append(MultipleChoice(
                id=where, group=subject, question=q, choices=(a, b, c, d),
                answer=LETTERS.index(ans)))
    return out


def read_c3(files: Sequence[str], counter: SkipCounter) -> list[MultipleChoice]:
    """Questions of C3 files: a JSON array of [paragraphs, [{question, choice, answer}], id]."""
    out: list[MultipleChoice] = []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            with open(path, encoding="utf-8") as f:
                docs = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            counter.add("c3_unreadable_file", f"{path} ({e})")
            continue
        for i, doc in enumerate(docs if isinstance(docs, list) else []):
            where = f"{name}[{i}]"
            try:
                paragraphs, questions, doc_id = doc
                context = "\n".join(paragraphs)
            except (TypeError, ValueError):
                counter.add("c3_malformed_document", where)
                continue
            for j, q in enumerate(questions):
                try:
                    choices = tuple(str(c) for c in q["choice"])
                    answer = choices.index(q["answer"])
                    question = str(q["question"])
                except (KeyError, TypeError, ValueError):
                    counter.add("c3_malformed_question", f"{where}.{j}")
                    continue
                out.append(MultipleChoice(id=f"{doc_id}.{j}", group=name, question=question,
                                          choices=choices, answer=answer, context=context))
    return out
