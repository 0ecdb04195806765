"""The benchmark registry and runner: names are consistent with BENCHMARKS.md, --list and --dry_run
say what runs, and a tiny CPU benchmark run through the runner (its own spawned process) appends a
record stamped with commit, date, device and command; the GPU tests are the `gpu`-marked ones."""

import datetime
import json
import pathlib
import re

import pytest

from zhchat.benchmarks import registry, run

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = "decoder_tiny.synthetic.train_step"
NAME = re.compile(r"(?<![\w./-])([a-z0-9_]+(?:\.[a-z0-9_]+){2,})(?![\w/-])")


def _md() -> str:
    return (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")


def _named(text: str) -> set[str]:
    """Benchmark names in backticks (dotted lower-case words; `zhchat.*`, `pytest.*` excluded)."""
    spans = re.findall(r"`([^`]*)`", text)
    return {n for s in spans for n in NAME.findall(s) if not n.startswith(("zhchat.", "pytest."))}


def _command_words(text: str) -> set[str]:
    """The names and groups that the runner / gpu_suite.sh commands in backticks are given."""
    words = set()
    for span in re.findall(r"`([^`]*)`", text):
        m = re.search(r"(?:zhchat\.benchmarks\.run|gpu_suite\.sh)\s+(.*)", span)
        if m:
            words |= {w for w in m.group(1).split() if not w.startswith(("-", "[", "NAME"))
                      and w != "..."}
    return words


def test_list_prints_every_name_and_group(capsys):
    assert run.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {ln.split()[0] for ln in lines if ln and not ln.startswith(" ")}
    assert set(registry.REGISTRY) <= listed
    assert {f"  {g}:" for g in registry.GROUPS} <= {ln.split(":")[0] + ":" for ln in lines}


def test_registry_is_consistent():
    for name, bench in registry.REGISTRY.items():
        assert re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+){2,}", name), name
        assert bench.calls and bench.results and bench.framework in ("jax", "torch", "cpu")
        rendered = run.render(bench, run.placeholders(run._parser().parse_args([]), name))
        for call in rendered.calls:  # placeholders all known; the entry points' files exist
            module = (call.entry or call.module).split(":")[0]
            path = REPO.joinpath(*module.split(".")[1:])
            assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), module
            assert not re.search(r"\{\w+\}", " ".join(call.args)), call
    for group, names in registry.GROUPS.items():
        assert "." not in group and names and set(names) <= set(registry.REGISTRY), group


def test_benchmarks_md_and_the_registry_name_the_same_benchmarks():
    text = _md()
    named = _named(text)
    assert named, "BENCHMARKS.md names no benchmark"
    assert named <= set(registry.REGISTRY), sorted(named - set(registry.REGISTRY))
    words = _command_words(text)
    assert words and words <= set(registry.REGISTRY) | set(registry.GROUPS), sorted(
        words - set(registry.REGISTRY) - set(registry.GROUPS))
    # the live registry holds what the tables show (plus the runner's own tiny smoke benchmarks)
    assert set(registry.REGISTRY) - set(registry.GROUPS["smoke"]) <= named
    docs = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert _named(docs) <= set(registry.REGISTRY), sorted(_named(docs) - set(registry.REGISTRY))
    head = text.split("## Training speed on real packed rows")[1].split("\n## ")[0]
    assert set(registry.GROUPS["headline"]) == _named(head.split("Variants (same cache")[0])
    assert "gpu_suite.sh headline" in head


def test_dry_run_prints_the_commands_and_runs_nothing(capsys, tmp_path):
    out = tmp_path / "results.jsonl"
    assert run.main([TINY, "--dry_run", "--steps=3", f"--out={out}",
                     f"--work_dir={tmp_path / 'work'}"]) == 0
    printed = capsys.readouterr().out
    assert f"# python -m zhchat.benchmarks.run {TINY} --steps=3" in printed
    assert ("python -m zhchat.benchmarks.train_throughput --workload=decoder_tiny --steps=3 "
            "--batch_size=8") in printed
    assert f"--out={tmp_path / 'work' / TINY / 'records.jsonl'}" in printed
    assert not out.exists() and not (tmp_path / "work").exists()


