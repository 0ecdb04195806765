"""The pair-builder CLI on a tiny trained decoder run: gold replies become `chosen`, the model's
own replies `rejected`; every dialogue is a pair or a counted skip; the file reads back through
tasks/preference_reader.py; bad inputs exit 2 before the model is loaded."""

import json

import gin
import pytest

from test_chat import run  # noqa: F401  (module fixture: tiny decoder run + its tokenizer)
from zhchat.scripts import build_pairs
from zhchat.tasks.preference_reader import PreferenceExamples
from zhchat.tasks.vocabulary import Vocabulary

RECORDS = [{"instruction": f"请用一句话介绍城市{i}。", "input": "", "output": f"城市{i}很美。"}
           for i in range(6)] + [{"instruction": "缺少输出"}]


def _main(args):
    try:
        return build_pairs.main(args)
    finally:
        gin.clear_config()


def test_pairs_from_an_sft_run(run, tmp_path, capsys):  # noqa: F811
    run_dir, spm = run
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "pairs" / "pairs.jsonl"
    rc = _main([f"--run_dir={run_dir}", f"--vocab={spm}", f"--dialogues={data}",
                f"--output={out}", "--batch_size=4", "--max_prompt_len=96", "--max_decode_length=8",
                "--temperature=1.0", "--top_p=1.0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0, result
    assert result["skipped_reading"] == {"missing_field:output": 1}
    assert result["pairs"] + sum(result["skipped"].values()) == 6
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(pairs) == result["pairs"] >= 1
    gold = {f"城市{i}很美。" for i in range(6)}
    for p in pairs:
        assert p["chosen"] in gold and p["rejected"] and p["rejected"] != p["chosen"]
        assert p["prompt"][-1]["role"] == "user"
    read = PreferenceExamples(files=str(out), vocab=Vocabulary(str(spm)))
    assert len(read.examples) == len(pairs)


@pytest.mark.parametrize("bad,match", [("run_dir", "no checkpoints"), ("vocab", "not found"),
                                       ("dialogues", "matches no file")])
def test_bad_inputs_exit_2_before_loading(run, tmp_path, capsys, bad, match):  # noqa: F811
    run_dir, spm = run
    args = {"run_dir": str(run_dir), "vocab": str(spm), "dialogues": str(tmp_path / "*.json"),
            "output": str(tmp_path / "p.jsonl")}
    if bad != "dialogues":
        (tmp_path / "d.json").write_text("[]", encoding="utf-8")
        args[bad] = str(tmp_path / "missing")
    rc = _main([f"--{k}={v}" for k, v in args.items()])
    assert rc == 2 and match in capsys.readouterr().err


def test_lengths_past_the_model_context_exit_2(run, tmp_path, capsys):  # noqa: F811
    run_dir, spm = run
    (tmp_path / "d.json").write_text(json.dumps(RECORDS[:1], ensure_ascii=False), encoding="utf-8")
    rc = _main([f"--run_dir={run_dir}", f"--vocab={spm}", f"--dialogues={tmp_path / 'd.json'}",
                f"--output={tmp_path / 'p.jsonl'}", "--max_prompt_len=256"])
    assert rc == 2 and "exceeds the model's max_len 128" in capsys.readouterr().err
