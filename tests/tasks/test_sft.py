"""SFT tasks: malformed records counted and skipped, multi-turn expansion with histories, the real
Alpaca-zh folder (its broken file reported, the rest used), and the cached decoder batches: loss
weights on reply tokens only, no bidirectional prefix."""

import json

import numpy as np
import pytest

from zhchat.tasks import chat_template as ct
from zhchat.tasks import sft_sources, sources
from zhchat.tasks.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocab(spm_models):
    return Vocabulary(spm_models["bpe"])


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_bad")
    good = [{"instruction": "把这句话翻译成英文。", "input": "你好", "output": "Hello"},
            {"instruction": "三原色是什么？", "output": "红、绿、蓝。"}]  # no "input": fine
    bad = [{"instruction": "缺少输出"},
           {"instruction": "输入不是字符串", "input": 3, "output": "x"},
           {"instruction": "空输出", "input": "", "output": "  "},
           ["not", "an", "object"],
           {"instruction": 5, "output": "x"}]
    (d / "a.json").write_text(json.dumps(good + bad, ensure_ascii=False), encoding="utf-8")
    (d / "broken.json").write_text('[{"instruction": "a", "input": "", "output": "b"},]',
                                   encoding="utf-8")
    convs = [
        {"conversations": [{"from": "human", "value": "第一问"}, {"from": "gpt", "value": "第一答"},
                           {"from": "human", "value": "第二问"}, {"from": "gpt", "value": "第二答"},
                           {"from": "human", "value": "第三问"}, {"from": "gpt", "value": "第三答"}]},
        {"conversations": [{"from": "alien", "value": "?"}]},
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": 7}]},
        {"no_conversations": []},
    ]
    lines = [json.dumps(c, ensure_ascii=False) for c in convs] + ["{broken"]
    (d / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def test_malformed_alpaca_records_are_counted_and_skipped(bad_data):
    counter = sources.SkipCounter()
    got = list(sft_sources.iter_alpaca(str(bad_data / "*.json"), counter))
    assert [m[0]["content"] for _, m in got] == ["把这句话翻译成英文。\n你好", "三原色是什么？"]
    assert counter.as_dict() == {"broken_json_file": 1, "empty_output": 1, "missing_field:output": 1,
                                 "non_string_field:input": 1, "non_string_field:instruction": 1,
                                 "not_an_object": 1}
    assert "broken.json" in counter.report()


def test_sharegpt_three_turns_become_three_examples(bad_data, vocab):
    counter = sources.SkipCounter()
    dialogues = list(sft_sources.iter_sharegpt(str(bad_data / "chat.jsonl"), counter))
    assert counter.as_dict() == {"broken_json": 1, "missing_field:conversations": 1,
                                 "non_string_field:value": 1, "unknown_speaker": 1}
    examples = list(sft_sources.iter_turn_examples(iter(dialogues), vocab, max_inputs=256,
                                                   max_targets=64, counter=counter))
    assert counter.counts["empty_output"] == 1
    assert [e["targets_pretokenized"] for e in examples] == ["第一答", "第二答", "第三答"]
    msgs = dialogues[0][1]
    for k, e in enumerate(examples):
        history = msgs[:2 * k + 1]
        assert e["inputs_pretokenized"] == ct.render(history, add_generation_prompt=True)
        assert vocab.decode(e["inputs"]) == e["inputs_pretokenized"]
        assert e["targets"][-2:] == [vocab.im_end_id, vocab.eos_id]
    # a tight input budget drops the oldest turns, never cuts inside one
    short = list(sft_sources.iter_turn_examples(iter(dialogues[:1]), vocab, max_inputs=len(
        examples[0]["inputs"]) + 2, max_targets=64, counter=counter))
    assert vocab.decode(short[2]["inputs"]) == ct.render(msgs[4:5], add_generation_prompt=True)


@pytest.fixture(scope="module")
def sft_task(spm_models, repo_root, shared_data_dir):
    import gin

    from zhchat.tasks import lm
    names = lm.parse_gin(["tasks/sft.gin"], [f"VOCAB_PATH = '{spm_models['bpe']}'",
                                             "SFT_INPUTS_LENGTH = 96", "SFT_TARGETS_LENGTH = 64"])
    gin.clear_config()
    assert {"zh_sft_alpaca", "zh_sft_sharegpt"} <= set(names)
    return "zh_sft_alpaca"


def test_real_alpaca_broken_file_reported_rest_used(sft_task, caplog):
    from zhchat.tasks import sft
    with caplog.at_level("WARNING"):
        n = sum(1 for _ in sft.iter_examples(sft_task, "validation"))
    assert 200 < n < 800  # 2% of the ~17.4k usable records of the six valid files
    assert "broken_json_file: 1" in caplog.text and "9407-12345" in caplog.text


def test_prefix_lm_cache_weights_only_reply_and_causal_reader(sft_task, vocab, tmp_path):
    from zhchat.tasks import cache, sft_reader
    meta = cache.export_cache(task=sft_task, split="validation", output_dir=str(tmp_path),
                              feature_lengths={"inputs": 96, "targets": 64}, converter="prefix_lm",
                              max_examples=16, progress=False)
    assert "decoder_causal_attention" in meta["feature_order"]
    it = sft_reader.make_causal_cache_iterator(cache_dir=str(tmp_path), batch_size=4,
                                               shuffle=False, shard_index=0, shard_count=1)
    batch = next(it)
    assert "decoder_causal_attention" not in batch and "decoder_loss_weights" in batch
    state = it.get_state()
    assert np.array_equal(next(it)["decoder_input_tokens"], (it.set_state(state), next(it))[1][
        "decoder_input_tokens"])
    tokens, weights, segs = (batch[k] for k in ("decoder_target_tokens", "decoder_loss_weights",
                                                "decoder_segment_ids"))
    for row in range(tokens.shape[0]):
        for seg in set(segs[row][segs[row] > 0]):
            ids, w = tokens[row][segs[row] == seg], weights[row][segs[row] == seg]
            prompt, reply = ids[w == 0], ids[w == 1]
            assert vocab.decode(prompt).endswith("<|im_start|>assistant\n")
            assert vocab.im_start_id not in reply.tolist()
            if vocab.eos_id in reply.tolist():  # whole replies end <|im_end|> EOS; cut ones neither
                assert reply.tolist()[-2:] == [vocab.im_end_id, vocab.eos_id]
            assert w[:len(prompt)].sum() == 0 and w[len(prompt):].all()  # weights: one tail run
