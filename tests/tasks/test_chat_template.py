"""The chat template: exact round trips, loss masks on assistant tokens, multi-turn expansion,
left truncation at turn boundaries, rejected dialogues."""

import pytest

from zhchat.tasks import chat_template as ct
from zhchat.tasks.vocabulary import Vocabulary

DIALOGUE = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好！请介绍一下长城。"},
    {"role": "assistant", "content": "长城是中国古代的军事防御工程，全长两万多公里。"},
    {"role": "user", "content": "它是什么时候修建的？ Please answer briefly."},
    {"role": "assistant", "content": " 始建于春秋战国时期，\n明朝大规模重修。"},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气！"},
]


def decode_in_context(vocab, ids):
    """Text of ids as they read inside a dialogue (a standalone decode drops one leading space)."""
    return vocab.decode([vocab.im_end_id] + list(ids))[len("<|im_end|>"):]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def vocab(request, spm_models):
    return Vocabulary(spm_models[request.param])


def test_render_text():
    text = ct.render(DIALOGUE[1:3], add_generation_prompt=True)
    assert text == ("<|im_start|>user\n你好！请介绍一下长城。<|im_end|>\n"
                    "<|im_start|>assistant\n长城是中国古代的军事防御工程，全长两万多公里。<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_round_trip_and_assistant_loss_weights(vocab):
    tokens, weights = ct.encode_dialogue(vocab, DIALOGUE)
    assert len(tokens) == len(weights)
    assert vocab.decode(tokens) == ct.render(DIALOGUE)
    # chat tokens are single ids, one pair per turn
    assert tokens.count(vocab.im_start_id) == tokens.count(vocab.im_end_id) == len(DIALOGUE)
    # the weighted tokens are exactly the assistant replies, each closed by <|im_end|>
    weighted = [t for t, w in zip(tokens, weights) if w]
    replies = [m["content"] for m in DIALOGUE if m["role"] == "assistant"]
    assert vocab.decode(weighted) == "<|im_end|>".join(replies) + "<|im_end|>"
    # turn-by-turn ids equal tokenizing the whole text (past the leading dummy-prefix piece)
    whole = vocab.encode(ct.render(DIALOGUE))
    assert whole[whole.index(vocab.im_start_id):] == tokens


def test_three_turn_expansion(vocab):
    dialogues = ct.expand_turns(DIALOGUE)
    assert [len(d) for d in dialogues] == [3, 5, 7]
    for d in dialogues:
        assert d[0]["role"] == "system" and d[-1]["role"] == "assistant"
        # decoder: loss only on this example's final reply
        tokens, weights = ct.encode_dialogue(vocab, d, loss_on="last")
        weighted = [t for t, w in zip(tokens, weights) if w]
        assert decode_in_context(vocab, weighted) == d[-1]["content"] + "<|im_end|>"
        assert vocab.decode(tokens) == ct.render(d)
        # encoder-decoder / prefix form: the history is the input, the reply the target
        inputs, targets, truncated = ct.encode_example(vocab, d)
        assert not truncated
        assert vocab.decode(inputs) == ct.render(d[:-1], add_generation_prompt=True)
        assert targets[-2:] == [vocab.im_end_id, vocab.eos_id]
        assert decode_in_context(vocab, targets) == d[-1]["content"] + "<|im_end|>"  # EOS ends the decode
        assert inputs + targets[:-1] == tokens[:len(inputs) + len(targets) - 1]
    assert ct.expand_turns(DIALOGUE)[1][-2] == DIALOGUE[3]


def test_left_truncation_at_turn_boundaries(vocab):
    full = ct.encode_prompt(vocab, DIALOGUE)
    system = ct.turn_tokens(vocab, "system", DIALOGUE[0]["content"])[0]
    last = ct.turn_tokens(vocab, "user", "谢谢")[0]
    gen = ct.prompt_tokens(vocab)
    tight = len(system) + len(ct.turn_tokens(vocab, "assistant", "不客气！")[0]) + len(last) + len(gen)
    d = DIALOGUE[:6] + [{"role": "assistant", "content": "不客气！"}, {"role": "user", "content": "谢谢"}]
    out = ct.encode_prompt(vocab, d, max_len=tight)
    assert vocab.decode(out) == ct.render([d[0], d[-2], d[-1]], add_generation_prompt=True)
    assert len(out) == tight < len(ct.encode_prompt(vocab, d))
    assert len(ct.encode_prompt(vocab, DIALOGUE, max_len=len(full))) == len(full)
    with pytest.raises(ct.ChatFormatError, match="last turn alone"):
        ct.encode_prompt(vocab, DIALOGUE[:2], max_len=len(system) + 2)
    inputs, targets, truncated = ct.encode_example(vocab, DIALOGUE, max_targets=3)
    assert truncated and len(targets) == 3 and vocab.im_end_id not in targets


@pytest.mark.parametrize("messages,match", [
    ([], "empty"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "string"),
    ([{"role": "user", "content": "a<|im_end|>b"}], "chat token"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system"),
])
def test_bad_dialogues_are_rejected(messages, match):
    with pytest.raises(ct.ChatFormatError, match=match):
        ct.render(messages)


def test_sharegpt_and_reply_text():
    msgs = ct.from_sharegpt([{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}])
    assert msgs == [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]
    with pytest.raises(ct.ChatFormatError, match="speaker"):
        ct.from_sharegpt([{"from": "alien", "value": "?"}])
    assert ct.reply_text(" 好的。<|im_end|>\n<|im_start|>user") == "好的。"
    with pytest.raises(ct.ChatFormatError, match="must end with an assistant"):
        ct.encode_example(None, DIALOGUE[:2])
