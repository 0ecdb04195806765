"""scripts/plot.py: curves from a real tiny run's metrics.jsonl and a hand-written one with the
same keys; the drawn series equal the file's values; replayed steps, bad lines, missing files."""

import json
import math
import struct
import subprocess
import sys

import pytest

from zhchat.scripts import plot

# the keys a decoder pretraining run logs (step 1 has no throughput: it compiles)
TRAIN_KEYS = ["train/accuracy", "train/cross_entropy", "train/grad_norm", "train/loss",
              "train/num_tokens", "train/param_norm", "train/skipped", "train/z_loss",
              "train/tokens_per_sec", "train/tokens_per_sec_per_device",
              "train/tflops_per_device", "train/mfu", "train/step_time_s",
              "train/host_data_s_per_step", "train/learning_rate"]
EVAL_KEYS = ["eval/accuracy", "eval/cross_entropy", "eval/loss", "eval/num_tokens",
             "eval/z_loss"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A 12-step CLI run of the tiny decoder on synthetic data, eval every 4 steps."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_a"
    subprocess.run([sys.executable, "-m", "zhchat.trainer.train",
                    "--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
                    "--gin_file=runs/synthetic_data.gin", f"--gin.RUN_DIR='{run_dir}'",
                    "--gin.VOCAB_SIZE=256", "--gin.SEQ_LEN=16", "--gin.BATCH_SIZE=8",
                    "--gin.NUM_STEPS=12", "--gin.train.log_every=1",
                    "--gin.train.checkpoint_every=100", "--gin.train.progress_bar=False",
                    "--gin.train.eval_data=@train/make_synthetic_iterator",
                    "--gin.train.eval_every=4", "--gin.train.eval_steps=1",
                    "--gin.make_schedule.warmup_steps=3"], check=True, capture_output=True,
                   timeout=300)
    return run_dir


def _write(run_dir, records_or_lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [x if isinstance(x, str) else json.dumps(x) for x in records_or_lines]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir


THROUGHPUT_KEYS = {"train/tokens_per_sec", "train/tokens_per_sec_per_device",
                   "train/tflops_per_device", "train/mfu", "train/step_time_s"}


def _train(step, loss):
    """A train record with the real keys (none of the throughput ones at step 1)."""
    keys = [k for k in TRAIN_KEYS if step > 1 or k not in THROUGHPUT_KEYS]
    return {"step": step, **{k: float(step) for k in keys}, "train/loss": loss}


def _eval(step, loss):
    return {"step": step, **{k: 1.0 for k in EVAL_KEYS}, "eval/loss": loss}


@pytest.fixture()
def hand_run(tmp_path):
    return _write(tmp_path / "tiny_b", [_train(s, 6.0 - 0.1 * s) for s in range(1, 5)]
                  + [_eval(4, 5.9)] + [_train(s, 6.0 - 0.1 * s) for s in range(5, 9)]
                  + [_eval(8, 5.5)])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _jsonl_series(run_dir, key):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def test_hand_written_keys_mirror_a_real_run(real_run):
    records = [json.loads(x) for x in (real_run / "metrics.jsonl").read_text().splitlines()]
    assert list(records[1])[1:] == TRAIN_KEYS
    assert list(records[0]) == list(_train(1, 0.0))
    assert [list(r)[1:] for r in records if "eval/loss" in r] == [EVAL_KEYS] * 3


def test_two_runs_overlaid_in_one_png_with_the_file_values(real_run, hand_run, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main([str(real_run), str(hand_run), f"--out={out}"]) == 0
    assert _png_size(out) == plot.figure_pixels(5) == (1500, 700)
    runs = [plot.load_run(str(real_run)), plot.load_run(str(hand_run))]
    drawn = plot.plotted_series(runs, plot.DEFAULT_METRICS)
    assert list(drawn) == list(plot.DEFAULT_METRICS)
    for metric in plot.DEFAULT_METRICS:
        assert set(drawn[metric]) == {"tiny_a", "tiny_b"}
        for name, folder in (("tiny_a", real_run), ("tiny_b", hand_run)):
            steps, values = drawn[metric][name]
            assert list(zip(steps, values)) == _jsonl_series(folder, metric)
    assert drawn["eval/loss"]["tiny_a"][0] == [4, 8, 12]
    assert drawn["train/mfu"]["tiny_a"][0] == list(range(2, 13))  # step 1 compiles: no MFU


def test_metric_subset_log_scale_smoothing_and_folder_out(hand_run, tmp_path, capsys):
    out = tmp_path / "figs"
    out.mkdir()
    args = [str(hand_run), f"--out={out}", "--metrics=train/loss,eval/loss,train/nope",
            "--log_loss", "--smooth=0.5"]
    assert plot.main(args) == 0
    assert _png_size(out / "curves.png") == plot.figure_pixels(2) == (1000, 350)
    assert "not in any run (no panel): train/nope" in capsys.readouterr().err
    drawn = plot.plotted_series([plot.load_run(str(hand_run))], ["train/loss", "eval/loss"], 0.5)
    raw = [6.0 - 0.1 * s for s in range(1, 9)]
    want, avg = [], 0.0
    for n, v in enumerate(raw, 1):  # debiased EMA, by hand
        avg = 0.5 * avg + 0.5 * v
        want.append(avg / (1 - 0.5 ** n))
    assert drawn["train/loss"]["tiny_b"][1] == pytest.approx(want)
    assert drawn["eval/loss"]["tiny_b"] == ([4, 8], [5.9, 5.5])  # eval is never smoothed


def test_replayed_steps_take_the_last_record(tmp_path):
    records = [_train(1, 5.0), _train(2, 4.0), _eval(2, 4.5), _train(3, 3.0),
               {"step": 2, "train/loss": 4.2}, _train(3, 3.2), _train(4, 2.0)]
    run = plot.load_run(str(_write(tmp_path / "restarted", records)))
    assert run.series["train/loss"] == [(1, 5.0), (2, 4.2), (3, 3.2), (4, 2.0)]
    assert run.series["eval/loss"] == [(2, 4.5)]  # another kind of record at the same step
    assert [s for s, _ in run.series["train/mfu"]] == [3, 4]  # step 2's was replaced whole


def test_unreadable_lines_are_skipped_counted_and_reported(tmp_path, capsys):
    lines = [_train(1, 5.0), '{"step": 2, "train/lo', "[1, 2]", '{"train/loss": 1.0}', "",
             '{"step": "3", "train/loss": 1.0}', _train(4, 2.0), "not json"]
    folder = _write(tmp_path / "damaged", lines)
    run = plot.load_run(str(folder))
    assert run.bad_lines == [2, 3, 4, 6, 8]
    assert run.series["train/loss"] == [(1, 5.0), (4, 2.0)]
    assert plot.main([str(folder), f"--out={tmp_path / 'c.png'}"]) == 0
    path = folder / "metrics.jsonl"
    assert f"skipped 5 unreadable lines in {path}:2,3,4,6,8" in capsys.readouterr().err
    one = _write(tmp_path / "one", [_train(1, 5.0), "{"])
    assert plot.load_run(str(one)).skip_message() == (
        f"skipped 1 unreadable line in {one / 'metrics.jsonl'}:2")


def test_missing_metrics_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(plot.MetricsError, match="no metrics.jsonl"):
        plot.load_run(str(tmp_path / "nowhere"))
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "error: " in capsys.readouterr().err
    empty = _write(tmp_path / "empty", [])
    assert plot.main([str(empty), f"--out={tmp_path / 'x.png'}"]) == 2  # nothing to draw
    assert not (tmp_path / "x.png").exists()


def test_same_basenames_get_their_parent_in_the_legend(tmp_path):
    a = _write(tmp_path / "a" / "run", [_train(1, 1.0)])
    b = _write(tmp_path / "b" / "run", [_train(1, 2.0)])
    assert plot._names([str(a), str(b)]) == ["a/run", "b/run"]
    assert plot.ema([1.0, math.nan, 3.0], 0.0)[::2] == [1.0, 3.0]
