"""The evaluation suites: language modelling (perplexity, bits per character), CMMLU, C3, FewCLUE.

Each suite turns its data into scoring requests (`scoring.Scorer`) and returns a JSON-able dict.
Multiple choice follows the CMMLU / lm-evaluation-harness conventions; differences are noted in
each docstring.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import gin
import numpy as np

from zhchat.scripts.evaluate.scoring import Scorer, split_continuation
from zhchat.tasks import eval_sets, sources

def language_modelling(scorer: Scorer, vocab: Any, corpora: Sequence[tuple[str, str, str]],
                       counter: sources.SkipCounter, *, seq_len: int = 512,
                       max_docs: int | None = 200) -> dict:
    """Per corpus (files, format, text field): nats/token, perplexity and bits per character
    (tokenizer-independent). Each document is cut into `seq_len`-token windows scored from an empty
    context (no overlap, as the trainer's packed rows see them)."""
    out = {}
    for files, fmt, field in corpora:
        requests, chars, docs = [], 0, 0
        for doc in sources.iter_documents(files=files, format=fmt, text_field=field,
                                          counter=counter):
            if max_docs is not None and docs >= max_docs:
                break
            ids = vocab.encode(doc["text"])
            if not ids:
                counter.add("lm_empty_document", str(doc.get("id")))
                continue
            docs += 1
            chars += len(doc["text"])
            requests += [([], ids[s:s + seq_len]) for s in range(0, len(ids), seq_len)]
        name = os.path.basename(files if isinstance(files, str) else files[0])
        if not requests:
            out[name] = {"documents": 0}
            continue
        total = float(np.sum(scorer.score(requests, desc=f"lm {name}")))
        tokens = sum(len(t) for _, t in requests)
        out[name] = {"documents": docs, "tokens": tokens, "chars": chars,
                     "nats_per_token": -total / tokens, "perplexity": math.exp(-total / tokens),
                     "bits_per_char": -total / math.log(2) / chars}
    return out


def _choice_scores(scorer: Scorer, vocab: Any, prompts: Sequence[str],
                   choices: Sequence[Sequence[str]], desc: str) -> list[tuple[np.ndarray, list]]:
    """Log-likelihood of every choice after its prompt (one request per choice, batched)."""
    requests, owners = [], []
    for qi, (prompt, opts) in enumerate(zip(prompts, choices)):
        for c in opts:
            requests.append(split_continuation(vocab, prompt, c))
            owners.append(qi)
    scores = scorer.score(requests, desc=desc)
    per_q: list[list[float]] = [[] for _ in prompts]
    for qi, s in zip(owners, scores):
        per_q[qi].append(float(s))
    return [np.asarray(s) for s in per_q]


def cmmlu_prompt(question: eval_sets.MultipleChoice, with_answer: bool) -> str:
    lines = [f"题目：{question.question}"] + [f"{letter}. {text}" for letter, text
                                            in zip(eval_sets.LETTERS, question.choices)]
    answer = eval_sets.LETTERS[question.answer] if with_answer else ""
    return "\n".join(lines) + f"\n答案是：{answer}"


CMMLU_HEADER = "以下是单项选择题，请直接给出正确答案的选项。\n\n"


def cmmlu(scorer: Scorer, vocab: Any, test: dict, dev: dict, *, shots: int) -> dict:
    """Accuracy per subject and overall: the letter (A-D) with the highest log-likelihood right
    after `答案是：`, with `shots` dev questions of the same subject as examples. As the CMMLU
    repository's own harness (next-token choice of the letter), but its header names the subject in
    Chinese (a mapping we do not ship); lm-evaluation-harness puts a space before the letter."""
    prompts, answers, subjects = [], [], []
    for subject, questions in sorted(test.items()):
        examples = "".join(cmmlu_prompt(q, True) + "\n\n" for q in dev.get(subject, [])[:shots])
        for q in questions:
            prompts.append(CMMLU_HEADER + examples + cmmlu_prompt(q, False))
            answers.append(q.answer)
            subjects.append(subject)
    scores = _choice_scores(scorer, vocab, prompts, [list(eval_sets.LETTERS)] * len(prompts),
                            desc=f"cmmlu {shots}-shot")
    correct = np.array([int(np.argmax(s)) == a for s, a in zip(scores, answers)])
    per_subject = {s: float(np.mean(correct[np.array(subjects) == s])) for s in sorted(set(subjects))}
    return {"shots": shots, "questions": len(prompts), "accuracy": float(np.mean(correct)) if
            len(correct) else None, "chance": 0.25, "per_subject": per_subject}


def c3(scorer: Scorer, vocab: Any, questions: Sequence[eval_sets.MultipleChoice]) -> dict:
    """Accuracy by the summed log-likelihood of each choice after passage + question (`acc`) and
    by log-likelihood per character of the choice (`acc_norm`, lm-evaluation-harness's length
    normalisation, by characters instead of bytes); chance is the mean of 1 / #choices."""
    prompts = [f"{q.context}\n问题：{q.question}\n答案：" for q in questions]
    scores = _choice_scores(scorer, vocab, prompts, [q.choices for q in questions], desc="c3")
    acc = [int(np.argmax(s)) == q.answer for s, q in zip(scores, questions)]
    norm = [int(np.argmax(s / np.array([max(len(c), 1) for c in q.choices]))) == q.answer
            for s, q in zip(scores, questions)]
    groups = sorted({q.group for q in questions})
    return {"questions": len(questions), "acc": float(np.mean(acc)) if acc else None,
            "acc_norm": float(np.mean(norm)) if norm else None,
            "chance": float(np.mean([1 / len(q.choices) for q in questions])) if questions else None,
            "per_file": {g: float(np.mean([a for a, q in zip(norm, questions) if q.group == g]))
                         for g in groups}}


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes in `gold` or `pred`."""
    f1 = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1)) if f1 else 0.0


def fewclue(scorer: Scorer, vocab: Any, task: str, examples: Sequence[eval_sets.Classification],
            train_gold: Sequence[int]) -> dict:
    """Zero-shot by verbaliser likelihood: the option whose continuation has the highest
    log-likelihood per character after the prompt; accuracy and macro-F1 beside the majority class
    of the train file (its accuracy and macro-F1 on the same examples)."""
    if not examples:
        return {"examples": 0}
    scores = _choice_scores(scorer, vocab, [e.prompt for e in examples],
                            [e.options for e in examples], desc=f"fewclue {task}")
    pred = [int(np.argmax(s / np.array([max(len(o), 1) for o in e.options])))
            for s, e in zip(scores, examples)]
    gold = [e.answer for e in examples]
    majority = max(set(train_gold), key=list(train_gold).count) if train_gold else 0
    return {"examples": len(examples), "accuracy": float(np.mean(np.equal(pred, gold))),
            "macro_f1": macro_f1(gold, pred),
            "majority_accuracy": float(np.mean(np.equal(gold, majority))),
            "majority_macro_f1": macro_f1(gold, [majority] * len(gold))}


def multitask(model: Any, params: Any, vocab_path: str, *, gin_file: str,
              tasks: Sequence[str] | None, max_examples: int | None, batch_size: int,
              max_decode_length: int) -> dict:
    """A model fine-tuned on the multitask prompt tasks (tasks/multitask.gin), scored as in
    training: greedy answers -> the task's postprocessor -> its seqio metric_fns (accuracy,
    macro-F1, invalid rate) on the validation split. Needs TensorFlow/seqio (a CPU/TPU host)."""
    from zhchat.tasks import lm, seqio_eval

    gin.clear_config()
    names = lm.parse_gin([gin_file], [f"VOCAB_PATH = '{vocab_path}'"])
    gin.clear_config()
    out = {}
    for name in names:
        if tasks and name not in tasks or name.startswith("zh_multitask"):
            continue
        out[name] = seqio_eval.evaluate_task(name, model=model, params=params, split="validation",
                                             max_examples=max_examples, batch_size=batch_size,
                                             max_decode_length=max_decode_length)
    return out


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class Suites:
    """What to evaluate; each gin_configs/evals/*.gin sets one field, so they combine. An empty
    field skips its suite. Relative paths are taken from the repository root."""
    lm_corpora: Sequence[tuple[str, str, str]] = ()   # (files, format, text field)
    lm_seq_len: int = 512
    lm_max_docs: int | None = 200
    cmmlu_dir: str | None = None                      # has dev/ and test/
    cmmlu_split: str = "test"
    cmmlu_shots: Sequence[int] = (0, 5)
    cmmlu_subjects: Sequence[str] | None = None
    c3_files: Sequence[str] = ()
    fewclue_dir: str | None = None                    # has <task>/{train,dev}_few_all.json
    fewclue_tasks: Sequence[str] = eval_sets.FEWCLUE_TASKS
    fewclue_split: str = "dev"
    fewclue_max_examples: int | None = None           # per task (iflytek has 119 labels)
    multitask_gin: str | None = None                  # e.g. 'tasks/multitask.gin' (fine-tuned)
    multitask_tasks: Sequence[str] | None = None      # None: every prompt task it registers
    multitask_max_examples: int | None = 200
    multitask_max_decode_length: int = 16


def run(suites: Suites, scorer: Scorer, vocab: Any, counter: sources.SkipCounter,
        resolve=lambda p: p, vocab_path: str | None = None) -> dict:
    """Runs the configured suites; {suite: result, "seconds": {suite: wall time}}."""
    import time

    report: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    clock = [time.time()]

    def lap(name: str) -> None:
        seconds[name] = time.time() - clock[0]
        clock[0] = time.time()

    if suites.lm_corpora:
        corpora = [(resolve(f), fmt, field) for f, fmt, field in suites.lm_corpora]
        report["lm"] = language_modelling(scorer, vocab, corpora, counter,
                                          seq_len=suites.lm_seq_len, max_docs=suites.lm_max_docs)
        lap("lm")
    if suites.cmmlu_dir:
        root = resolve(suites.cmmlu_dir)
        test = eval_sets.read_cmmlu(os.path.join(root, suites.cmmlu_split), counter,
                                    suites.cmmlu_subjects)
        dev = eval_sets.read_cmmlu(os.path.join(root, "dev"), counter, suites.cmmlu_subjects)
        report["cmmlu"] = {f"{k}shot": cmmlu(scorer, vocab, test, dev, shots=k)
                           for k in suites.cmmlu_shots}
        lap("cmmlu")
    if suites.c3_files:
        files = sources.expand_files([resolve(f) for f in suites.c3_files])
        report["c3"] = c3(scorer, vocab, eval_sets.read_c3(files, counter))
        lap("c3")
    if suites.fewclue_dir:
        report["fewclue"] = {}
        for task in suites.fewclue_tasks:
            examples, train_gold = eval_sets.read_fewclue(resolve(suites.fewclue_dir), task,
                                                          counter, suites.fewclue_split)
            report["fewclue"][task] = fewclue(scorer, vocab, task,
                                              examples[:suites.fewclue_max_examples], train_gold)
        lap("fewclue")
    if suites.multitask_gin:
        report["multitask"] = multitask(
            scorer.model, scorer.params, vocab_path or vocab.path, gin_file=suites.multitask_gin,
            tasks=suites.multitask_tasks, max_examples=suites.multitask_max_examples,
            batch_size=scorer.batch_size, max_decode_length=suites.multitask_max_decode_length)
        lap("multitask")
    report["seconds"] = seconds
    return report
