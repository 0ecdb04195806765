"""Kernel-time summary of a perfetto trace: kinds, stream tracks only, idle share, and the CPU case."""

import gzip
import json

import pytest

from zhchat.benchmarks import trace_summary, train_throughput, workloads


def _events():
    meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,  # noqa
                                        "args": {"name": name}}
    x = lambda tid, ts, dur, name: {"ph": "X", "pid": 2, "tid": tid, "ts": ts, "dur": dur,  # noqa
                                    "name": name}
    return [
        meta(1, 0, "process_name", "/host:CPU"), meta(2, 0, "process_name", "/device:GPU:0"),
        meta(2, 7, "thread_name", "Stream #7(Compute)"), meta(2, 8, "thread_name", "Stream #8"),
        meta(2, 9, "thread_name", "XLA Ops"),
        x(7, 0, 400, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"),
        x(7, 400, 100, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
        x(7, 600, 50, "loop_multiply_fusion_3"),
        x(8, 620, 80, "ncclDevKernel_AllReduce_Sum_f32"),   # overlaps the fusion on another stream
        x(7, 900, 100, "input_reduce_fusion"),
        x(9, 0, 1000, "fusion.1"),                           # derived op track: not counted again
        {"ph": "X", "pid": 1, "tid": 0, "ts": 0, "dur": 5000, "name": "PjitFunction(step)"},
    ]


def test_summary_sums_kernel_kinds_on_stream_tracks_per_step():
    s = trace_summary.summarize(_events(), steps=2)
    assert s["kernels"] == 5
    assert s["kinds_ms_per_step"] == {"matmul": 0.2, "other": 0.075, "attention": 0.05,
                                      "collective": 0.04}
    assert s["span_ms_per_step"] == 0.5
    # busy: [0, 500) + [600, 700) + [900, 1000) = 700 of a 1000 us span
    assert s["busy_ms_per_step"] == 0.35 and s["idle_fraction"] == pytest.approx(0.3)
    assert s["top_kernels_ms_per_step"][0] == ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 0.2]


def test_summary_reads_the_newest_gzip_trace(tmp_path):
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": _events()}, f)
    assert trace_summary.summarize_dir(str(tmp_path))["kernels"] == 5
    trace = str(run / "perfetto_trace.json.gz")  # a trace file works too
    assert trace_summary.summarize_dir(trace, steps=5)["kernels"] == 5
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        trace_summary.summarize_dir(str(tmp_path / "nothing"))


def test_train_throughput_profile_on_cpu_reports_why_there_is_no_summary(tmp_path):
    w = workloads.get_workload("decoder_tiny", batch_size=8)
    out = train_throughput.run(w, steps=1, warmup=1, mesh_shape=(-1, 1, 1),
                               bindings=("VOCAB_SIZE = 512",), profile_dir=str(tmp_path),
                               profile_steps=1)
    assert "no device stream kernels" in out["profile"]["error"]
    assert out["breakdown"] is None
    assert list(tmp_path.rglob("perfetto_trace.json.gz"))


def test_train_throughput_breakdown_times_forward_and_backward_alone():
    w = workloads.get_workload("t5_tiny", batch_size=8)
    out = train_throughput.run(w, steps=2, warmup=1, mesh_shape=(-1, 1, 1),
                               bindings=("VOCAB_SIZE = 512", "make_optimizer.mu_dtype = 'bfloat16'"),
                               breakdown=True)
    parts = out["breakdown"]
    assert set(parts) == {"forward_s", "forward_backward_s"} and min(parts.values()) > 0
