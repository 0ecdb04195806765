"""The one chat format shared by SFT, reward modelling, PPO, evaluation and the chat CLI.

A dialogue is a list of messages `{"role": "system"|"user"|"assistant", "content": str}` (an optional
system message first). Each turn is rendered ChatML-style with the tokenizer's chat tokens:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a generation prompt is the open header `<|im_start|>assistant\\n`; a reply ends at `<|im_end|>`.

Tokens are built turn by turn so that a turn's ids never depend on what precedes it (SentencePiece's
dummy-prefix `▁` would otherwise depend on the position); `decode(tokens)` gives back `render(...)`
exactly. Text holding a literal chat token is rejected (`ChatFormatError`): it would forge turns.

- Decoder (causal LM): `encode_dialogue` -> (tokens, loss_weights), 1 on assistant content + its
  `<|im_end|>`; `encode_prompt` -> the history plus the generation prompt.
- Encoder-decoder, or a decoder trained on (prompt, reply): `encode_example` -> (inputs, targets) with
  the history as inputs and the last assistant reply (+ `<|im_end|>`, + EOS) as targets.
Histories that are too long are truncated from the left at turn boundaries (a system message is kept).

Pure Python over the TF-free `zhchat.tasks.vocabulary.Vocabulary` (any object with `encode`,
`im_start_id`, `im_end_id`, `eos_id` works).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
Message = Mapping[str, str]


class ChatFormatError(ValueError):
    """A dialogue that the chat format cannot represent (bad role/content/order, or too long)."""


def validate(messages: Sequence[Message], *, require_final_assistant: bool = False) -> None:
    """Raises ChatFormatError unless `messages` is [system?] then user/assistant turns."""
    if not messages:
        raise ChatFormatError("empty dialogue")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise ChatFormatError(f"message {i}: role must be one of {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i}: content must be a string, got "
                                  f"{type(m.get('content')).__name__}")
        if IM_START in m["content"] or IM_END in m["content"]:
            raise ChatFormatError(f"message {i}: content contains a chat token")
        if m["role"] == "system" and i != 0:
            raise ChatFormatError(f"message {i}: a system message may only come first")
    if require_final_assistant and messages[-1]["role"] != "assistant":
        raise ChatFormatError("the dialogue must end with an assistant message")


def render_turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def generation_prompt() -> str:
    return f"{IM_START}assistant\n"


def render(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    """The dialogue as text; with `add_generation_prompt` followed by the open assistant header."""
    validate(messages)
    text = "".join(render_turn(m["role"], m["content"]) for m in messages)
    return text + (generation_prompt() if add_generation_prompt else "")


# ---- tokens ------------------------------------------------------------------------------------
def _encode_text(vocab: Any, text: str) -> list[int]:
    """Ids of `text` as it tokenizes right after a chat token (no position-dependent dummy prefix)."""
    if not text:
        return []
    ids = vocab.encode(IM_END + text)
    return list(ids[ids.index(vocab.im_end_id) + 1:])


def _header(vocab: Any, role: str) -> list[int]:
    return [vocab.im_start_id] + _encode_text(vocab, role + "\n")


def turn_tokens(vocab: Any, role: str, content: str) -> tuple[list[int], list[int]]:
    """(ids, weights) of one rendered turn; weights are 1 on an assistant's content and im_end."""
    head, body, tail = _header(vocab, role), _encode_text(vocab, content), _encode_text(vocab, "\n")
    w = int(role == "assistant")
    return head + body + [vocab.im_end_id] + tail, [0] * len(head) + [w] * (len(body) + 1) + [0] * len(tail)


def prompt_tokens(vocab: Any) -> list[int]:
    """Ids of the generation prompt `<|im_start|>assistant\\n`."""
    return _header(vocab, "assistant")


def _truncate_left(turns: list[list[int]], has_system: bool, max_len: int | None, fixed: int,
                   keep_last: int = 1) -> int:
    """Index of the first non-system turn kept so that system + kept turns + `fixed` fit `max_len`."""
    first = int(has_system)
    if max_len is None:
        return first
    system = len(turns[0]) if has_system else 0
    total = system + sum(len(t) for t in turns[first:]) + fixed
    while total > max_len and first < len(turns) - keep_last:
        total -= len(turns[first])
        first += 1
    if total > max_len:
        raise ChatFormatError(f"the last turn alone needs {total} tokens, more than max_len={max_len}")
    return first


