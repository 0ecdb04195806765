"""Inspect CLI on the demo task (gin), on a two-task mixture and on an exported cache."""

import pytest

from zhchat.scripts import inspect as inspect_cli
from zhchat.tasks import cache, lm, tokenizer


def test_cli_on_demo_task(demo_task, spm_models, capsys):
    rc = inspect_cli.main(["--gin_file=tasks/demo_lm.gin", f"--gin.VOCAB_PATH='{spm_models['bpe']}'",
                           "--task", demo_task, "--split", "validation",
                           "--feature_lengths", "targets=64", "--num_examples", "2",
                           "--stats_examples", "30"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("--- example") == 2 and "[targets] " in out
    assert "zh_demo_lm/validation: 30 examples read" in out
    line = next(s for s in out.splitlines() if s.strip().startswith("targets"))
    assert "count=30" in line and "max=64" in line and "p95=" in line and "median=" in line


def test_mixture_proportions(tmp_path, spm_models, capsys):
    v = tokenizer.get_seqio_vocabulary(spm_models["unigram"])
    for name, char in (("mix_a", "甲"), ("mix_b", "乙")):
        (tmp_path / f"{name}.txt").write_text("".join(f"{char}{i}\n" for i in range(300)),
                                              encoding="utf-8")
        lm.register_lm_task(name=name, files=[str(tmp_path / f"{name}.txt")], format="txt_lines",
                            vocabulary=v, validation_fraction=0.0)
    lm.register_lm_mixture(name="mix_ab", tasks=[("mix_a", 3.0), ("mix_b", 1.0)])
    result = inspect_cli.inspect_task("mix_ab", split="train", sequence_length={"targets": 16},
                                      num_examples=1, stats_examples=200, seed=0)
    shares = result["proportions"]
    assert set(shares) == {"mix_a", "mix_b"} and sum(shares.values()) == pytest.approx(1.0)
    assert 0.65 < shares["mix_a"] < 0.85
    assert "realized task proportions: mix_a=" in capsys.readouterr().out
    meta = cache.export_cache(task="mix_ab", split="train", output_dir=str(tmp_path / "cache"),
                              feature_lengths={"targets": 16}, max_examples=20, progress=False)
    assert meta["task"] == "mix_ab" and meta["num_examples"] == 20
    assert meta["vocabulary"]["targets"]["vocab_path"] == spm_models["unigram"]


def test_cli_on_cache(demo_task, tmp_path, capsys):
    cache.export_cache(task=demo_task, split="validation", output_dir=str(tmp_path),
                       feature_lengths={"targets": 64}, num_shards=2, max_examples=12,
                       progress=False)
    assert inspect_cli.main(["--cache_dir", str(tmp_path), "--num_examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "[decoder_target_tokens segment 1]" in out and "12 packed examples" in out
    assert "decoder_tokens" in out and "decoder_segments" in out and "count=12" in out
