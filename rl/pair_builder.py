"""Zero-Chatgpt's preference pairs: for each SFT dialogue, chosen = the gold reply, rejected = the
SFT model's own reply to the same history, written as jsonl that tasks/preference_reader.py reads:
{"id", "prompt": [messages], "chosen": str, "rejected": str}.

Generation batches prompts through the wrapper's jitted KV-cache sampler (decoder: left-padded
chat prompts; T5: encoder inputs). Counted and skipped (never silent): dialogues whose prompt is
longer than `max_prompt_len` tokens, generated replies that are empty or equal the gold one, and
dialogues the chat format rejects.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import gin
import jax
import numpy as np

from zhchat.rl import layouts, rollout
from zhchat.tasks import chat_template
from zhchat.tasks.sources import SkipCounter


@gin.configurable
def build_pairs(*, model: Any = gin.REQUIRED, params: Any = gin.REQUIRED, vocab: Any = gin.REQUIRED,
                dialogues: Iterable[tuple[str, list[dict]]] = gin.REQUIRED,
                output_path: str = gin.REQUIRED, batch_size: int = 16, max_prompt_len: int = 256,
                max_decode_length: int = 256, temperature: float = 0.7, top_p: float = 0.9,
                max_pairs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Writes pairs for `dialogues` ((id, messages ending with an assistant reply), e.g.
    tasks/sft_sources.iter_alpaca / iter_sharegpt); returns {"pairs", "skipped": {reason: n}}."""
    layout = layouts.layout_for(model)
    limit = layout.context_limit(model.config)  # a decoder's positions; a T5 has no limit
    if limit is not None and max_prompt_len + max_decode_length > limit:
        raise ValueError(f"max_prompt_len {max_prompt_len} + max_decode_length "
                         f"{max_decode_length} exceeds the model's max_len {limit}")
    skips, written = SkipCounter(), 0
    pending: list[tuple[str, list[dict], str, list[int]]] = []
    rng = jax.random.key(seed)

    def flush(out) -> int:
        nonlocal rng
        if not pending:
            return 0
        rows = np.zeros((batch_size, max_prompt_len), np.int32)
        for i, (_, _, _, ids) in enumerate(pending):
            rows[i, :len(ids)] = ids
        rows[len(pending):, 0] = vocab.eos_id  # filler rows need one real token
        rng, key = jax.random.split(rng)
        prompts = np.asarray(layout.sampling_prompts(rows, model.pad_id))
        out_ids = np.asarray(rollout.generate(model, params, prompts, key,
                                              max_decode_length=max_decode_length,
                                              temperature=temperature, top_p=top_p))
        n = 0
        for (dlg_id, history, gold, _), ids in zip(pending, out_ids):
            reply = chat_template.reply_text(vocab.decode(ids.tolist()))
            if not reply:
                skips.add("empty generated reply", dlg_id)
            elif reply == gold.strip():
                skips.add("generated reply equals the gold one", dlg_id)
            else:
                out.write(json.dumps({"id": dlg_id, "prompt": history, "chosen": gold,
                                      "rejected": reply}, ensure_ascii=False) + "\n")
                n += 1
        pending.clear()
        return n

    with open(output_path, "w", encoding="utf-8") as out:
        for dlg_id, messages in dialogues:
            if max_pairs is not None and written + len(pending) >= max_pairs:
                break
            try:
                chat_template.validate(messages, require_final_assistant=True)
                history, gold = list(messages[:-1]), messages[-1]["content"]
                ids = chat_template.encode_prompt(vocab, history)
            except chat_template.ChatFormatError as e:
                skips.add(f"bad dialogue ({e})"[:60], dlg_id)
                continue
            if not gold.strip():
                skips.add("empty gold reply", dlg_id)
                continue
            if len(ids) > max_prompt_len:
                skips.add(f"prompt longer than {max_prompt_len} tokens", dlg_id)
                continue
            pending.append((dlg_id, history, gold, ids))
            if len(pending) == batch_size:
                written += flush(out)
        written += flush(out)
    return {"pairs": written, "skipped": skips.as_dict(), "report": skips.report()}