def test_unknown_name_is_an_error(capsys):
    assert run.main(["no_such.benchmark.train_step", "--dry_run"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_runs_a_tiny_benchmark_and_appends_a_stamped_record(tmp_path):
    out = tmp_path / "results.jsonl"
    rc = run.main([TINY, f"--out={out}", f"--work_dir={tmp_path / 'work'}",
                   f"--log_dir={tmp_path / 'logs'}"])
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert rc == 0 and len(records) == 1, records
    r = records[0]
    assert r["name"] == TINY and r["kind"] == "train_step" and r["status"] == "ok", r["error"]
    assert r["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", r["commit"])
    assert r["dirty"] in (True, False, None)
    date = datetime.datetime.fromisoformat(r["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert r["device_kind"] == "cpu" and r["device_count"] == 8  # conftest's forced devices
    assert r["jax_version"] == __import__("jax").__version__ == r["versions"]["jax"]
    assert r["command"] == f"python -m zhchat.benchmarks.run {TINY}"
    assert r["calls"][0].startswith("python -m zhchat.benchmarks.train_throughput "
                                    "--workload=decoder_tiny --steps=2")
    assert r["metrics"]["step_time_s"] > 0 and r["metrics"]["mfu"] > 0
    assert r["results"][0]["workload"] == "decoder_tiny" and r["results"][0]["steps"] == 2
    assert r["results"][0]["run"] == TINY
    assert (tmp_path / "logs" / f"{TINY}.log").exists()


def test_a_failing_benchmark_is_recorded_as_failed(tmp_path):
    bench = registry.Benchmark("bad.bench.train_step", "train_step", "fails",
                               (registry.Call("zhchat.benchmarks.no_such_module", ()),),
                               results=(str(tmp_path / "none.jsonl"),), framework="cpu")
    r = run.run_one(bench, command="cmd", scratch=str(tmp_path / "scratch"), in_process=True)
    assert r["status"] == "failed" and "no_such_module" in r["error"] and r["metrics"] == {}


def test_a_rerun_convergence_curve_replaces_its_own_rows_only(tmp_path):
    curves = tmp_path / "conv" / "curves.jsonl"
    curves.parent.mkdir()
    curves.write_text('{"system": "ours", "step": 1}\n{"system": "hf", "step": 1}\n')
    bench = registry.Benchmark("x.y.convergence", "convergence", "", (), label="ours",
                               results=(str(curves.parent / "summary.json"),))
    run._prepare(bench, str(tmp_path / "scratch"))
    assert [json.loads(ln)["system"] for ln in curves.read_text().splitlines()] == ["hf"]


def test_gpu_tests_are_marked_and_the_suite_does_not_run_them(pytestconfig):
    assert any(m.startswith("gpu:") for m in pytestconfig.getini("markers"))
    gpu_files = sorted((REPO / "tests").rglob("*_gpu.py"))
    assert gpu_files
    for path in gpu_files:
        text = path.read_text(encoding="utf-8")
        assert "pytest.mark.gpu" in text and "pytest.mark.skipif" in text, path
    suite = (REPO / "benchmarks" / "gpu_suite.sh").read_text(encoding="utf-8")
    code = [ln for ln in suite.splitlines() if not ln.lstrip().startswith("#")]
    assert any("zhchat.benchmarks.run" in ln for ln in code)
    assert not any("pytest" in ln for ln in code)
    assert not list((REPO / "benchmarks").glob("*_gpu.sh"))


@pytest.mark.parametrize("arg,expected", [("--gin.X='none'", "\"--gin.X='none'\""),
                                          ("--workload=decoder_1b", "--workload=decoder_1b")])
def test_commands_quote_only_what_needs_it(arg, expected):
    assert run.call_command(registry.Call("m", (arg,))) == f"python -m m {expected}"


def test_the_runner_imports_no_framework():
    """--list and --dry_run work on a machine without gin, jax, TensorFlow or seqio."""
    import subprocess
    import sys

    code = ("import sys, zhchat.benchmarks.run as r; r.main(['headline', '--dry_run']); "
            "print(sorted({'gin', 'jax', 'tensorflow', 'seqio', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
