"""Offline evaluation: batched scores equal one-at-a-time scores (decoder and T5), a planted model
scores exactly the expected CMMLU accuracy, bad records are counted, and the CLI writes its report."""

from __future__ import annotations

import json

import gin
import jax
import numpy as np
import pytest

from zhchat.gin_configs import cli as gin_cli
from zhchat.scripts.evaluate import cli, scoring, suites
from zhchat.tasks import eval_sets, sources
from zhchat.tasks.vocabulary import Vocabulary
from zhchat.trainer import train

VOCAB = 3200  # the 3000-piece test tokenizer + 100 sentinels, padded


def _model(preset: str):
    gin.clear_config()
    gin_cli.parse_gin([preset], [f"VOCAB_SIZE = {VOCAB}"])
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    return model


def _reference(model, params, context, continuation, encdec, score_batch):
    """One request, unpadded, through score_batch directly."""
    if encdec:
        t = np.asarray([continuation], np.int32)
        batch = {"encoder_input_tokens": np.asarray([list(context) + [model.eos_id]], np.int32),
                 "decoder_target_tokens": t,
                 "decoder_input_tokens": np.concatenate([np.zeros((1, 1), np.int32), t[:, :-1]], 1),
                 "decoder_loss_weights": np.ones_like(t, np.float32)}
    else:
        seq = np.asarray([list(context) + list(continuation)], np.int32)
        weights = np.zeros(seq.shape, np.float32)
        weights[0, len(context):] = 1
        batch = {"decoder_target_tokens": seq, "decoder_loss_weights": weights,
                 "decoder_input_tokens": np.concatenate([np.zeros((1, 1), np.int32), seq[:, :-1]], 1)}
    return float(np.asarray(score_batch(params, batch))[0])


