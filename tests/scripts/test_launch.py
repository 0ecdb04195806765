"""scripts/launch/: the TPU-pod and Slurm launchers print (dry run) and run exactly one command
per host/rank; the printed Slurm rank commands train a real 2-process CPU job to completion."""

import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU = REPO / "scripts" / "launch" / "tpu_pod.sh"
SLURM = REPO / "scripts" / "launch" / "slurm_gpu.sbatch"
BASH = shutil.which("bash")
# gin arguments as a shell passes them: the quotes are part of the values
GIN = ["--gin_file=models/decoder_tiny.gin", "--gin.RUN_DIR='gs://b/run'",
       '--gin.NAME="a b"', "--gin.NOTE=\"$HOME it's\\n\"", "--gin.Partitioner.mesh_shape=(-1,1,8)",
       "--gin.X=[1]"]
GIN_PRINTED = ("--gin_file=models/decoder_tiny.gin \"--gin.RUN_DIR='gs://b/run'\" "
               "'--gin.NAME=\"a b\"' '--gin.NOTE=\"$HOME it'\\''s\\n\"' "
               '"--gin.Partitioner.mesh_shape=(-1,1,8)" "--gin.X=[1]"')


def _fake(folder: pathlib.Path, name: str, body: str) -> pathlib.Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)
    return path


def _dump_argv(folder: pathlib.Path, name: str, out: pathlib.Path) -> pathlib.Path:
    """A fake executable that appends its argv (NUL-separated, one call per line) to `out`."""
    return _fake(folder, name, f"printf '%s\\0' \"$@\" >> {shlex.quote(str(out))}; echo >> "
                               f"{shlex.quote(str(out))}")


def _calls(out: pathlib.Path) -> list[list[str]]:
    return [line.split("\0")[:-1] for line in out.read_text().splitlines()]


def _run(script, args, env=None, path="/nonexistent"):
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([BASH, str(script), *args], env=full, capture_output=True, text=True,
                          timeout=60)


# --- TPU pod -------------------------------------------------------------------------------

def test_tpu_dry_run_prints_the_gcloud_command_and_the_host_command():
    r = _run(TPU, ["--tpu=pod1", "--zone=us-central2-b", "--project=p", "--workdir=~/zhchat",
                   "--dry_run", "--", *GIN])
    assert r.returncode == 0, r.stderr
    remote = f"cd ~/zhchat && python3 -m zhchat.trainer.train --distributed=auto {GIN_PRINTED}"
    gcloud, host = r.stdout.splitlines()
    assert gcloud.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=us-central2-b "
                             "--project=p --worker=all --command=")
    assert host == f"# every host of pod1 runs: {remote}"
    assert shlex.split(gcloud)[-1] == f"--command={remote}"


def test_tpu_runs_gcloud_with_that_argv_and_each_host_gets_the_trainer_args(tmp_path):
    fake, argv_file, py_file = tmp_path / "bin", tmp_path / "gcloud.argv", tmp_path / "py.argv"
    _dump_argv(fake, "gcloud", argv_file)
    args = ["--tpu=pod1", "--zone=z", f"--workdir={tmp_path}", "--python=fakepy", "--", *GIN]
    r = _run(TPU, args, path=str(fake))
    assert r.returncode == 0, r.stderr
    (argv,) = _calls(argv_file)
    remote = f"cd {tmp_path} && fakepy -m zhchat.trainer.train --distributed=auto {GIN_PRINTED}"
    assert argv == ["compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=z", "--worker=all",
                    f"--command={remote}"]
    # the printed line, pasted into a shell, gives gcloud the same argv
    subprocess.run([BASH, "-c", r.stdout.splitlines()[0]], env={"PATH": str(fake)}, check=True)
    assert _calls(argv_file)[1] == argv
    # a host's shell runs the --command: python gets the gin arguments unchanged, in the workdir
    _fake(fake, "fakepy", f'pwd > {tmp_path}/pwd; printf "%s\\0" "$@" > {py_file}; echo >> {py_file}')
    subprocess.run([BASH, "-c", remote], env={"PATH": str(fake)}, check=True)
    assert _calls(py_file) == [["-m", "zhchat.trainer.train", "--distributed=auto", *GIN]]
    assert (tmp_path / "pwd").read_text().strip() == str(tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--zone=z", "--", "x"], "--tpu=NAME is required"),
    (["--tpu=t", "--", "x"], "--zone=ZONE is required"),
    (["--tpu=t", "--zone=z"], "no trainer arguments after --"),
    (["--tpu=t", "--zone=z", "--gin_file=a.gin"], "unknown option '--gin_file=a.gin'"),
])
def test_tpu_missing_flags_are_errors(args, message):
    r = _run(TPU, args)
    assert r.returncode == 2 and f"error: {message}" in r.stderr and r.stdout == ""


def test_tpu_without_gcloud_says_so(tmp_path):
    r = _run(TPU, ["--tpu=t", "--zone=z", "--", "x"], path=str(tmp_path))
    assert r.returncode == 127 and "gcloud is not on PATH" in r.stderr


# --- Slurm ---------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_NTASKS": "16",
             "SLURM_NTASKS_PER_NODE": "8"}