def encode_dialogue(vocab: Any, messages: Sequence[Message], max_len: int | None = None, *,
                    loss_on: str = "all") -> tuple[list[int], list[int]]:
    """(tokens, loss_weights) of the rendered dialogue for a causal decoder.

    Weights are 1 on assistant content and its `<|im_end|>` (the trailing newline after it is
    weighted 0): on every assistant turn (`loss_on="all"`) or only the last one (`"last"`). Turns
    are dropped from the left (after a system message) until the tokens fit `max_len`.
    """
    if loss_on not in ("all", "last"):
        raise ValueError(f"loss_on must be 'all' or 'last', got {loss_on!r}")
    validate(messages)
    encoded = [turn_tokens(vocab, m["role"], m["content"]) for m in messages]
    has_system = messages[0]["role"] == "system"
    first = _truncate_left([ids for ids, _ in encoded], has_system, max_len, 0)
    kept = (encoded[:1] if has_system else []) + encoded[first:]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    tokens, weights = [], []
    for i, (ids, w) in zip(([0] if has_system else []) + list(range(first, len(messages))), kept):
        tokens += ids
        weights += w if loss_on == "all" or i == last_assistant else [0] * len(w)
    return tokens, weights


def encode_prompt(vocab: Any, messages: Sequence[Message], max_len: int | None = None) -> list[int]:
    """History + generation prompt (for sampling the next assistant reply), left-truncated at turn
    boundaries to fit `max_len`."""
    validate(messages)
    turns = [turn_tokens(vocab, m["role"], m["content"])[0] for m in messages]
    has_system = messages[0]["role"] == "system"
    gen = prompt_tokens(vocab)
    first = _truncate_left(turns, has_system, max_len, len(gen))
    kept = (turns[:1] if has_system else []) + turns[first:]
    return [t for ids in kept for t in ids] + gen


def encode_example(vocab: Any, messages: Sequence[Message], *, max_inputs: int | None = None,
                   max_targets: int | None = None, add_eos: bool = True
                   ) -> tuple[list[int], list[int], bool]:
    """(inputs, targets, truncated) for the last assistant reply of `messages`.

    inputs = history + generation prompt (left-truncated at turn boundaries to `max_inputs`);
    targets = reply + `<|im_end|>` (+ EOS), cut to `max_targets` (then without im_end/EOS, and
    `truncated` is True, so a cut reply never teaches the model to stop early).
    """
    validate(messages, require_final_assistant=True)
    history, reply = messages[:-1], messages[-1]["content"]
    if not any(m["role"] == "user" for m in history):
        raise ChatFormatError("an assistant reply needs a preceding user or system message")
    inputs = encode_prompt(vocab, history, max_inputs)
    targets = _encode_text(vocab, reply) + [vocab.im_end_id] + ([vocab.eos_id] if add_eos else [])
    truncated = max_targets is not None and len(targets) > max_targets
    if truncated:
        targets = targets[:max_targets]
    return inputs, targets, truncated


def expand_turns(messages: Sequence[Message]) -> list[list[Message]]:
    """One dialogue per assistant turn: the history up to and including that reply (ChatYuan)."""
    validate(messages)
    return [list(messages[:i + 1]) for i, m in enumerate(messages)
            if m["role"] == "assistant" and i > 0]


def reply_text(text: str) -> str:
    """A generated reply up to its `<|im_end|>` (or the end), without surrounding whitespace."""
    return text.split(IM_END, 1)[0].strip()


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system"}


def from_sharegpt(turns: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """ShareGPT `[{"from": "human"|"gpt"|..., "value": ...}]` -> messages (ChatFormatError if odd)."""
    out = []
    for i, t in enumerate(turns):
        speaker = t.get("from") if isinstance(t, Mapping) else None
        if speaker not in _SHAREGPT_ROLES:
            raise ChatFormatError(f"turn {i}: unknown speaker {speaker!r}")
        out.append({"role": _SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return out