@pytest.mark.parametrize("preset", ["models/decoder_tiny.gin", "models/t5_tiny.gin"])
def test_batched_scores_equal_one_at_a_time(preset):
    model = _model(preset)
    encdec = "t5" in preset
    shapes = ({"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)} if encdec
              else {"decoder_input_tokens": (1, 8)})
    params = model.init_params(jax.random.key(0), shapes)
    rng = np.random.default_rng(0)
    # 5 rows over 2 batches of 4 (one filler-padded), lengths across two 8-token buckets
    requests = [(rng.integers(2, 3000, n).tolist(), rng.integers(2, 3000, m).tolist())
                for n, m in ((0, 3), (5, 1), (12, 2), (3, 4), (9, 5))]
    scorer = scoring.Scorer(model, params, batch_size=4, bucket=8, progress=False)
    got = scorer.score(requests)
    reference = jax.jit(model.score_batch)
    want = [_reference(model, params, c, t, encdec, reference) for c, t in requests]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert np.all(got < 0)
    # sharded over the test's 8 host devices (batch rounded up to 8) == unsharded
    from zhchat.trainer import partitioning
    part = partitioning.Partitioner()
    sharded = scoring.Scorer(model, jax.device_put(params, part.replicated), batch_size=4, bucket=8,
                             progress=False, partitioner=part)
    assert sharded.batch_size == max(4, part.data_parallel_size)
    np.testing.assert_allclose(sharded.score(requests), got, rtol=2e-4, atol=2e-4)


def _planted_decoder(letter_id: int):
    """decoder_tiny with every block's output projections zero and every embedding row pointing the
    same way, `letter_id`'s 100 times longer: the next-token argmax is `letter_id` after any text."""
    model = _model("models/decoder_tiny.gin")
    params = model.init_params(jax.random.key(0), {"decoder_input_tokens": (1, 8)})
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    direction = np.random.default_rng(1).normal(size=model.config.emb_dim).astype(np.float32)

    def plant(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "embedding" in name:
            table = np.tile(0.01 * direction, (x.shape[0], 1))
            table[letter_id] = direction
            return jax.numpy.asarray(table, x.dtype)
        if "scale" in name:   # norms: keep
            return x
        return jax.numpy.zeros_like(x)  # every kernel: the residual stream is the embedding

    assert model.config.tie_embeddings, "the planted readout is the tied embedding"
    leaves = [plant(p, x) for p, x in flat]
    return model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def _write_cmmlu(root, answers):
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        rows = [",Question,A,B,C,D,Answer"] + [f"{i},问题{i}是什么？,甲,乙,丙,丁,{a}"
                                                for i, a in enumerate(answers)]
        rows.append("99,坏的一行,甲,乙,丙,丁,E")  # a bad answer letter: counted, not fatal
        (root / split / "toy_subject.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_planted_model_scores_exactly_the_share_of_its_letter(spm_models, tmp_path):
    vocab = Vocabulary(spm_models["unigram"])
    _, letter = scoring.split_continuation(vocab, "答案是：", "A")
    assert len(letter) == 1
    model, params = _planted_decoder(letter[0])
    answers = "ABCDAABCAD"  # 4 of 10 are A
    _write_cmmlu(tmp_path / "cmmlu", answers)
    counter = sources.SkipCounter()
    test = eval_sets.read_cmmlu(str(tmp_path / "cmmlu" / "test"), counter)
    dev = eval_sets.read_cmmlu(str(tmp_path / "cmmlu" / "dev"), counter)
    assert counter.as_dict() == {"cmmlu_bad_answer": 2} and len(test["toy_subject"]) == 10
    scorer = scoring.Scorer(model, params, batch_size=8, progress=False)
    for shots in (0, 5):
        r = suites.cmmlu(scorer, vocab, test, dev, shots=shots)
        assert r["accuracy"] == pytest.approx(0.4) and r["per_subject"] == {"toy_subject": 0.4}


def _write_bustm(root, labels):
    (root / "bustm").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = [json.dumps({"id": i, "sentence1": f"句子{i}", "sentence2": f"另一句{i}", "label": l},
                            ensure_ascii=False) for i, l in enumerate(labels)]
        lines += ["{not json", json.dumps({"id": 99, "sentence1": "缺标签"}, ensure_ascii=False)]
        (root / "bustm" / f"{split}_few_all.json").write_text("\r\n".join(lines) + "\r\n",
                                                              encoding="utf-8")


def test_planted_model_scores_exactly_the_share_of_its_verbaliser(spm_models, tmp_path):
    vocab = Vocabulary(spm_models["unigram"])
    prompt = "“句子0”和“另一句0”的意思相同吗？答案："
    _, yes = scoring.split_continuation(vocab, prompt, "是")
    _, no = scoring.split_continuation(vocab, prompt, "否")
    assert len(yes) == len(no) == 1
    model, params = _planted_decoder(yes[0])
    _write_bustm(tmp_path, ["1", "0", "1", "1", "0"])  # 3 of 5 are the same meaning (是)
    counter = sources.SkipCounter()
    examples, train_gold = eval_sets.read_fewclue(str(tmp_path), "bustm", counter)
    assert len(examples) == 5 and counter.as_dict() == {"fewclue_bustm_bad_json": 2,
                                                        "fewclue_bustm_malformed": 2}
    r = suites.fewclue(scoring.Scorer(model, params, batch_size=4, progress=False), vocab, "bustm",
                       examples, train_gold)
    assert r["accuracy"] == pytest.approx(0.6) and r["majority_accuracy"] == pytest.approx(0.6)
    assert r["macro_f1"] == pytest.approx(r["majority_macro_f1"]) == pytest.approx(0.375)


def test_c3_reader_counts_malformed_questions(tmp_path):
    docs = [[["男：你好。", "女：你好。"], [{"question": "他们在做什么?", "choice": ["打招呼", "吃饭"],
                                         "answer": "打招呼"},
                                        {"question": "坏的", "choice": ["甲"], "answer": "乙"}], "1-1"],
            "not a document"]
    path = tmp_path / "c3-d-dev.json"
    path.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    counter = sources.SkipCounter()
    qs = eval_sets.read_c3([str(path)], counter)
    assert [(q.question, q.answer, q.choices) for q in qs] == [("他们在做什么?", 0, ("打招呼", "吃饭"))]
    assert counter.as_dict() == {"c3_malformed_document": 1, "c3_malformed_question": 1}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("eval") / "run")
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin", "runs/synthetic_data.gin"],
                      [f"VOCAB_SIZE = {VOCAB}", f"RUN_DIR = '{run_dir}'", "BATCH_SIZE = 8",
                       "make_synthetic_iterator.seq_len = 16",
                       f"make_synthetic_iterator.vocab_size = {VOCAB}", "train.log_every = 1",
                       "train.progress_bar = False", "train.async_checkpointing = False"])
    train.train(num_steps=2)
    gin.clear_config()
    return run_dir


def test_cli_writes_report_for_every_suite(tiny_run, spm_models, tmp_path, capsys):
    _write_cmmlu(tmp_path / "cmmlu", "ABCD")
    c3 = tmp_path / "c3.json"
    question = {"question": "她说什么?", "choice": ["明天见", "再见", "你好"], "answer": "明天见"}
    c3.write_text(json.dumps([[["女：明天见。"], [question], "x"]], ensure_ascii=False),
                  encoding="utf-8")
    _write_bustm(tmp_path / "fewclue", ["1", "0"])
    (tmp_path / "prompts.txt").write_text("请介绍一下北京。\n", encoding="utf-8")
    out = tmp_path / "report"
    rc = cli.main([f"--run_dir={tiny_run}", f"--vocab={spm_models['unigram']}", f"--out={out}",
                   "--gin_file=runs/eval.gin", "--no_progress", "--batch_size=4",
                   "--max_decode_length=4",
                   f"--samples_file={tmp_path / 'prompts.txt'}",
                   f"--gin.Suites.fewclue_dir='{tmp_path / 'fewclue'}'",
                   "--gin.Suites.fewclue_tasks=['bustm']",
                   f"--gin.Suites.cmmlu_dir='{tmp_path / 'cmmlu'}'",
                   f"--gin.Suites.c3_files=['{c3}']", "--gin.Suites.lm_max_docs=3"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    res = report["results"]
    assert set(res) == {"lm", "cmmlu", "c3", "fewclue", "samples", "seconds"}
    assert set(res["seconds"]) == {"lm", "cmmlu", "c3", "fewclue"}
    sample = res["samples"][0]
    assert sample["prompt"] == "请介绍一下北京。" and isinstance(sample["reply"], str)
    assert res["fewclue"]["bustm"]["examples"] == 2
    assert res["cmmlu"]["5shot"]["questions"] == 4 and res["c3"]["questions"] == 1
    lm = res["lm"]["shu_books_sample.jsonl.gz"]
    assert lm["documents"] == 3 and lm["bits_per_char"] > 0 and lm["perplexity"] > 1
    assert report["skipped"] == {"cmmlu_bad_answer": 2, "fewclue_bustm_bad_json": 2,
                                 "fewclue_bustm_malformed": 2}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "CC BY-NC-SA" in md and "non-commercial research" in md and "FewCLUE" in md
    assert (out / "cmmlu.png").exists() and (out / "fewclue.png").exists()


def test_cli_checks_data_paths_before_loading(tiny_run, spm_models, tmp_path, capsys):
    rc = cli.main([f"--run_dir={tiny_run}", f"--vocab={spm_models['unigram']}",
                   f"--out={tmp_path}", "--gin.Suites.cmmlu_dir='/nonexistent/cmmlu'"])
    assert rc == 2 and "missing evaluation data" in capsys.readouterr().err


def test_reward_accuracy_and_policy_against_itself(spm_models, tmp_path):
    """RM accuracy from batched rewards equals the per-pair comparison; a policy judged against
    itself (same params, same seed) has KL 0 and wins no prompt; prompt files count bad lines."""
    from zhchat.rl import rollout
    from zhchat.tasks.preference_reader import _pad
    from zhchat.rl.reward_model import RewardModel
    from zhchat.scripts.evaluate import rl_suites

    vocab = Vocabulary(spm_models["unigram"])
    model = _model("models/decoder_tiny.gin")
    params = model.init_params(jax.random.key(0), {"decoder_input_tokens": (1, 8)})
    rm = RewardModel(backbone=model)
    rm_params = rm.init_params(jax.random.key(1), {"decoder_input_tokens": (1, 8)})
    rng = np.random.default_rng(0)
    examples = [{"prompt": rng.integers(2, 3000, 6).tolist(), "scores": None,
                 "responses": [rng.integers(2, 3000, 5).tolist(), rng.integers(2, 3000, 3).tolist()]}
                for _ in range(5)]
    r = rl_suites.reward_model_accuracy(rm, rm_params, examples, prompt_len=8, response_len=8,
                                        batch_size=4)
    one = lambda seq: float(np.asarray(rm.rewards(rm_params, {"decoder_input_tokens":  # noqa: E731
                                                              np.asarray([seq], np.int32)}))[0])
    diffs = [one(e["prompt"] + e["responses"][0]) - one(e["prompt"] + e["responses"][1])
             for e in examples]
    assert r["pairs"] == 5 and r["pairwise_accuracy"] == pytest.approx(np.mean(np.array(diffs) > 0))
    assert r["margin"] == pytest.approx(np.mean(diffs), abs=1e-4)
    prompts = np.asarray(rollout.left_pad(_pad([e["prompt"] for e in examples[:4]], 8), 0))
    p = rl_suites.policy_vs_reference(model, params, params, rm, rm_params, prompts,
                                      eos_id=vocab.eos_id, max_decode_length=6)
    assert p["prompts"] == 4 and p["win_rate"] == 0.0 and abs(p["kl"]) < 1e-5
    path = tmp_path / "prompts.txt"
    path.write_text('你好\n\n{"prompt": "介绍一下北京"}\n{"bad": 1}\n', encoding="utf-8")
    counter = sources.SkipCounter()
    assert rl_suites.read_prompts(str(path), counter) == ["你好", "介绍一下北京"]
    assert counter.as_dict() == {"samples_blank_line": 1, "samples_malformed_line": 1}


def test_multitask_suite_scores_a_prompt_task_with_its_seqio_metrics(spm_models, shared_data_dir):
    """The fine-tuned path: generated answers -> the task's postprocessor -> its metric_fns."""
    model = _model("models/decoder_tiny.gin")
    params = model.init_params(jax.random.key(0), {"decoder_input_tokens": (1, 8)})
    out = suites.multitask(model, params, spm_models["bpe"], gin_file="tasks/multitask.gin",
                           tasks=["zh_prompt_eprstmt"], max_examples=4, batch_size=4,
                           max_decode_length=4)
    assert list(out) == ["zh_prompt_eprstmt"]
    metrics = out["zh_prompt_eprstmt"]
    assert 0.0 <= metrics["accuracy"] <= 100.0 and "invalid_rate" in metrics, metrics
