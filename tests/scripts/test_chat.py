"""The chat CLI on a tiny, briefly trained decoder checkpoint: a scripted two-turn conversation through
stdin, streaming equals the model's own greedy decoding, batch jsonl mode, and clear errors for a
checkpoint of another vocabulary size."""

import io
import json
import pathlib

import gin
import jax
import numpy as np
import pytest

from zhchat.scripts import chat
from zhchat.tasks import chat_template as ct

REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB_SIZE = 3200  # 3000 pieces + 100 sentinels, padded


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_data_dir):
    """(run_dir, spm path): tiny decoder trained 3 steps on synthetic data, checkpoint + config.gin."""
    from zhchat.tasks import tokenizer
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import train
    out = tmp_path_factory.mktemp("chat_run")
    tokenizer.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                          model_prefix=str(out / "spm"), vocab_size=3000, model_type="bpe",
                          character_coverage=0.98, input_sentence_size=6000, seed=0,
                          progress=False)
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin", "runs/synthetic_data.gin"], [
        f"VOCAB_SIZE = {VOCAB_SIZE}", f"RUN_DIR = '{out / 'run'}'", "NUM_STEPS = 3",
        "BATCH_SIZE = 2", "SEQ_LEN = 32", "train.progress_bar = False", "train.eval_every = 0",
        "DecoderConfig.max_len = 128",
        "Partitioner.num_devices = 1", "Partitioner.mesh_shape = (1, 1, 1)"])
    try:
        train.train()
    finally:
        gin.clear_config()
    return out / "run", out / "spm.model"


def run_chat(args, stdin_text=""):
    stdout = io.StringIO()
    try:
        rc = chat.main(args, stdin=io.StringIO(stdin_text), stdout=stdout)
    finally:
        gin.clear_config()
    return rc, stdout.getvalue()


def test_scripted_two_turn_conversation(run):
    run_dir, spm = run
    rc, out = run_chat([f"--run_dir={run_dir}", f"--vocab={spm}", "--temperature=0",
                        "--max_new_tokens=6", "--system=你是助手。"],
                       "你好！\n长城有多长？\n/reset\n再见\n/quit\n")
    assert rc == 0, out
    assert out.count("助手> ") == 3 and "(history cleared)" in out
    assert out.count("用户> ") == 5  # one prompt per input line, the last answered by /quit


def test_stream_equals_greedy_decoding_and_history_grows(run):
    import jax.numpy as jnp

    from zhchat.tasks.vocabulary import Vocabulary
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import checkpoints, partitioning
    run_dir, spm = run
    gin_cli.parse_gin([str(run_dir / "config.gin")], [])
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    params, _ = checkpoints.restore_params(str(run_dir / "checkpoints"), model,
                                           partitioning.Partitioner(num_devices=1),
                                           jax.random.key(0))
    vocab = Vocabulary(str(spm))
    session = chat.ChatSession(model, params, vocab, max_new_tokens=12, temperature=0.0)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "今天天气怎么样？"}]
    streamed = list(session.stream(messages))
    prompt = ct.encode_prompt(vocab, messages)
    reference = np.asarray(model.predict_batch(
        params, {"decoder_input_tokens": jnp.asarray([prompt], jnp.int32)}, jax.random.key(0),
        max_decode_length=12))[0].tolist()
    stops = [i for i, t in enumerate(reference) if t in (vocab.im_end_id, vocab.eos_id)]
    assert streamed == reference[:stops[0] if stops else 12]
    # a history longer than the context is cut from the left at turn boundaries, not refused
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "很长的历史。" * 5}
            for i in range(20)] + [{"role": "user", "content": "最后一问"}]
    assert len(session._prompt(long)) <= session.max_context - session.max_new_tokens
    assert isinstance(session.reply(long), str)


def test_batch_mode(run, tmp_path):
    run_dir, spm = run
    lines = [json.dumps({"id": "a", "prompt": "介绍一下北京。"}, ensure_ascii=False),
             json.dumps({"messages": [{"role": "user", "content": "一"},
                                      {"role": "assistant", "content": "二"},
                                      {"role": "user", "content": "三"}]}, ensure_ascii=False),
             "{not json", json.dumps({"messages": [{"role": "robot", "content": "x"}]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, _ = run_chat([f"--run_dir={run_dir}", f"--vocab={spm}", "--max_new_tokens=5",
                      f"--batch_input={tmp_path / 'in.jsonl'}",
                      f"--batch_output={tmp_path / 'out.jsonl'}"])
    assert rc == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["id"] for o in out] == ["a", 2] and all(isinstance(o["reply"], str) for o in out)
    assert out[1]["messages"][-1] == {"role": "user", "content": "三"}


def test_checkpoint_of_another_vocabulary_fails_clearly(run, capsys):
    run_dir, spm = run
    rc, _ = run_chat([f"--run_dir={run_dir}", f"--vocab={spm}", "--gin_file=models/decoder_tiny.gin",
                      "--gin.VOCAB_SIZE=256", "--gin.DecoderConfig.max_len=128"], "")
    assert rc == 2
    err = capsys.readouterr().err
    assert "vocabulary" in err and "does not match" in err
