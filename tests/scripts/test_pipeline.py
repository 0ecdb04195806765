"""The one-command pipeline (scripts/pipeline/) on its tiny preset: every stage, split as users do.

One run of the whole chain, in the order a user with separate data and accelerator machines runs it:
the data stages (clean, vocab, cache: TensorFlow/Beam) here, then the training stages in a fresh
process that must not import TensorFlow; pretraining is cut off half-way first (a killed job leaves
checkpoints but no stage record) and must resume from its checkpoint. Then a rerun skips every
stage, and missing inputs fail before any work starts.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from zhchat.scripts import pipeline

PRESET = "pipelines/zero_chatgpt_tiny.gin"
TRAIN_STAGES = "pretrain,sft,pairs,rm,ppo,eval"


def _result(out, stage):
    with open(os.path.join(out, stage, "stage.json"), encoding="utf-8") as f:
        return json.load(f)["result"]


def _cli(out, *args):
    return [f"--gin_file={PRESET}", f"--out_dir={out}", *args]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data_dir):
    out = str(tmp_path_factory.mktemp("zc") / "run")
    assert pipeline.main(_cli(out, "--stages=clean,vocab,cache")) == 0
    # cut pretraining off at step 40 of 80 (its checkpoint stays), then forget the stage finished
    stop_at_40 = "--gin.PipelineConfig.pretrain_bindings=['train.num_steps = 40']"
    assert pipeline.main(_cli(out, "--stages=pretrain", stop_at_40)) == 0
    assert _result(out, "pretrain")["step"] == 40
    os.remove(os.path.join(out, "pretrain", "stage.json"))
    code = ("import sys; from zhchat.scripts import pipeline; "
            f"rc = pipeline.main({_cli(out, '--stages=' + TRAIN_STAGES)!r}); "
            "assert 'tensorflow' not in sys.modules, 'a training stage imported TensorFlow'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_data_stages_write_tokenizer_and_caches(tiny_run):
    clean = _result(tiny_run, "clean")
    assert clean["documents_out"] > 2000 and clean["records_skipped"] == 0
    vocab = _result(tiny_run, "vocab")
    assert vocab["round_trip_mismatches"] == 0
    assert vocab["byte_fallback_rate"] < 0.02  # line breaks are pieces, not byte tokens
    assert "validation split" in vocab["heldout"]
    cache = _result(tiny_run, "cache")
    assert cache["lm_train_rows"] == 2000 and cache["lm_validation_rows"] == 32
    assert cache["sft_train_rows"] == 800 and cache["sft_validation_rows"] == 32
    assert cache["pair_dialogues"] > 100  # the held-back 2% of Alpaca-zh
    assert all(os.path.exists(f) for f in cache["preference_files"])


def test_pretraining_resumed_from_its_checkpoint_and_learned(tiny_run):
    pre = _result(tiny_run, "pretrain")
    assert pre["step"] == 80
    assert pre["first_logged_step"] > 40  # picked up after step 40, did not start over
    ln_vocab = math.log(8192)
    assert pre["heldout_cross_entropy"] < ln_vocab - 1.0
    assert pre["heldout_cross_entropy"] < pre["unigram_heldout_cross_entropy"] + 0.2


def test_sft_then_pairs_from_the_sft_model(tiny_run):
    sft = _result(tiny_run, "sft")
    assert sft["step"] == 40 and math.isfinite(sft["heldout_reply_cross_entropy"])
    pairs = _result(tiny_run, "pairs")
    assert pairs["pairs"] == 40
    with open(pairs["file"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 40
    assert all(r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] == "user" for r in rows)


def test_reward_model_ppo_and_eval_report(tiny_run):
    rm = _result(tiny_run, "rm")
    assert rm["step"] == 30 and rm["heldout_pairs"] > 0
    assert 0.0 <= rm["heldout_pairwise_accuracy"] <= 1.0
    ppo = _result(tiny_run, "ppo")
    assert ppo["iterations"] == 4 and len(ppo["reward_mean"]) == 4
    assert all(math.isfinite(v) for v in ppo["reward_mean"] + ppo["kl"])
    ev = _result(tiny_run, "eval")
    assert ev["prompts"] == 8 and 0.0 <= ev["ppo_win_rate"] <= 1.0
    assert len(ev["samples"]) == 2 and all(s["prompt"] for s in ev["samples"])
    with open(os.path.join(tiny_run, "eval", "report.md"), encoding="utf-8") as f:
        report = f.read()
    for stage in pipeline.STAGES[:-1]:
        assert f"| {stage} |" in report


def test_rerun_skips_every_completed_stage(tiny_run, capsys):
    t0 = time.time()
    assert pipeline.main(_cli(tiny_run)) == 0
    printed = capsys.readouterr().out
    assert all(f"=== {s}: complete" in printed for s in pipeline.STAGES)
    assert time.time() - t0 < 30


def test_missing_inputs_fail_before_any_stage(tmp_path, capsys):
    out = str(tmp_path / "empty")
    t0 = time.time()
    assert pipeline.main(_cli(out, "--stages=pretrain,sft")) == 2
    err = capsys.readouterr().err
    assert "needs the 'vocab' stage's output" in err and "needs the 'cache' stage's output" in err
    assert pipeline.main(_cli(out, "--stages=clean,vocab,cache",
                              "--gin.PipelineConfig.sft_data_dir='/nonexistent/sft'")) == 2
    err = capsys.readouterr().err
    assert "SFT data folder '/nonexistent/sft' does not exist" in err
    assert not os.path.exists(os.path.join(out, "clean", "stage.json"))  # nothing ran
    assert time.time() - t0 < 30


def test_unknown_stage_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        pipeline.main(_cli(str(tmp_path), "--stages=clean,tokenize"))
    assert e.value.code == 2
