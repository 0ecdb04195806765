"""Preference data on the shared pairs (research-only licence) with bad records counted and skipped,
batch layout, and the Zero-Chatgpt pair builder on a tiny random SFT decoder."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from rl_helpers import tiny_decoder
from zhchat.tasks import preference_reader
from zhchat.rl import pair_builder


@pytest.fixture(scope="module")
def vocab(tmp_path_factory, demo_data_dir):
    from zhchat.tasks import tokenizer as vocab_lib
    from zhchat.tasks.vocabulary import Vocabulary
    prefix = str(tmp_path_factory.mktemp("spm") / "bpe")
    vocab_lib.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                              model_prefix=prefix, vocab_size=3000, model_type="bpe",
                              character_coverage=0.98, input_sentence_size=6000, seed=0,
                              progress=False)
    return Vocabulary(prefix + ".model")


def test_shared_pairs_and_bad_records(vocab, shared_data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "你好", "chosen": "一样", "rejected": "一样"},
            {"prompt": "你好", "chosen": "", "rejected": "不"},
            {"prompt": "长" * 400, "chosen": "是", "rejected": "否"},
            {"prompt": "排序", "responses": ["好", "中", "差"]},
            {"prompt": "评分", "responses": ["好", "差"], "scores": [4.0, 1.0]}]
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{not json\n",
                   encoding="utf-8")
    ex = preference_reader.PreferenceExamples(
        files=[str(shared_data_dir / "preference" / "dpo_zh_500.jsonl"), str(bad)], vocab=vocab,
        max_prompt_len=128, max_response_len=64, max_responses=3)
    skips = ex.skips.as_dict()
    assert skips["identical responses"] == 1 and skips["empty response"] == 1
    assert skips["bad record (JSONDecodeError)"] == 1
    assert skips["prompt longer than 128 tokens"] >= 1   # the 400-character prompt, and long real ones
    assert len(ex) + ex.skips.total == 400 + 6 and len(ex) > 150 and ex.truncated > 0
    assert sum(len(e["responses"]) == 3 for e in ex.examples) == 1
    assert any(e["scores"] == [4.0, 1.0] for e in ex.examples)
    batch = next(preference_reader.make_preference_iterator(examples=ex, batch_size=4, num_responses=3))
    assert batch["decoder_input_tokens"].shape == (4, 3, 128 + 64)
    assert batch["lm_target_tokens"].shape == (4, 3, 192)
    for row, w, tgt, inp in zip(batch["decoder_input_tokens"][:, 0], batch["lm_loss_weights"][:, 0],
                                batch["lm_target_tokens"][:, 0], batch["lm_input_tokens"][:, 0]):
        n = int((row != 0).sum())
        np.testing.assert_array_equal(tgt[:n], row[:n])
        np.testing.assert_array_equal(inp[1:n], row[:n - 1])
        assert w[n - 1] == 1 and w[0] == 0 and w[n:].sum() == 0
    t5 = preference_reader.collate(ex.examples[:2], encoder_decoder=True, prompt_len=128,
                                 response_len=64, num_responses=2)
    assert t5["encoder_input_tokens"].shape == (2, 128) and t5["decoder_input_tokens"][0, 0, 0] == 0


def test_pair_builder_writes_gold_vs_generated(vocab, tmp_path):
    model = tiny_decoder(vocab=vocab.vocab_size, layers=1)
    params = nn.unbox(model.init_params(jax.random.key(0), {"decoder_input_tokens": (1, 8)}))
    dialogues = [(f"d{i}", [{"role": "user", "content": f"问题{i}"},
                            {"role": "assistant", "content": f"回答{i}"}]) for i in range(5)]
    dialogues.append(("long", [{"role": "user", "content": "长" * 200},
                               {"role": "assistant", "content": "好"}]))
    dialogues.append(("odd", [{"role": "assistant", "content": "无"}]))
    out = pair_builder.build_pairs(model=model, params=params, vocab=vocab, dialogues=dialogues,
                                   output_path=str(tmp_path / "pairs.jsonl"), batch_size=4,
                                   max_prompt_len=32, max_decode_length=12, temperature=1.0)
    assert out["skipped"]["prompt longer than 32 tokens"] == 1
    assert sum(out["skipped"].values()) + out["pairs"] == 7
    lines = [json.loads(x) for x in open(tmp_path / "pairs.jsonl", encoding="utf-8")]
    assert len(lines) == out["pairs"] and all(x["chosen"] != x["rejected"] for x in lines)
    assert {x["id"] for x in lines} <= {f"d{i}" for i in range(5)}
    if lines:  # the builder's output is valid preference data
        ex = preference_reader.PreferenceExamples(files=str(tmp_path / "pairs.jsonl"), vocab=vocab,
                                                max_prompt_len=32, max_response_len=16)
        assert len(ex) == len(lines)
