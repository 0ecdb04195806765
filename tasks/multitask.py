"""Multitask prompt tasks (PromptCLUE-style text-to-text) over ../shared/data/eval, as chat turns.

FewCLUE TNEWS, IFLYTEK, OCNLI, BUSTM, CSL, EPRSTMT, CLUEWSC (`train_few_all.json` -> "train",
`dev_few_all.json` -> "validation") and C3 (`c3-{d,m}-train.json` / `-dev.json`). Each record becomes
a prompt (one of several Chinese templates, `multitask_prompts`) as a user turn and its verbalized
label as the assistant reply, encoded with the shared chat template exactly like SFT examples, so
`zh_multitask` mixes with `zh_sft`. The candidate answers travel in the `choices` text feature for
the postprocessor; metric_fns are accuracy, macro-F1 and the invalid-generation rate.
Records without the needed fields or with unknown labels are counted and skipped.

Licences: C3 is for non-commercial research only; FewCLUE states none yet (see the data README).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import gin
import seqio

from zhchat.tasks import chat_template as ct
from zhchat.tasks import eval_metrics, eval_sets, lm, multitask_prompts, sft, sources

FEWCLUE = ("tnews", "iflytek", "ocnli", "bustm", "csl", "eprstmt", "cluewsc")
DATASETS = FEWCLUE + ("c3",)
SPLIT_FILES = {"train": "train", "validation": "dev"}


def _fewclue_records(path: str, counter: sources.SkipCounter) -> Iterator[tuple[str, dict]]:
    name = os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                counter.add("broken_json", f"{name}:{lineno}")
                continue
            rid = record.get("id", record.get("idx", lineno)) if isinstance(record, dict) else lineno
            yield f"{name}:{rid}", record


def _c3_records(path: str, counter: sources.SkipCounter) -> Iterator[tuple[str, dict]]:
    for where, passage, q in eval_sets.iter_c3_questions(path, counter):
        yield where, {"passage": passage, "question": q.get("question"),
                      "choices": q.get("choice"), "answer": q.get("answer")}


def record_files(dataset: str, split: str, data_dir: str) -> list[str]:
    root = lm.resolve_files(["."], data_dir)[0]
    if dataset == "c3":
        suffix = "train" if split == "train" else "dev"
        return [os.path.join(root, "c3", f"c3-{kind}-{suffix}.json") for kind in ("d", "m")]
    return [os.path.join(root, "fewclue", dataset, f"{SPLIT_FILES[split]}_few_all.json")]


def iter_records(dataset: str, split: str, data_dir: str, counter: sources.SkipCounter
                 ) -> Iterator[tuple[str, dict]]:
    for path in record_files(dataset, split, data_dir):
        reader = _c3_records if dataset == "c3" else _fewclue_records
        yield from reader(path, counter)


def label_set(dataset: str, data_dir: str) -> list[str] | None:
    """All label texts of a task whose answers are its own labels (IFLYTEK), from train + dev."""
    spec = multitask_prompts.PROMPTS[dataset]
    if spec.verbalizer is not None or dataset == "c3":
        return None
    labels = set()
    for split in SPLIT_FILES:
        for _, r in iter_records(dataset, split, data_dir, sources.SkipCounter()):
            try:
                labels.add(spec.fields(r)["label"])
            except (KeyError, TypeError):
                pass
    return sorted(labels)


def template_index(record_id: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.md5((salt + record_id).encode()).digest()[:4], "big")


def _example_fn(dataset: str, data_dir: str, salt: str):
    labels = label_set(dataset, data_dir)

    def example_fn(split, vocab, max_inputs, max_targets, counter):
        for rid, record in iter_records(dataset, split, data_dir, counter):
            try:
                prompt, answer, choices = multitask_prompts.build_prompt(
                    dataset, record, template_index(rid, salt), labels)
            except (KeyError, TypeError, AttributeError) as e:
                counter.add(f"bad_record({type(e).__name__})", rid)
                continue
            except ValueError as e:
                counter.add("unknown_label", f"{rid} ({e})")
                continue
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            try:
                inputs, targets, truncated = ct.encode_example(
                    vocab, messages, max_inputs=max_inputs, max_targets=max_targets)
            except ct.ChatFormatError as e:
                counter.add("prompt_too_long" if "max_len" in str(e) else "bad_dialogue", rid)
                continue
            if truncated:
                counter.add("kept_reply_truncated", rid)
            yield {"id": rid, "inputs": inputs, "targets": targets,
                   "inputs_pretokenized": ct.render(messages[:1], add_generation_prompt=True),
                   "targets_pretokenized": answer, "choices": eval_metrics.CHOICE_SEP.join(choices)}
    return example_fn


@gin.configurable
def register_prompt_task(*, dataset: str = gin.REQUIRED, vocabulary: seqio.Vocabulary = gin.REQUIRED,
                         name: str | None = None, data_dir: str = "../shared/data/eval",
                         max_inputs_length: int = 512, max_targets_length: int = 32,
                         template_salt: str = "", replace: bool = True) -> str:
    """Registers `zh_prompt_<dataset>` (or `name`) with splits train/validation; returns its name."""
    if dataset not in DATASETS:
        raise ValueError(f"register_prompt_task: dataset must be one of {DATASETS}, got {dataset!r}")
    for split in SPLIT_FILES:
        for path in record_files(dataset, split, data_dir):
            sources.expand_files(path)  # fail now, naming the missing file
    return sft.register_dialogue_task(
        name or f"zh_prompt_{dataset}", example_fn=_example_fn(dataset, data_dir, template_salt),
        vocabulary=vocabulary, max_inputs_length=max_inputs_length,
        max_targets_length=max_targets_length, postprocess_fn=eval_metrics.label_postprocessor,
        metric_fns=[eval_metrics.accuracy, eval_metrics.macro_f1, eval_metrics.invalid_rate],
        replace=replace)
