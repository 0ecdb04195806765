"""The T5X-style CLI: gin typos stop with exit code 2 naming the binding; --dry_run of the 65B preset."""

import os
import subprocess
import sys

import gin
import pytest

from conftest import REPO_ROOT
from zhchat.gin_configs import cli as gin_cli
from zhchat.trainer import cli

TINY = "--gin_file=gin_configs/models/decoder_tiny.gin"
PRETRAIN = "--gin_file=gin_configs/runs/pretrain.gin"


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_gin_typo_exits_2_naming_the_binding():
    proc = subprocess.run(
        [sys.executable, "-m", "zhchat.trainer.train", TINY, PRETRAIN, "--gin.train.num_stepz=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gin config error:") and "num_stepz" in last and "train" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--gin.trian.num_steps=3"], "No configurable matching 'trian'"),
    (["--gin.make_optimizer.nmae='adamw'"], "nmae"),
    (["--gin_file=runs/no_such_run.gin"], "no_such_run.gin"),
    (["--gin.train.num_steps"], "--gin.KEY=VALUE"),
])
def test_config_errors_in_process(args, needle, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert cli.main([TINY, PRETRAIN] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gin config error:") and needle in err


def test_a_missing_cache_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    """runs/pretrain.gin's default cache does not exist in an empty folder: one line naming it,
    no traceback, exit 2, nothing trained."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([TINY, PRETRAIN, "--gin.VOCAB_SIZE=512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train: error:") and "not a finished cache" in err[-1]
    assert not any("Traceback" in line for line in err)
    gin.clear_config()


def test_an_unbound_macro_is_named_before_anything_runs(capsys, monkeypatch):
    """pretrain.gin without a model preset uses %MODEL that nothing defines: one line naming it
    and where it comes from, exit 2 (was a TypeError traceback from gin's `macro()`)."""
    monkeypatch.chdir(REPO_ROOT)
    assert cli.main([PRETRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gin config error: macro MODEL is used but never defined")
    assert "models/decoder_tiny.gin" in err
    assert cli.main([TINY, PRETRAIN, "--gin.train.num_steps=%STEPS_TYPO"]) == 2
    assert "macro STEPS_TYPO is used but never defined" in capsys.readouterr().err


def test_gin_files_resolve_from_the_installed_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # neither path exists relative to this cwd
    gin_cli.parse_gin(["models/decoder_tiny.gin", "gin_configs/runs/pretrain.gin"], [])
    assert gin.query_parameter("%BATCH_SIZE") == 64
    assert gin_cli.evaluate_macro("MODEL").config.emb_dim == 64


def test_dry_run_65b_counts_params_without_allocating(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert cli.main(["--gin_file=gin_configs/models/decoder_65b.gin", PRETRAIN,
                       "--dry_run"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    count = int(first.split()[1].replace(",", ""))
    assert 65.1e9 < count < 65.4e9, first
    assert "mesh: {'data': 8, 'fsdp': 1, 'tensor': 1}" in out
    assert "flops per token" in out
    assert "layers/mlp/wi_0/kernel" in out and "'fsdp', 'tensor'" in out


def test_runs_without_grain(tmp_path):
    """The GPU image has no grain: pretrain.gin must still parse, and using the cache says why not."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoGrain:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'grain':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoGrain())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    base = [sys.executable, "-m", "zhchat.trainer.train", TINY, PRETRAIN]
    dry = subprocess.run(base + ["--dry_run"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and dry.stdout.startswith("parameters:"), dry.stderr[-2000:]
    run = subprocess.run(base + [f"--gin.RUN_DIR='{tmp_path / 'run'}'"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "make_cache_iterator" in last and "needs grain" in last


def test_distributed_auto_initialises_jax_without_arguments(monkeypatch):
    """--distributed=auto (the TPU-pod launcher's flag) leaves the cluster to JAX's detection;
    without it and without a coordinator nothing is initialised (one-host runs)."""
    import argparse

    calls = []
    monkeypatch.setattr(cli.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    args = dict(coordinator_address=None, num_processes=None, process_id=None)
    cli._distributed_init(argparse.Namespace(distributed="off", **args))
    assert calls == []
    cli._distributed_init(argparse.Namespace(distributed="auto", **args))
    assert calls == [{}]
    cli._distributed_init(argparse.Namespace(
        distributed="off", **dict(args, coordinator_address="h:1", num_processes=2, process_id=1)))
    assert calls[-1] == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
