"""Multi-controller training: 2 CPU processes x 4 devices (jax.distributed, gloo collectives) run
one sharded job with per-process input shards, save per-process data positions, and resume."""

import json
import pathlib
import socket
import subprocess
import sys

WORKER = pathlib.Path(__file__).parent / "multiprocess_worker.py"


def _launch(run_dir, steps):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(run_dir),
                               str(steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    return results


def _data_states(run_dir, step):
    data_dir = pathlib.Path(run_dir) / "checkpoints" / str(step) / "data"
    files = [f for f in data_dir.iterdir() if f.is_file() and not f.name.startswith("_")]
    return json.loads(files[0].read_text())["per_process"]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    first = _launch(tmp_path, 3)
    assert [r["process"] for r in first] == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in first)
    assert first[0]["history"] == first[1]["history"]  # one global computation
    assert [s for s, _ in first[0]["history"]] == [1, 2, 3]
    states = _data_states(tmp_path, 3)
    assert [(s["shard_index"], s["index"]) for s in states] == [(0, 3), (1, 3)]

    resumed = _launch(tmp_path, 4)
    assert resumed[0]["history"] == resumed[1]["history"]
    assert [s for s, _ in resumed[0]["history"]] == [4] and resumed[0]["step"] == 4
    assert [(s["shard_index"], s["index"]) for s in _data_states(tmp_path, 4)] == [(0, 4), (1, 4)]