def _rank_line(rank, local, coordinator="gpu03:29500", num=16, python="python3", args=GIN_PRINTED):
    return (f"CUDA_VISIBLE_DEVICES={local} JAX_LOCAL_DEVICE_IDS=0 {python} -m zhchat.trainer.train"
            f" --coordinator_address={coordinator} --num_processes={num} --process_id={rank} {args}")


def _rank_lines(stdout):
    return [x for x in stdout.splitlines() if not x.startswith("#")]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run_prints_every_rank(how):
    args, env = (["--dry_run", *GIN], SLURM_ENV) if how == "flag" else (
        GIN, {**SLURM_ENV, "DRY_RUN": "1"})
    r = _run(SLURM, args, env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "# 16 processes, 8 per node, coordinator gpu03:29500"
    assert lines[1] == "# rank 0: node 0, local id 0" and lines[-2] == "# rank 15: node 1, local id 7"
    assert _rank_lines(r.stdout) == [_rank_line(rank, rank % 8) for rank in range(16)]


@pytest.mark.parametrize("nodelist,first", [("a,b", "a"), ("gpu[01-04]", "gpu01"),
                                            ("n[1,3-4]-ib,c", "n1-ib"), ("solo", "solo"),
                                            ("x-1[07-09],y[1-2]", "x-107")])
def test_slurm_first_host_without_scontrol(nodelist, first):
    r = _run(SLURM, ["--dry_run", "a"], {"SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "2",
                                         "SLURM_NTASKS_PER_NODE": "2(x1)",
                                         "COORDINATOR_PORT": "1234"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"# 2 processes, 2 per node, coordinator {first}:1234"


def test_slurm_first_host_from_scontrol(tmp_path):
    _fake(tmp_path / "bin", "scontrol", 'echo nodeB; echo nodeA')
    r = _run(SLURM, ["--dry_run", "--", "a"], SLURM_ENV, path=str(tmp_path / "bin"))
    assert _rank_lines(r.stdout)[0] == _rank_line(0, 0, "nodeB:29500", args="a")


@pytest.mark.parametrize("env,args,message", [
    ({}, ["--dry_run", "a"], "SLURM_JOB_NODELIST and SLURM_NTASKS are not set"),
    (SLURM_ENV, ["--dry_run"], "no trainer arguments"),
    (SLURM_ENV, ["a"], "srun is not on PATH"),
])
def test_slurm_errors(env, args, message):
    r = _run(SLURM, args, env)
    assert r.returncode == 2 and message in r.stderr


def test_slurm_real_run_gives_each_task_its_dry_run_line(tmp_path):
    """A fake srun runs the job's command once per task (SLURM_PROCID/SLURM_LOCALID set): each
    task runs what the dry run printed for its rank."""
    fake, out = tmp_path / "bin", tmp_path / "py.argv"
    _fake(fake, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                        'for i in 0 1 2 3; do SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) "$@"; done')
    _fake(fake, "fakepy", f'printf "%s\\0" "CUDA=$CUDA_VISIBLE_DEVICES" "LOCAL=$JAX_LOCAL_DEVICE_IDS" '
                          f'"$@" >> {out}; echo >> {out}')
    env = {"SLURM_JOB_NODELIST": "h[1-2]", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
           "PYTHON": "fakepy", "ZHCHAT_WORKDIR": str(tmp_path)}
    r = _run(SLURM, GIN, env, path=f"{fake}:{os.path.dirname(BASH)}")
    assert r.returncode == 0, r.stderr
    dry = _rank_lines(_run(SLURM, ["--dry_run", *GIN], env).stdout)
    assert len(dry) == 4 and r.stderr.splitlines()[1] == dry[0]
    assert _calls(out) == [
        [f"CUDA={rank % 2}", "LOCAL=0", "-m", "zhchat.trainer.train",
         "--coordinator_address=h1:29500", "--num_processes=4", f"--process_id={rank}", *GIN]
        for rank in range(4)]
    assert dry == [_rank_line(rank, rank % 2, "h1:29500", 4, "fakepy") for rank in range(4)]


def test_slurm_dry_run_lines_train_a_two_process_job(tmp_path):
    """The two rank commands printed for a 2-task job on localhost, run as they are: one jax
    distributed CPU job (2 processes x 2 devices) trains to the end."""
    try:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"cannot bind a localhost port for the coordinator: {e}")
    run_dir = tmp_path / "run"
    args = ["--gin_file=models/decoder_tiny.gin", "--gin_file=runs/pretrain.gin",
            "--gin_file=runs/synthetic_data.gin", f"--gin.RUN_DIR='{run_dir}'",
            "--gin.VOCAB_SIZE=256", "--gin.SEQ_LEN=16", "--gin.BATCH_SIZE=8", "--gin.NUM_STEPS=3",
            "--gin.train.log_every=1", "--gin.train.progress_bar=False",
            "--gin.train.async_checkpointing=False"]
    env = {"SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
           "COORDINATOR_PORT": str(port), "PYTHON": sys.executable}
    dry = _run(SLURM, ["--dry_run", *args], env)
    lines = _rank_lines(dry.stdout)
    assert dry.returncode == 0 and len(lines) == 2, dry.stderr
    child_env = {**os.environ, "JAX_PLATFORMS": "cpu",
                 "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([BASH, "-c", line], cwd=tmp_path, env=child_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for line in lines]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert "finished at step 3" in out
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "3").is_dir()
