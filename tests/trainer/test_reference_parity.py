"""Our train step computes what the reference computes: HF transformers + torch, started from our
initial parameters and fed the same rows with the same recipe, gives the same losses step by step.

Decoder: the convergence benchmark's CLI (benchmarks/convergence.py) on the demo cache (real text,
packed rows of several documents), 30 steps, both systems; its table, summary and plot are
written. T5: the same two trainers on packed encoder-decoder rows.
"""

import json
import math

import gin
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from zhchat.gin_configs import cli as gin_cli
from zhchat.benchmarks import convergence, hf_trainer  # noqa: E402
from zhchat.trainer import optimizers, partitioning, train  # noqa: E402

STEPS = 30


def _rows(path, system, key):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r[key] for r in rows if r["system"] == system and key in r}


def test_convergence_cli_matches_hf_step_by_step_from_our_init(demo_cache, tmp_path):
    cache_dir, vocab_size = demo_cache
    out = tmp_path / "conv"
    code = convergence.main([
        "--gin_file=models/decoder_tiny.gin", f"--gin.VOCAB_SIZE={vocab_size}",
        "--gin.Partitioner.num_devices=1", "--gin.train/make_cache_iterator.num_threads=1",
        f"--train_cache={cache_dir}", f"--eval_cache={cache_dir}", f"--steps={STEPS}",
        "--batch_size=8", "--warmup_steps=5", "--peak_lr=3e-3", "--eval_every=15",
        "--eval_batches=2", "--log_every=1", "--hf_init=ours", f"--out={out}"])
    gin.clear_config()
    assert code == 0
    ours, hf = (_rows(out / "curves.jsonl", s, "loss") for s in ("ours", "hf"))
    assert sorted(ours) == sorted(hf) == list(range(1, STEPS + 1))
    diffs = [abs(ours[s] - hf[s]) for s in ours]
    print("ours:", [round(ours[s], 4) for s in ours], "diffs:", [f"{d:.1e}" for d in diffs])
    assert max(diffs) < 1e-3
    assert ours[STEPS] < ours[1] - 0.5  # it trained (lr 3e-3 on real text), not a frozen model
    ours_eval, hf_eval = (_rows(out / "curves.jsonl", s, "eval_cross_entropy") for s in ("ours", "hf"))
    assert sorted(ours_eval) == [15, 30]
    for step in ours_eval:
        assert ours_eval[step] == pytest.approx(hf_eval[step], abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["eval_gap_ours_minus_hf"]) < 1e-3
    table = (out / "table.md").read_text()
    assert "| 30 |" in table and "held-out CE" in table
    assert (out / "convergence.png").stat().st_size > 5000  # the plot, drawn by matplotlib


def _packed_encdec_batches(n, *, batch, enc_len, dec_len, vocab, seed=0):
    """Rows of two examples each (segments 1 and 2, then padding) on both sides."""
    rng = np.random.default_rng(seed)

    def side(length):
        seg = np.zeros((batch, length), np.int32)
        cut, end = length // 2, length - 2
        seg[:, :cut], seg[:, cut:end] = 1, 2
        return seg

    for _ in range(n):
        enc_seg, dec_seg = side(enc_len), side(dec_len)
        targets = rng.integers(2, vocab, (batch, dec_len), dtype=np.int32) * (dec_seg > 0)
        dec_in = np.zeros_like(targets)  # shifted right within each segment, BOS = 0
        for s in (1, 2):
            cols = np.flatnonzero(dec_seg[0] == s)
            dec_in[:, cols[1:]] = targets[:, cols[:-1]]
        yield {"encoder_input_tokens": rng.integers(2, vocab, (batch, enc_len), dtype=np.int32)
               * (enc_seg > 0), "encoder_segment_ids": enc_seg,
               "encoder_positions": np.zeros_like(enc_seg),
               "decoder_input_tokens": dec_in, "decoder_target_tokens": targets,
               "decoder_segment_ids": dec_seg, "decoder_positions": np.zeros_like(dec_seg),
               "decoder_loss_weights": (dec_seg > 0).astype(np.float32)}


def test_t5_train_step_matches_hf_from_our_init(tmp_path):
    gin.clear_config()
    gin_cli.parse_gin(["models/t5_tiny.gin", "runs/pretrain.gin"], [
        "VOCAB_SIZE = 256", "make_schedule.warmup_steps = 5", "make_schedule.peak_value = 3e-3",
        f"NUM_STEPS = {STEPS}"])
    try:
        model = gin_cli.evaluate_macro("MODEL")
        recipe = convergence.recipe_from_gin(model)
        tx = optimizers.make_optimizer()
        # three batches cycled: random tokens, but memorisable, so the loss must fall
        batches = list(_packed_encdec_batches(3, batch=4, enc_len=24, dec_len=10, vocab=256))
        batches = batches * (STEPS // 3)
        hf = convergence.build_hf_model(model, init="ours", first_batch=batches[0], seed=0)
        ours = train.train(model=model, train_data=iter(batches), optimizer=tx, num_steps=STEPS,
                           batch_size=4, log_every=1, checkpoint_every=0, keep_checkpoints=0,
                           progress_bar=False, seed=0, partitioner=partitioning.Partitioner(
                               devices=jax.devices()[:1]))
    finally:
        gin.clear_config()
    ref = hf_trainer.train(hf, iter(batches), recipe, num_steps=STEPS, device="cpu", log_every=1)
    ours_loss = [h["loss"] for h in ours["history"]]
    ref_loss = [h["loss"] for h in ref["history"]]
    print("ours:", np.round(ours_loss, 4), "hf:", np.round(ref_loss, 4))
    assert ours_loss[0] == pytest.approx(math.log(256), abs=0.3)
    np.testing.assert_allclose(ours_loss, ref_loss, atol=1e-3)
    assert ours_loss[-1] < ours_loss[0] - 0.5
