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
from typing import Iterator, Sequence

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


def iter_c3_questions(path: str, counter: SkipCounter) -> Iterator[tuple[str, str, dict]]:
    """(where, passage, question record) of a C3 file: a JSON array of
    [paragraphs, [{question, choice, answer}], id]; malformed documents/questions are counted."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            docs = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        counter.add("c3_unreadable_file", f"{path} ({e})")
        return
    for i, doc in enumerate(docs if isinstance(docs, list) else []):
        try:
            paragraphs, questions, doc_id = doc
            passage = "\n".join(paragraphs)
        except (TypeError, ValueError):
            counter.add("c3_malformed_document", f"{name}[{i}]")
            continue
        for j, q in enumerate(questions):
            if not isinstance(q, dict):
                counter.add("c3_malformed_question", f"{name}:{doc_id}#{j}")
                continue
            yield f"{name}:{doc_id}#{j}", passage, q


def read_c3(files: Sequence[str], counter: SkipCounter) -> list[MultipleChoice]:
    """Multiple-choice questions of C3 files (`iter_c3_questions`); the answer must be a choice."""
    out: list[MultipleChoice] = []
    for path in files:
        group = os.path.splitext(os.path.basename(path))[0]
        for where, passage, q in iter_c3_questions(path, counter):
            try:
                choices = tuple(str(c) for c in q["choice"])
                answer = choices.index(q["answer"])
            except (KeyError, TypeError, ValueError):
                counter.add("c3_malformed_question", where)
                continue
            out.append(MultipleChoice(id=where, group=group, question=str(q.get("question", "")),
                                      choices=choices, answer=answer, context=passage))
    return out


# FewCLUE zero-shot: per task, a prompt with the label's words (the verbaliser) as the scored
# continuation. Label sets of tnews/iflytek/csldcp come from the data (label -> description).
TNEWS_WORDS = {"news_story": "故事", "news_culture": "文化", "news_entertainment": "娱乐",
               "news_sports": "体育", "news_finance": "财经", "news_house": "房产", "news_car": "汽车",
               "news_edu": "教育", "news_tech": "科技", "news_military": "军事", "news_travel": "旅游",
               "news_world": "国际", "news_stock": "股票", "news_agriculture": "农业",
               "news_game": "电竞"}
FEWCLUE_TASKS = ("tnews", "iflytek", "ocnli", "bustm", "csl", "eprstmt", "cluewsc", "csldcp", "chid")


@dataclasses.dataclass(frozen=True)
class Classification:
    """One FewCLUE example: the prompt, each candidate's continuation and the gold index."""
    id: str
    prompt: str
    options: tuple[str, ...]
    answer: int


def _fewclue_record(task: str, r: dict, labels: Sequence[str]) -> tuple[str, tuple[str, ...], int]:
    """(prompt, options, gold index) of one record; KeyError/ValueError when malformed."""
    yes_no = ("是", "否")
    if task == "tnews":
        return f"{r['sentence']}\n这条新闻的类别是：", tuple(labels), labels.index(TNEWS_WORDS[r["label_desc"]])
    if task == "iflytek":
        return f"{r['sentence'][:300]}\n这款应用的类别是：", tuple(labels), labels.index(r["label_des"])
    if task == "csldcp":
        return f"{r['content'][:300]}\n这篇论文的学科是：", tuple(labels), labels.index(r["label"])
    if task == "ocnli":
        gold = {"entailment": 0, "neutral": 1, "contradiction": 2}[r["label"]]
        return f"{r['sentence1']}\n问题：{r['sentence2']}？对、可能还是错？\n答案：", ("对", "可能", "错"), gold
    if task == "bustm":
        return (f"“{r['sentence1']}”和“{r['sentence2']}”的意思相同吗？答案：", yes_no,
                {"1": 0, "0": 1}[str(r["label"])])
    if task == "csl":
        return (f"摘要：{r['abst']}\n关键词：{'，'.join(r['keyword'])}\n这些都是这篇论文的关键词吗？答案：",
                yes_no, {"1": 0, "0": 1}[str(r["label"])])
    if task == "eprstmt":
        return f"{r['sentence']}\n这条评价是：", ("好评", "差评"), {"Positive": 0, "Negative": 1}[r["label"]]
    if task == "cluewsc":
        t = r["target"]
        return (f"{r['text']}\n这里的“{t['span2_text']}”指的是“{t['span1_text']}”吗？答案：", yes_no,
                {"true": 0, "false": 1}[r["label"]])
    if task == "chid":  # the idiom in place; each filled text is scored whole
        if r["content"].count("#idiom#") != 1:
            raise ValueError("expected one #idiom# blank")
        head, tail = r["content"].split("#idiom#")
        return head, tuple(c + tail for c in r["candidates"]), int(r["answer"])
    raise ValueError(f"unknown FewCLUE task {task!r}; known: {FEWCLUE_TASKS}")


def _label_words(task: str, records: Sequence[dict]) -> list[str]:
    if task == "tnews":
        return sorted(TNEWS_WORDS.values())
    key = {"iflytek": "label_des", "csldcp": "label"}.get(task)
    return sorted({str(r[key]) for r in records if key in r}) if key else []


def read_fewclue(directory: str, task: str, counter: SkipCounter, split: str = "dev"
                 ) -> tuple[list[Classification], list[int]]:
    """(`split` examples, gold indices of the train file for the majority-class baseline) of one
    task in `directory`/<task>/{train,dev}_few_all.json (JSON lines, CRLF tolerated)."""
    files = {s: os.path.join(directory, task, f"{s}_few_all.json") for s in ("train", split)}
    rows: dict[str, list[dict]] = {}
    for s, path in files.items():
        rows[s] = []
        if not os.path.exists(path):
            raise FileNotFoundError(f"FewCLUE {task}: {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows[s].append(json.loads(line))
                except json.JSONDecodeError:
                    counter.add(f"fewclue_{task}_bad_json", f"{os.path.basename(path)}:{n}")
    labels = _label_words(task, rows["train"] + rows[split])
    out: dict[str, list] = {"train": [], split: []}
    for s in ("train", split):
        for i, r in enumerate(rows[s]):
            try:
                prompt, options, gold = _fewclue_record(task, r, labels)
            except (KeyError, ValueError, TypeError, IndexError, AttributeError):
                counter.add(f"fewclue_{task}_malformed", f"{s}[{i}]")
                continue
            out[s].append(Classification(id=f"{task}/{s}/{r.get('id', i)}", prompt=prompt,
                                         options=options, answer=gold))
    return out[split], [c.answer for c in out["train"]]
