"""Preference data without TensorFlow: jsonl records -> chat-formatted token rows -> numpy batches
for the reward model (rl/reward_model.py), DPO (rl/dpo.py) and PPO prompts (rl/ppo.py).

Record formats (one JSON object a line):
  {"conversations": [{"from": "system"|"human", "value": ...}], "chosen": str, "rejected": str}
      (../shared/data/preference/dpo_zh_500.jsonl: Apache-2.0 with a research-only, non-commercial
      disclaimer: use for research only)
  {"prompt": str | messages, "chosen": str, "rejected": str}   (rl/pair_builder.py writes these)
  {"prompt": ..., "responses": [str, ...]}                     K-wise, ranked best first
  {"prompt": ..., "responses": [...], "scores": [float, ...]}  direct scores (any order)
Prompts become the chat template's history + generation prompt (tasks/chat_template.py); a response
is its reply + <|im_end|> + EOS. Bad records are counted and skipped (`SkipCounter`): unreadable
JSON, a bad dialogue, empty responses, identical responses, fewer than 2 responses, prompts longer
than `max_prompt_len`; over-long responses are cut to `max_response_len` (counted as `truncated`).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import gin
import numpy as np

from zhchat.tasks import chat_template
from zhchat.tasks.sources import SkipCounter, expand_files
from zhchat.tasks.vocabulary import Vocabulary


def _messages(record: dict) -> list[dict]:
    if "conversations" in record:
        return chat_template.from_sharegpt(record["conversations"])
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return [dict(m) for m in prompt]
    raise chat_template.ChatFormatError("no prompt (expected 'conversations' or 'prompt')")


def parse_record(record: dict) -> tuple[list[dict], list[str], list[float] | None]:
    """(prompt messages, responses best first, scores or None) of one record."""
    messages = _messages(record)
    if "responses" in record:
        responses, scores = list(record["responses"]), record.get("scores")
    else:
        responses, scores = [record.get("chosen"), record.get("rejected")], None
    if scores is not None and len(scores) != len(responses):
        raise chat_template.ChatFormatError("'scores' and 'responses' differ in length")
    return messages, responses, None if scores is None else [float(s) for s in scores]


@gin.configurable
class PreferenceExamples:
    """Tokenized preference lists from jsonl files (see the module docstring), skips counted."""

    def __init__(self, *, files: str | Sequence[str] = gin.REQUIRED, vocab: Vocabulary = gin.REQUIRED,
                 max_prompt_len: int = 256, max_response_len: int = 256, max_responses: int = 2,
                 split: str = "all", validation_every: int = 10):
        if split not in ("all", "train", "validation"):
            raise ValueError(f"PreferenceExamples.split={split!r}: expected 'all', 'train' or 'validation'")
        self.vocab, self.max_prompt_len, self.max_response_len = vocab, max_prompt_len, max_response_len
        self.max_responses = max_responses
        self.skips = SkipCounter()
        self.truncated = 0
        self.examples: list[dict[str, Any]] = []
        for path in expand_files(files):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    held_out = n % validation_every == 0  # every 10th line: the validation split
                    if line.strip() and (split == "all" or held_out == (split == "validation")):
                        self._add(line, f"{path}:{n}")
        if not self.examples:
            raise ValueError(f"PreferenceExamples: no usable record in {files} (skipped: {self.skips})")

    def _add(self, line: str, where: str) -> None:
        try:
            messages, responses, scores = parse_record(json.loads(line))
            prompt = chat_template.encode_prompt(self.vocab, messages)
        except (json.JSONDecodeError, chat_template.ChatFormatError, TypeError, AttributeError) as e:
            self.skips.add(f"bad record ({type(e).__name__})", where)
            return
        if any(not isinstance(r, str) or not r.strip() for r in responses):
            return self.skips.add("empty response", where)
        if len(set(r.strip() for r in responses)) < len(responses):
            return self.skips.add("identical responses", where)
        if len(responses) < 2 and scores is None:
            return self.skips.add("fewer than 2 responses", where)
        if len(responses) > self.max_responses:
            return self.skips.add(f"more than max_responses={self.max_responses}", where)
        if len(prompt) > self.max_prompt_len:
            return self.skips.add(f"prompt longer than {self.max_prompt_len} tokens", where)
        replies = []
        for r in responses:
            ids = chat_template._encode_text(self.vocab, r) + [self.vocab.im_end_id, self.vocab.eos_id]
            if len(ids) > self.max_response_len:
                ids, self.truncated = ids[:self.max_response_len], self.truncated + 1
            replies.append(ids)
        self.examples.append({"prompt": prompt, "responses": replies, "scores": scores})

    def __len__(self) -> int:
        return len(self.examples)

    def report(self) -> str:
        return (f"{len(self.examples)} preference lists, {self.skips.total} records skipped, "
                f"{self.truncated} responses truncated" + (f"\n{self.skips.report()}" if self.skips.total else ""))


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def collate(examples: Sequence[dict], *, encoder_decoder: bool, prompt_len: int, response_len: int,
            num_responses: int) -> dict[str, np.ndarray]:
    """Batch features of rl/reward_model.py and rl/dpo.py for a list of examples.

    Decoder: decoder_input_tokens [b, K, prompt_len + response_len] (prompt + response, the RM's
    rows), lm_input_tokens / lm_target_tokens / lm_loss_weights [b, K, len] (BOS-shifted rows with
    weights on the response, for log-probabilities). T5: encoder_input_tokens [b, prompt_len],
    decoder_input_tokens [b, K, 1 + response_len] (BOS + response, the RM's rows), and the lm_*
    features [b, K, response_len]. Plus response_valid and score_labels [b, K].
    """
    b, k = len(examples), num_responses
    total = response_len + (1 if encoder_decoder else prompt_len)
    lm_len = response_len if encoder_decoder else prompt_len + response_len
    rm = np.zeros((b, k, total), np.int32)
    lm_in, lm_tgt = np.zeros((b, k, lm_len), np.int32), np.zeros((b, k, lm_len), np.int32)
    lm_w = np.zeros((b, k, lm_len), np.float32)
    valid, labels = np.zeros((b, k), np.float32), np.zeros((b, k), np.float32)
    for i, ex in enumerate(examples):
        prompt = ex["prompt"]
        for j, resp in enumerate(ex["responses"][:k]):
            valid[i, j] = 1.0
            if ex["scores"] is not None:
                labels[i, j] = ex["scores"][j]
            seq = [0] + resp if encoder_decoder else prompt + resp
            rm[i, j, :len(seq)] = seq
            if encoder_decoder:
                tgt, weights = resp, [1.0] * len(resp)
            else:
                tgt, weights = prompt + resp, [0.0] * len(prompt) + [1.0] * len(resp)
            lm_tgt[i, j, :len(tgt)] = tgt
            lm_in[i, j, 1:len(tgt)] = tgt[:-1]
            lm_w[i, j, :len(tgt)] = weights
    out = {"decoder_input_tokens": rm, "lm_input_tokens": lm_in, "lm_target_tokens": lm_tgt,
           "lm_loss_weights": lm_w, "response_valid": valid, "score_labels": labels}
    if encoder_decoder:
        out["encoder_input_tokens"] = _pad([ex["prompt"] for ex in examples], prompt_len)
    return out


def _shard(examples: PreferenceExamples, batch_size: int, index: int, count: int) -> np.ndarray:
    idx = np.arange(len(examples))[index::count]
    if len(idx) < batch_size:
        raise ValueError(f"preference data: {len(idx)} usable examples in this shard, fewer than "
                         f"the batch size {batch_size} ({examples.report()})")
    return idx


@gin.configurable
def make_preference_iterator(*, examples: PreferenceExamples = gin.REQUIRED, batch_size: int,
                             seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                             encoder_decoder: bool = False, num_responses: int = 2,
                             shuffle: bool = True, num_epochs: int | None = None
                             ) -> Iterator[dict[str, np.ndarray]]:
    """Trainer-style factory (train.train_data): endless (or `num_epochs`) shuffled batches of this
    process's shard, lengths fixed by the examples' max_prompt_len / max_response_len."""
    idx = _shard(examples, batch_size, shard_index, shard_count)
    rng = np.random.default_rng(seed)
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        order = rng.permutation(idx) if shuffle else idx
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples.examples[i] for i in order[s:s + batch_size]],
                          encoder_decoder=encoder_decoder, prompt_len=examples.max_prompt_len,
                          response_len=examples.max_response_len, num_responses=num_responses)
        epoch += 1


@gin.configurable
def make_prompt_iterator(*, examples: PreferenceExamples = gin.REQUIRED, batch_size: int,
                         seed: int = 0, shard_index: int = 0, shard_count: int = 1
                         ) -> Iterator[dict[str, np.ndarray]]:
    """PPO prompts {"prompt_tokens": [batch, max_prompt_len]} (right-padded; PPO left-aligns)."""
    idx = _shard(examples, batch_size, shard_index, shard_count)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(idx)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield {"prompt_tokens": _pad([examples.examples[i]["prompt"] for i in order[s:s + batch_size]],
                                         examples.max_prompt_len)}
