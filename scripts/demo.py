"""The README's main command: the whole pipeline on the embedded corpus (data/demo), on CPU.

    python -m zhchat.scripts.demo --out_dir=runs/demo [--quick]

1. trains a SentencePiece tokenizer (byte fallback, chat tokens, 100 sentinels) and reports
   chars/token on held-out People's Daily text;
2. registers the seqio causal-LM task and exports it to a packed ArrayRecord cache;
3. pretrains the demo decoder for half its steps, stops, then runs again: the second run resumes from
   the orbax checkpoint (step, optimizer and data position) and finishes; prints its cross-entropy
   on held-out documents beside a unigram model's on the same tokens;
4. samples Chinese continuations with the KV-cache sampler;
5. pretrains the demo T5 on span corruption and lets it fill sentinel spans;
6. when the SFT data folder beside the checkout is present (../shared/data/sft; Alpaca-zh is for
   non-commercial research only), fine-tunes the decoder on instructions and prints a chat exchange;
7. trains a tiny reward model on preference pairs with a planted preference, then runs PPO against
   it (KL to a frozen reference) and prints the mean reward per iteration going up.
Every stage is the same code the CLIs run, wired by the gin files under gin_configs/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import gin
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "data", "demo")
SFT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "sft")  # beside the checkout
PROMPTS = ["子曰：", "中国人民", "天下大势，", "我们今天", "秦始皇"]
HELDOUT_ROWS = 64  # packed rows of held-out documents (tokens reported by the demo)
SPAN_TEXTS = ["子曰：学而时习之，<extra_id_0>亦说乎？", "中国共产党<extra_id_0>全国人民<extra_id_1>。"]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _first_loss(summary: dict[str, Any]) -> float:
    """The first logged loss of a train() call (NaN when a rerun found the run already finished)."""
    return summary["history"][0]["loss"] if summary["history"] else float("nan")


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    return -(-vocab_size // multiple) * multiple


def train_tokenizer(out_dir: str, vocab_size: int) -> str:
    from zhchat.tasks import vocab

    prefix = os.path.join(out_dir, "spm")
    if not os.path.exists(prefix + ".model"):
        stats = vocab.train_tokenizer(
            files=[os.path.join(DEMO, "niutrans_modern_sample.jsonl.gz"),
                   os.path.join(DEMO, "shu_books_sample.jsonl.gz")],
            format="jsonl", model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
            heldout_files=[os.path.join(DEMO, "peoples_daily_199801_tagged_sample.txt.gz")],
            heldout_format="pku_tagged")
        print(f"tokenizer: {stats['vocab_size']} pieces, held-out People's Daily: "
              f"{stats['chars_per_token']:.2f} chars/token, byte-fallback rate "
              f"{stats['byte_fallback_rate']:.4f}", flush=True)
    return prefix + ".model"


def export(task_gin: str, vocab_path: str, task: str, out: str, lengths: dict[str, int],
           converter: str, bindings: tuple[str, ...] = (), max_examples: int | None = None,
           split: str = "train") -> str:
    """Registers the gin file's tasks and caches `task`'s `split` (once)."""
    from zhchat.tasks import cache, lm

    gin.clear_config()
    lm.parse_gin([task_gin], [f"VOCAB_PATH = '{vocab_path}'", *bindings])
    lm.register_tasks()
    if not os.path.exists(os.path.join(out, "metadata.json")):
        meta = cache.export_cache(task=task, split=split, output_dir=out, feature_lengths=lengths,
                                  converter=converter, num_shards=2, max_examples=max_examples)
        print(f"cached {meta['num_examples']} packed examples of {task}/{split} in {out}",
              flush=True)
    return out


def _target_tokens(cache_dir: str) -> np.ndarray:
    """Every weighted target token of a cache, in order (one pass, no shuffling)."""
    from zhchat.tasks import cache_reader

    it = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=1, shuffle=False,
                                          num_epochs=1, shard_index=0, shard_count=1,
                                          num_threads=1, prefetch_buffer_size=4)
    rows = [(b["decoder_target_tokens"][0], b["decoder_loss_weights"][0]) for b in it]
    return np.concatenate([t[w > 0] for t, w in rows])


def _eval_batches(cache_dir: str, batch_size: int) -> int:
    """Batches that cover the cache's rows about once (at least one; the reader repeats)."""
    from zhchat.tasks import cache_reader

    return max(1, cache_reader.cache_metadata(cache_dir)["num_examples"] // batch_size)


def unigram_baseline(train_cache: str, heldout_cache: str, vocab_size: int) -> tuple[float, int]:
    """(cross-entropy in nats/token, tokens) on the held-out cache's targets of an add-one unigram
    model counted on the train cache: what a model that ignores context can reach."""
    counts = np.bincount(_target_tokens(train_cache), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    heldout = _target_tokens(heldout_cache)
    return float(-log_p[heldout].mean()), int(heldout.size)


def run_training(model_gin: list[str], bindings: list[str], num_steps: int) -> dict[str, Any]:
    """One `trainer.train` call configured by gin, as `python -m zhchat.trainer.train` would."""
    from zhchat.trainer import gin_cli, train

    gin.clear_config()
    gin_cli.parse_gin(model_gin, bindings + [f"train.num_steps = {num_steps}"])
    return train.train()


def sample(model: Any, params: Any, vocab: Any, prompts: list[str], seed: int = 0) -> list[str]:
    """Left-padded prompts → KV-cache top-k sampling → decoded continuations."""
    import jax

    from zhchat.tasks.vocabulary import pad_token_rows

    tokens = pad_token_rows([vocab.encode(p) for p in prompts], left=True)
    out = model.predict_batch(params, {"decoder_input_tokens": tokens}, jax.random.key(seed),
                              max_decode_length=40, temperature=0.8, top_k=20)
    return [vocab.decode([t for t in row.tolist() if t > 1]) for row in np.asarray(out)]


def run_sft(args: argparse.Namespace, out: str, vocab_path: str, vocab: Any, model_vocab: int,
            pretrained_run: str) -> None:
    """SFT from the pretrained decoder's parameters (fresh optimizer), loss on replies only."""
    from zhchat.scripts.chat import ChatSession
    from zhchat.trainer import gin_cli

    lengths = ("SFT_INPUTS_LENGTH = 64", "SFT_TARGETS_LENGTH = 64")
    sft_cache = export("gin_configs/tasks/sft.gin", vocab_path, "zh_sft_alpaca",
                       os.path.join(out, "cache", "sft_train"), {"inputs": 64, "targets": 64},
                       "prefix_lm", bindings=lengths, max_examples=2000)
    bindings = [f"VOCAB_SIZE = {model_vocab}", f"TRAIN_CACHE_DIR = '{sft_cache}'",
                f"RUN_DIR = '{os.path.join(out, 'sft')}'", f"NUM_STEPS = {args.sft_steps}",
                f"PRETRAINED_DIR = '{os.path.join(pretrained_run, 'checkpoints')}'",
                f"BATCH_SIZE = {args.batch_size}", "train.log_every = 25",
                f"train.checkpoint_every = {args.sft_steps}", "train.eval_every = 0",
                "make_schedule.peak_value = 1e-3", "make_schedule.warmup_steps = 10"]
    sft = run_training(["models/decoder_demo.gin", "runs/sft.gin"], bindings, args.sft_steps)
    print(f"SFT finished at step {sft['step']}, reply-token loss {_first_loss(sft):.3f} "
          f"-> {sft['loss']:.3f}", flush=True)
    session = ChatSession(gin_cli.evaluate_macro("MODEL"), sft["state"].params, vocab,
                          max_new_tokens=40, temperature=0.7, top_k=20)
    question = "请介绍一下中国的首都。"
    print(f"  user: {question}\n  assistant: ", end="", flush=True)
    session.reply([{"role": "user", "content": question}], out=sys.stdout)
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="runs/demo")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--steps", type=int, default=300, help="decoder pretraining steps")
    p.add_argument("--t5_steps", type=int, default=200, help="T5 span-corruption steps (0 skips)")
    p.add_argument("--sft_steps", type=int, default=100, help="instruction SFT steps (0 skips)")
    p.add_argument("--ppo_iterations", type=int, default=30, help="RM + PPO stage (0 skips)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--quick", action="store_true",
                   help="every stage with fewer steps (CI runs this after a fresh install)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.t5_steps = min(args.steps, 120), min(args.t5_steps, 60)
        args.sft_steps, args.ppo_iterations = min(args.sft_steps, 40), min(args.ppo_iterations, 10)
    os.chdir(REPO)  # gin files name data/demo relative to the repository root
    out = os.path.abspath(args.out_dir)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    from zhchat.tasks.vocabulary import Vocabulary

    _banner("1. SentencePiece tokenizer")
    vocab_path = train_tokenizer(out, args.vocab_size)
    vocab = Vocabulary(vocab_path, extra_ids=100)
    model_vocab = padded_vocab_size(vocab.vocab_size)

    _banner("2. SeqIO causal-LM task -> packed ArrayRecord caches (train, held-out documents)")
    lm_cache = export("gin_configs/tasks/demo_lm.gin", vocab_path, "zh_demo_lm",
                      os.path.join(out, "cache", "lm_train"), {"targets": 128}, "decoder")
    lm_heldout = export("gin_configs/tasks/demo_lm.gin", vocab_path, "zh_demo_lm",
                        os.path.join(out, "cache", "lm_validation"), {"targets": 128}, "decoder",
                        max_examples=HELDOUT_ROWS, split="validation")

    _banner("3. Pretrain the demo decoder (stop half-way, then resume from the checkpoint)")
    run_dir = os.path.join(out, "decoder")
    common = [f"VOCAB_SIZE = {model_vocab}", f"TRAIN_CACHE_DIR = '{lm_cache}'",
              f"RUN_DIR = '{run_dir}'", f"NUM_STEPS = {args.steps}",
              f"BATCH_SIZE = {args.batch_size}", "train.log_every = 25",
              f"train.checkpoint_every = {max(args.steps // 2, 1)}", "make_schedule.peak_value = 3e-3",
              f"make_schedule.warmup_steps = {max(args.steps // 10, 1)}",
              f"EVAL_CACHE_DIR = '{lm_heldout}'", "train.eval_data = @eval/make_cache_iterator",
              f"train.eval_every = {max(args.steps // 2, 1)}",
              f"train.eval_steps = {_eval_batches(lm_heldout, args.batch_size)}"]
    gins = ["models/decoder_demo.gin", "runs/pretrain.gin"]
    first = run_training(gins, common, args.steps // 2)
    print(f"first run stopped at step {first['step']}, loss {first['loss']:.3f}", flush=True)
    second = run_training(gins, common, args.steps)
    print(f"resumed run finished at step {second['step']}, loss {second['loss']:.3f} "
          f"(started at {_first_loss(second):.3f} after resuming)", flush=True)
    baseline, n_heldout = unigram_baseline(lm_cache, lm_heldout, model_vocab)
    if second["eval_history"]:
        print(f"held-out documents ({n_heldout} tokens): cross-entropy "
              f"{second['eval_history'][-1]['cross_entropy']:.3f} nats/token; a unigram model "
              f"counted on the train cache scores {baseline:.3f}", flush=True)

    _banner("4. Sample continuations (KV cache, top-k 20, temperature 0.8)")
    from zhchat.trainer import gin_cli

    model = gin_cli.evaluate_macro("MODEL")
    params = second["state"].params
    for prompt, text in zip(PROMPTS, sample(model, params, vocab, PROMPTS)):
        print(f"  {prompt} -> {text}".replace("\n", " / "), flush=True)

    if args.t5_steps:
        _banner("5. T5 v1.1 span corruption, then fill sentinel spans")
        sc_cache = export("gin_configs/tasks/demo_span_corruption.gin", vocab_path,
                          "zh_demo_span_corruption", os.path.join(out, "cache", "sc_train"),
                          {"inputs": 128, "targets": 29}, "encdec")
        t5_bindings = [f"VOCAB_SIZE = {model_vocab}", f"TRAIN_CACHE_DIR = '{sc_cache}'",
                       f"RUN_DIR = '{os.path.join(out, 't5')}'", f"NUM_STEPS = {args.t5_steps}",
                       f"BATCH_SIZE = {args.batch_size}", "train.log_every = 25",
                       f"train.checkpoint_every = {args.t5_steps}", "INPUTS_LENGTH = 128",
                       "make_optimizer.name = 'adamw'", "make_optimizer.weight_decay = 0.0",
                       "make_schedule.kind = 'cosine'", "make_schedule.peak_value = 3e-3",
                       f"make_schedule.warmup_steps = {max(args.t5_steps // 10, 1)}",
                       f"make_schedule.decay_steps = {args.t5_steps}"]
        t5 = run_training(["models/t5_demo.gin", "runs/t5_span_corruption.gin"], t5_bindings,
                          args.t5_steps)
        print(f"T5 finished at step {t5['step']}, loss {_first_loss(t5):.3f} -> "
              f"{t5['loss']:.3f}", flush=True)
        from zhchat.models.encdec_model import fill_spans

        t5_model = gin_cli.evaluate_macro("MODEL")
        for text in SPAN_TEXTS:
            filled, spans = fill_spans(t5_model, t5["state"].params, vocab, text)
            print(f"  {text} -> {filled}   spans: {spans}", flush=True)

    if args.sft_steps and os.path.isdir(SFT_DATA):
        _banner("6. Instruction SFT of the decoder (Alpaca-zh), then one chat exchange")
        run_sft(args, out, vocab_path, vocab, model_vocab, run_dir)
    elif args.sft_steps:
        print(f"\n(skipping SFT: {SFT_DATA} is not present)", flush=True)

    if args.ppo_iterations:
        _banner("7. Reward model, then PPO against it (tiny models, planted preference)")
        from zhchat.rl.demo import run_rm_and_ppo

        gin.clear_config()  # the RL stage wires its tiny models in Python, not from gin
        rl = run_rm_and_ppo(os.path.join(out, "rl"), ppo_iterations=args.ppo_iterations)
        curve = rl["reward_curve"]
        print(f"reward model pairwise accuracy {rl['rm_accuracy']:.3f}", flush=True)
        print("PPO mean reward per iteration: " + " ".join(f"{r:.2f}" for r in curve), flush=True)
        print(f"mean reward {curve[0]:.2f} -> {curve[-1]:.2f}, KL to the reference "
              f"{rl['kl_curve'][-1]:.2f} nats", flush=True)

    print(f"\ndemo finished in {time.time() - t0:.0f} s; runs, checkpoints and metrics under {out}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
