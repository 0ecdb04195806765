"""The GPU benchmark scripts run end to end for a couple of steps on tiny presets on CPU, so they
never rot; the HF baselines build the same architecture (parameter counts agree)."""

import json
import math

import pytest

from zhchat.benchmarks import decode_throughput, hf_baseline, train_throughput, workloads

TINY_VOCAB = ("VOCAB_SIZE = 512",)


@pytest.mark.parametrize("name", ["decoder_tiny", "t5_tiny"])
def test_train_throughput_and_hf_baseline_run_and_match_sizes(name):
    w = workloads.get_workload(name, batch_size=8)  # divisible by the 8 forced CPU devices
    ours = train_throughput.run(w, steps=2, warmup=1, mesh_shape=(-1, 1, 1), bindings=TINY_VOCAB)
    assert ours["num_devices"] == 8 and ours["step_time_s"] > 0
    assert math.isfinite(ours["loss_first"]) and math.isfinite(ours["loss_last"])
    assert ours["loss_last"] < ours["loss_first"]  # same batch twice: the update lowers its loss
    assert 0 < ours["mfu"] < 1 and ours["tokens_per_s_per_device"] > 0
    hf = hf_baseline.run(w, steps=2, warmup=1, compile_model=False, device="cpu",
                         bindings=TINY_VOCAB)
    assert math.isfinite(hf["final_loss"]) and hf["step_time_s"] > 0
    # transformers 5 ties a config-built T5's head to its embedding; the reference unties it
    # (T5 v1.1, as ours), so the counts agree for both architectures
    assert hf["num_params"] == ours["num_params"]
    # both report FLOPs from the same counter: the ratio of TFLOP/s is the ratio of speeds
    assert hf["tflops_per_device"] * hf["step_time_s"] == pytest.approx(
        ours["tflops_per_device"] * ours["num_devices"] * ours["step_time_s"], rel=1e-6)


def test_train_throughput_profile_breakdown_and_hlo_together(tmp_path):
    """The step donates its state: profiling, then the forward/backward breakdown, must use the
    state the profiled steps returned (a deleted-buffer error otherwise)."""
    w = workloads.get_workload("decoder_tiny", batch_size=8)
    hlo = tmp_path / "step.hlo.txt"
    out = train_throughput.run(w, steps=1, warmup=1, mesh_shape=(-1, 1, 1), bindings=TINY_VOCAB,
                               profile_dir=str(tmp_path / "prof"), profile_steps=1,
                               breakdown=True, packed=False, hlo_out=str(hlo))
    assert out["packed"] is False and out["profile"] is not None
    assert 0 < out["breakdown"]["forward_s"] and 0 < out["breakdown"]["forward_backward_s"]
    assert "ENTRY" in hlo.read_text()


def test_unpacked_decoder_batch_has_no_segment_ids():
    w = workloads.get_workload("decoder_tiny")
    packed = workloads.synthetic_batch(w, 512)
    unpacked = workloads.synthetic_batch(w, 512, packed=False)
    assert set(packed) - set(unpacked) == {"decoder_segment_ids", "decoder_positions"}
    assert (packed["decoder_input_tokens"] == unpacked["decoder_input_tokens"]).all()


def test_decode_throughput_runs_both_systems_for_exact_lengths():
    w = workloads.get_workload("decoder_tiny")
    kw = dict(batch=2, prompt_len=4, new_tokens=5, repeats=1, top_k=5, bindings=TINY_VOCAB)
    ours = decode_throughput.run_ours(w, **kw)
    hf = decode_throughput.run_hf(w, **kw)
    assert len(ours["times"]) == 1 and len(hf["times"]) == 1
    assert ours["first_call_s"] > 0 and hf["first_call_s"] > 0


@pytest.fixture(scope="module")
def packed_cache(demo_task, tmp_path_factory):
    """A real packed decoder cache of the demo corpus (rows of 128 tokens, several documents)."""
    import gin

    with gin.unlock_config():  # the tests before this one finalized their model's gin config
        from zhchat.tasks import cache

    out = tmp_path_factory.mktemp("bench_cache")
    meta = cache.export_cache(task=demo_task, split="train", output_dir=str(out),
                              feature_lengths={"targets": 128}, converter="decoder",
                              num_shards=1, max_examples=48, progress=False)
    return str(out), f"VOCAB_SIZE = {meta['vocabulary']['targets']['vocab_size']}"


def test_train_throughput_and_hf_baseline_on_real_packed_rows(packed_cache):
    data, vocab = packed_cache
    w = workloads.get_workload("decoder_tiny", batch_size=8)
    ours = train_throughput.run(w, steps=2, warmup=1, mesh_shape=(-1, 1, 1), bindings=(vocab,),
                                data=data, data_batches=3)
    stats = ours["data_stats"]
    assert ours["seq_len"] == 128 and stats["rows"] == 24
    assert stats["documents_per_row"] > 1 and stats["max_documents_per_row"] >= 2
    assert 0.5 < stats["non_padding_fraction"] <= 1 and math.isfinite(ours["loss_last"])
    hf = hf_baseline.run(w, steps=2, warmup=1, compile_model=False, device="cpu",
                         bindings=(vocab,), data=data, data_batches=3)
    assert hf["data_stats"] == {k: stats[k] for k in hf["data_stats"]}  # the same rows
    assert math.isfinite(hf["final_loss"])
    paths = [stats[f"{p}_batches"] for p in ("causal", "packed", "masked")]
    assert sum(paths) == pytest.approx(1.0) and paths[2] == 0.0  # all fit the segment table
    # the same rows, the same init scale: both start near ln(vocab) on real tokens
    assert abs(hf["final_loss"] - ours["loss_first"]) < 1.0
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        train_throughput.run(w, steps=1, warmup=1, mesh_shape=(-1, 1, 1), bindings=TINY_VOCAB,
                             data=data, data_batches=1)
    with pytest.raises(ValueError, match="fewer than"):
        workloads.cache_batches(data, w, 100)


def test_trainer_cli_benchmark_reports_steady_state_and_host_time(packed_cache, tmp_path):
    from zhchat.benchmarks import train_cli

    data, vocab = packed_cache
    out = tmp_path / "cli.jsonl"
    rc = train_cli.main([f"--run_dir={tmp_path / 'run'}", f"--out={out}",
                         "--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
                         f"--gin.{vocab.replace(' ', '')}", f"--gin.TRAIN_CACHE_DIR='{data}'",
                         "--gin.BATCH_SIZE=8", "--gin.NUM_STEPS=12", "--gin.train.log_every=3",
                         "--gin.train.checkpoint_every=6", "--gin.make_schedule.warmup_steps=2"])
    assert rc == 0
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["windows"] == 3 and result["step_time_s"] > 0
    assert 0 <= result["host_data_s_per_step"] < result["wall_s"]
    assert 0 < result["mfu"] < 1 and math.isfinite(result["final_loss"])
