"""Instruction data readers -> dialogues, with counted skips (TF-free: RL and chat code use them too).

- Alpaca-zh: JSON arrays of {"instruction", "input", "output"} -> [user, assistant]. A file that is
  not valid JSON (one Alpaca-zh file has a trailing comma) is reported and skipped whole.
- ShareGPT: JSON lines of {"conversations": [{"from": "human"|"gpt", "value"}]} -> messages.
Malformed records (missing fields, non-string values, empty outputs, unknown speakers) are counted per
reason in a `sources.SkipCounter`, never dropped silently. Every dialogue has a stable id
(`file:index`) used for the train/validation hash split.

Both datasets are for non-commercial research use (Alpaca-zh translates Stanford Alpaca, CC BY-NC 4.0;
ShareGPT-zh carries a research-only disclaimer): see the data README's licence section.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator, Sequence

from zhchat.tasks import chat_template as ct
from zhchat.tasks import sources


def _load_json_file(path: str, counter: sources.SkipCounter) -> object | None:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        counter.add("broken_json_file", f"{name} (line {e.lineno}: {e.msg})")
        logging.warning("skipping %s: not valid JSON (line %d: %s)", path, e.lineno, e.msg)
    except UnicodeDecodeError:
        counter.add("invalid_utf8_file", name)
        logging.warning("skipping %s: not UTF-8", path)
    return None


def alpaca_messages(record: object, *, system: str | None = None) -> tuple[list[dict] | None, str]:
    """(messages, "") for a valid Alpaca record, else (None, skip reason)."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    for key in ("instruction", "output"):
        if key not in record:
            return None, f"missing_field:{key}"
    fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
    fields["input"] = "" if fields["input"] is None else fields["input"]
    for key, value in fields.items():
        if not isinstance(value, str):
            return None, f"non_string_field:{key}"
    if not fields["output"].strip():
        return None, "empty_output"
    if not fields["instruction"].strip():
        return None, "empty_instruction"
    prompt = fields["instruction"].strip()
    if fields["input"].strip():
        prompt += "\n" + fields["input"].strip()
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"].strip()}]
    return messages, ""


def iter_alpaca(files: str | Sequence[str], counter: sources.SkipCounter, *,
                system: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(id, messages) of every valid record of the Alpaca-style JSON files/globs."""
    for path in sources.expand_files(files):
        data = _load_json_file(path, counter)
        if data is None:
            continue
        name = os.path.basename(path)
        if not isinstance(data, list):
            counter.add("not_a_json_array_file", name)
            continue
        for i, record in enumerate(data):
            messages, reason = alpaca_messages(record, system=system)
            if messages is None:
                counter.add(reason, f"{name}:{i}")
                continue
            try:
                ct.validate(messages)
            except ct.ChatFormatError as e:
                counter.add("bad_dialogue", f"{name}:{i} ({e})")
                continue
            yield f"{name}:{i}", messages


def sharegpt_messages(record: object, *, system: str | None = None
                      ) -> tuple[list[dict] | None, str]:
    """(messages, "") for a usable ShareGPT record, else (None, skip reason). Empty turns stay: the
    example builder skips empty replies and keeps empty user turns as they are."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        return None, "missing_field:conversations"
    try:
        messages = ct.from_sharegpt(turns)
    except ct.ChatFormatError:
        return None, "unknown_speaker"
    if any(not isinstance(m["content"], str) for m in messages):
        return None, "non_string_field:value"
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages, ""


def iter_sharegpt(files: str | Sequence[str], counter: sources.SkipCounter, *,
                  system: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(id, messages) of every usable conversation of the ShareGPT JSON-lines files/globs."""
    for path in sources.expand_files(files):
        for where, record in sources.iter_json_records(path, counter):
            messages, reason = sharegpt_messages(record, system=system)
            if messages is None:
                counter.add(reason, where)
                continue
            try:
                ct.validate(messages)
            except ct.ChatFormatError as e:
                counter.add("bad_dialogue", f"{where} ({e})")
                continue
            yield where, messages


READERS = {"alpaca": iter_alpaca, "sharegpt": iter_sharegpt}


def iter_turn_examples(dialogues: Iterator[tuple[str, list[dict]]], vocab, *, max_inputs: int,
                       max_targets: int, counter: sources.SkipCounter) -> Iterator[dict]:
    """Every assistant turn with its history -> {"id", "inputs", "targets" (ids), "inputs_pretokenized",
    "targets_pretokenized"}; histories are left-truncated at turn boundaries to `max_inputs`, replies
    cut to `max_targets` (counted as `kept_reply_truncated`); empty replies and prompts that do not fit
    even alone are counted and skipped."""
    for dialogue_id, messages in dialogues:
        if messages[-1]["role"] != "assistant":
            counter.add("trailing_user_turn_unused", dialogue_id)
        for k, dialogue in enumerate(ct.expand_turns(messages)):
            where = f"{dialogue_id}#{k}"
            if not dialogue[-1]["content"].strip():
                counter.add("empty_output", where)
                continue
            if not any(m["role"] == "user" for m in dialogue[:-1]):
                counter.add("reply_without_prompt", where)
                continue
            try:
                inputs, targets, truncated = ct.encode_example(
                    vocab, dialogue, max_inputs=max_inputs, max_targets=max_targets)
            except ct.ChatFormatError:
                counter.add("prompt_too_long", where)
                continue
            if truncated:
                counter.add("kept_reply_truncated", where)
            yield {"id": where, "inputs": inputs, "targets": targets,
                   "inputs_pretokenized": ct.render(dialogue[:-1], add_generation_prompt=True),
                   "targets_pretokenized": dialogue[-1]["content"]}
