"""PromptCLUE-style Chinese prompt templates and label verbalizers for FewCLUE tasks and C3.

`PROMPTS[task]` is a `PromptSpec`: how to read a record (`fields`), the label -> answer text map
(`verbalizer`; None when the answer is the record's own text, e.g. IFLYTEK categories or C3 choices),
and several templates (one is picked per example by a hash of its id, so every split sees all of
them). Templates fill `{options}` with the candidate answers joined by "，".
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

Record = Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    fields: Callable[[Record], dict]   # record -> template fields + "label" (raises KeyError/TypeError)
    templates: Sequence[str]
    verbalizer: Mapping[str, str] | None = None
    list_options: bool = True          # IFLYTEK's 119 categories are not listed in the prompt


TNEWS_LABELS = {
    "news_story": "故事", "news_culture": "文化", "news_entertainment": "娱乐", "news_sports": "体育",
    "news_finance": "财经", "news_house": "房产", "news_car": "汽车", "news_edu": "教育",
    "news_tech": "科技", "news_military": "军事", "news_travel": "旅游", "news_world": "国际",
    "news_stock": "股票", "news_agriculture": "农业", "news_game": "游戏"}
YES_NO = {"1": "是", "0": "否", "true": "是", "false": "否"}


def _str(record: Record, key: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"field {key!r} must be a non-empty string")
    return value.strip()


PROMPTS: dict[str, PromptSpec] = {
    "tnews": PromptSpec(
        fields=lambda r: {"sentence": _str(r, "sentence"), "label": _str(r, "label_desc")},
        verbalizer=TNEWS_LABELS,
        templates=("这是一条新闻标题：{sentence}\n它属于哪个类别？选项：{options}",
                   "新闻分类：{sentence}\n选项：{options}\n答案：",
                   "下面这条新闻的主题是什么？\n{sentence}\n可选类别：{options}")),
    "iflytek": PromptSpec(
        fields=lambda r: {"sentence": _str(r, "sentence"), "label": _str(r, "label_des")},
        list_options=False,
        templates=("阅读以下应用描述，判断它属于哪一类应用：\n{sentence}",
                   "这个App属于什么类别？\n{sentence}",
                   "应用分类：{sentence}\n类别：")),
    "ocnli": PromptSpec(
        fields=lambda r: {"s1": _str(r, "sentence1"), "s2": _str(r, "sentence2"),
                          "label": _str(r, "label")},
        verbalizer={"entailment": "蕴含", "neutral": "中立", "contradiction": "矛盾"},
        templates=("前提：{s1}\n假设：{s2}\n前提和假设是什么关系？选项：{options}",
                   "“{s1}”与“{s2}”之间的逻辑关系是？选项：{options}",
                   "推理关系判断：\n句子一：{s1}\n句子二：{s2}\n选项：{options}\n答案：")),
    "bustm": PromptSpec(
        fields=lambda r: {"s1": _str(r, "sentence1"), "s2": _str(r, "sentence2"),
                          "label": str(r["label"])},
        verbalizer={"1": "相同", "0": "不同"},
        templates=("判断下面两句话的意思是否相同：\n{s1}\n{s2}\n选项：{options}",
                   "“{s1}”和“{s2}”表达的意思相同还是不同？选项：{options}",
                   "语义匹配：\n句子一：{s1}\n句子二：{s2}\n选项：{options}\n答案：")),
    "csl": PromptSpec(
        fields=lambda r: {"abst": _str(r, "abst"), "label": str(r["label"]),
                          "keywords": "，".join(r["keyword"]) if isinstance(r["keyword"], list)
                          and all(isinstance(k, str) for k in r["keyword"]) else _str(r, "keyword")},
        verbalizer={"1": "是", "0": "否"},
        templates=("摘要：{abst}\n关键词：{keywords}\n这些关键词都是这篇摘要的真实关键词吗？选项：{options}",
                   "阅读论文摘要，判断给出的关键词是否都正确。\n摘要：{abst}\n关键词：{keywords}\n选项：{options}",
                   "{abst}\n问题：“{keywords}”能作为上文的关键词吗？选项：{options}")),
    "eprstmt": PromptSpec(
        fields=lambda r: {"sentence": _str(r, "sentence"), "label": _str(r, "label")},
        verbalizer={"Positive": "正面", "Negative": "负面"},
        templates=("这条商品评论的情感倾向是什么？\n{sentence}\n选项：{options}",
                   "情感分析：{sentence}\n选项：{options}\n答案：",
                   "评论：{sentence}\n这条评论是正面的还是负面的？选项：{options}")),
    "cluewsc": PromptSpec(
        fields=lambda r: {"text": _str(r, "text"), "span1": _str(r["target"], "span1_text"),
                          "span2": _str(r["target"], "span2_text"), "label": _str(r, "label")},
        verbalizer={"true": "是", "false": "否"},
        templates=("{text}\n这段话中的“{span2}”指的是“{span1}”吗？选项：{options}",
                   "指代消解：{text}\n问题：“{span2}”是否指代“{span1}”？选项：{options}",
                   "阅读下文，回答问题。\n{text}\n“{span2}”说的是“{span1}”吗？选项：{options}")),
    "c3": PromptSpec(
        fields=lambda r: {"passage": r["passage"], "question": r["question"],
                          "choices": r["choices"], "label": r["answer"]},
        templates=("阅读材料：\n{passage}\n问题：{question}\n选项：{options}\n答案：",
                   "{passage}\n根据上文回答：{question}\n选项：{options}",
                   "阅读理解。\n{passage}\n{question}\n请从以下选项中选择：{options}")),
}


def build_prompt(task: str, record: Record, template_index: int,
                 label_set: Sequence[str] | None = None) -> tuple[str, str, list[str]]:
    """(prompt, answer text, candidate answers) of one record; KeyError/TypeError/ValueError when
    the record lacks fields or has an unknown label. `label_set` gives the candidates of tasks whose
    answer is the label text itself (IFLYTEK)."""
    spec = PROMPTS[task]
    fields = spec.fields(record)
    label = fields.pop("label")
    if spec.verbalizer is not None:
        if label not in spec.verbalizer:
            raise ValueError(f"unknown label {label!r}")
        answer = spec.verbalizer[label]
        choices = list(dict.fromkeys(spec.verbalizer.values()))
    else:
        choices = list(fields.pop("choices", None) or label_set or [])
        answer = label
        if not all(isinstance(c, str) and c for c in choices) or answer not in choices:
            raise ValueError(f"answer {answer!r} is not among the choices")
    template = spec.templates[template_index % len(spec.templates)]
    prompt = template.format(options="，".join(choices), **fields)
    return prompt, answer, choices
