"""The README's main command: the whole chain on the embedded corpus (data/demo), on CPU.

    python -m zhchat.scripts.demo --out_dir=runs/demo [--quick]

It is the pipeline command (scripts/pipeline/, preset gin_configs/pipelines/demo.gin) with a few
things to look at between its stages:
1. cleans data/demo (normalise, filter, exact/near dedup) and trains a SentencePiece tokenizer on
   the cleaned train documents (byte fallback, line breaks as pieces, chat tokens, 100 sentinels);
2. registers the seqio causal-LM task over the cleaned shards and caches packed rows;
3. pretrains the demo decoder for half its steps, stops, then runs again: the second run resumes
   from the orbax checkpoint (step, optimizer and data position) and finishes; prints its held-out
   cross-entropy beside a unigram model's on the same tokens;
4. samples continuations of a few prompts with the KV-cache sampler;
5. pretrains the demo T5 on span corruption of the same shards and lets it fill sentinel spans;
6. when the shared SFT data is beside the checkout (../shared/data/sft; Alpaca-zh is for
   non-commercial research only), fine-tunes the decoder on instructions and chats once;
7. then the RLHF chain on that SFT model, as Zero-Chatgpt ran it: preference pairs (gold reply vs
   the SFT model's own), a reward model from the SFT checkpoint, PPO from the SFT policy, and an
   evaluation of PPO against SFT on held-out prompts by the reward model.
Every stage is the same code the CLIs run, wired by the gin files under gin_configs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import gin
import numpy as np

from zhchat.scripts.pipeline.config import repo_path, vocabulary
PRESET = "pipelines/demo.gin"
PROMPTS = ["子曰：", "中国人民", "天下大势，", "我们今天", "秦始皇"]
SPAN_TEXTS = ["子曰：学而时习之，<extra_id_0>亦说乎？", "中国共产党<extra_id_0>全国人民<extra_id_1>。"]
T5_INPUTS, T5_TARGETS, T5_BATCH_SIZE = 128, 29, 16
SAMPLE_TOKENS, SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 40, 0.8, 20
QUICK = {"pretrain_steps": 120, "sft_steps": 40, "rm_steps": 30, "ppo_iterations": 4,
         "max_pairs": 48, "pretrain_eval_every": 60}


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _config(args: argparse.Namespace, bindings: list[str]) -> Any:
    """The demo preset's PipelineConfig, with --gin.PipelineConfig.X=Y, --out_dir, --quick and the
    SFT data's presence."""
    from zhchat.scripts import pipeline
    from zhchat.gin_configs import cli as gin_cli

    gin.clear_config()
    gin_cli.parse_gin([PRESET], bindings)
    cfg = pipeline.PipelineConfig()
    gin.clear_config()
    changes: dict[str, Any] = {"out_dir": os.path.abspath(args.out_dir)}
    if args.quick:
        changes.update(QUICK)
    if not os.path.isdir(repo_path(cfg.sft_data_dir)):
        print(f"(no SFT data at {cfg.sft_data_dir}: stages 6-7 are skipped)", flush=True)
        changes["sft_data_dir"] = None
    return dataclasses.replace(cfg, **changes)


def sample(model: Any, params: Any, vocab: Any, prompts: list[str], seed: int = 0) -> list[str]:
    """Left-padded prompts with token healing → KV-cache top-k sampling → the new text."""
    import jax

    from zhchat.tasks.vocabulary import healed_prompt_batch

    tokens, mask, heads = healed_prompt_batch(vocab, prompts, model.config.vocab_size)
    out = model.predict_batch(params, {"decoder_input_tokens": tokens}, jax.random.key(seed),
                              max_decode_length=SAMPLE_TOKENS, temperature=SAMPLE_TEMPERATURE,
                              top_k=SAMPLE_TOP_K, first_token_mask=mask)
    texts = []
    for prompt, head, row, gen in zip(prompts, heads, tokens.tolist(), np.asarray(out).tolist()):
        full = vocab.decode([t for t in row if t > 0] + [t for t in gen if t > 1])
        texts.append(full[len(prompt):] if full.startswith(prompt) else full[len(head):])
    return texts


def pretrain_with_resume(pipeline: Any, cfg: Any) -> dict:
    """Pretraining cut off half-way (its checkpoint stays, its stage record is dropped, as when a
    job is killed), then the pipeline's rerun resumes it from that checkpoint."""
    ctx = pipeline.Context(cfg)
    if ctx.done("pretrain"):
        return ctx.result("pretrain")
    half = max(cfg.pretrain_steps // 2, 1)
    first = dataclasses.replace(cfg, pretrain_bindings=[*cfg.pretrain_bindings,
                                                        f"train.num_steps = {half}",
                                                        f"train.checkpoint_every = {half}"])
    pipeline.run(first, ["pretrain"])
    print(f"first run stopped at step {ctx.result('pretrain')['step']}", flush=True)
    os.remove(ctx.dir("pretrain", "stage.json"))
    result = pipeline.run(cfg, ["pretrain"])["pretrain"]
    print(f"resumed run finished at step {result['step']} (first step logged after resuming: "
          f"{result['first_logged_step']})", flush=True)
    return result


def t5_cache(pipeline: Any, cfg: Any) -> str:
    """The span-corruption cache over the cleaned shards (seqio + TensorFlow)."""
    from zhchat.scripts.pipeline.data_stages import export_cache_once
    from zhchat.tasks import cache, lm

    ctx = pipeline.Context(cfg)
    sc_cache = ctx.dir("t5", "cache")
    gin.clear_config()
    lm.parse_gin(["tasks/cleaned_span_corruption.gin"],
                 [f"VOCAB_PATH = '{ctx.vocab_path}'", f"CLEANED_DATA_DIR = '{ctx.dir('clean')}'"])
    lm.register_tasks()
    export_cache_once(cache, task="zh_cleaned_span_corruption", split="train", out=sc_cache,
                      lengths={"inputs": T5_INPUTS, "targets": T5_TARGETS}, converter="encdec",
                      rows=None, shards=2)
    return sc_cache


def run_t5(pipeline: Any, cfg: Any, steps: int, batch_size: int, peak_lr: float = 3e-3,
           bindings: tuple[str, ...] = ()) -> dict:
    """Span corruption on the cache `t5_cache` wrote (TF-free), then sentinel filling."""
    import jax

    from zhchat.models.encdec_model import fill_spans
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import train

    ctx = pipeline.Context(cfg)
    gin.clear_config()
    gin_cli.parse_gin(["models/t5_demo.gin", "runs/t5_span_corruption.gin"], [
        f"VOCAB_SIZE = {ctx.model_vocab_size()}", f"TRAIN_CACHE_DIR = '{ctx.dir('t5', 'cache')}'",
        f"RUN_DIR = '{ctx.dir('t5', 'run')}'", f"NUM_STEPS = {steps}",
        f"BATCH_SIZE = {batch_size}", "train.log_every = 25", f"train.checkpoint_every = {steps}",
        "train.progress_bar = False", f"INPUTS_LENGTH = {T5_INPUTS}",
        "make_optimizer.name = 'adamw'", "make_optimizer.weight_decay = 0.0",
        "make_schedule.kind = 'cosine'", f"make_schedule.peak_value = {peak_lr}",
        f"make_schedule.warmup_steps = {max(steps // 10, 1)}",
        f"make_schedule.decay_steps = {steps}", *bindings])
    t5 = train.train()
    first = t5["history"][0]["loss"] if t5["history"] else float("nan")
    print(f"T5 finished at step {t5['step']}, loss {first:.3f} -> {t5['loss']:.3f}", flush=True)
    model, vocab = gin_cli.evaluate_macro("MODEL"), vocabulary(ctx)
    fills = {}
    for text in SPAN_TEXTS:
        filled, spans = fill_spans(model, t5["state"].params, vocab, text)
        sampled = [fill_spans(model, t5["state"].params, vocab, text, rng=jax.random.key(seed),
                              temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K)[0]
                   for seed in range(2)]
        fills[text] = [filled, *sampled]
        print(f"  {text}\n    greedy:  {filled}\n    sampled: " + "\n             ".join(sampled),
              flush=True)
    return {"step": t5["step"], "loss": t5["loss"], "fills": fills}


def chat_once(pipeline: Any, ctx: Any) -> None:
    from zhchat.scripts.chat import ChatSession

    model, params = pipeline.model_and_params(ctx, ctx.checkpoints("sft"))
    session = ChatSession(model, params, vocabulary(ctx), max_new_tokens=40, temperature=0.7,
                          top_k=20)
    question = "请介绍一下中国的首都。"
    print(f"  user: {question}\n  assistant: ", end="", flush=True)
    session.reply([{"role": "user", "content": question}], out=sys.stdout)
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="runs/demo")
    p.add_argument("--t5_steps", type=int, default=200, help="T5 span-corruption steps (0 skips)")
    p.add_argument("--quick", action="store_true",
                   help="every stage with fewer steps (CI runs this after a fresh install)")
    p.epilog = "Settings: --gin.PipelineConfig.pretrain_steps=600 (fields in scripts/pipeline/config.py)."
    from zhchat.gin_configs import cli as gin_cli

    files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else list(argv))
    if files:
        p.error("the demo's preset is fixed (gin_configs/pipelines/demo.gin); override its settings "
                "with --gin.PipelineConfig.X=Y, or run zhchat.scripts.pipeline with your own preset")
    args = p.parse_args(rest)
    if args.quick:
        args.t5_steps = min(args.t5_steps, 60)
    from zhchat.scripts import pipeline

    t0 = time.time()
    try:
        cfg = _config(args, bindings)
    except gin_cli.GinConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = pipeline.Context(cfg)
    try:
        pipeline.check_inputs(ctx, [s for s in pipeline.STAGES
                                    if cfg.sft_data_dir is not None or s in ("clean", "vocab",
                                                                             "cache", "pretrain")])
    except pipeline.StageInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    _banner("1. Clean the embedded corpus, train the SentencePiece tokenizer")
    res = pipeline.run(cfg, ["clean", "vocab"])
    v = res["vocab"]
    print(f"tokenizer: {v['vocab_size']} pieces; on held-out cleaned documents "
          f"{v['chars_per_token']:.2f} chars/token, byte-fallback rate "
          f"{v['byte_fallback_rate']:.4f}, {v['round_trip_mismatches']} round-trip mismatches",
          flush=True)

    _banner("2. SeqIO tasks over the cleaned shards -> packed ArrayRecord caches")
    pipeline.run(cfg, ["cache"])

    _banner("3. Pretrain the demo decoder (stop half-way, then resume from the checkpoint)")
    pre = pretrain_with_resume(pipeline, cfg)
    print(f"held-out documents ({pre['heldout_tokens']} tokens): cross-entropy "
          f"{pre['heldout_cross_entropy']:.3f} nats/token; a unigram model counted on the train "
          f"cache scores {pre['unigram_heldout_cross_entropy']:.3f}", flush=True)

    _banner(f"4. Sample continuations (KV cache, token healing, top-k {SAMPLE_TOP_K}, "
            f"temperature {SAMPLE_TEMPERATURE})")
    model, params = pipeline.model_and_params(ctx, ctx.checkpoints("pretrain"))
    for prompt, text in zip(PROMPTS, sample(model, params, vocabulary(ctx), PROMPTS)):
        print(f"  {prompt} -> {text}".replace("\n", " / "), flush=True)

    if args.t5_steps:
        _banner("5. T5 v1.1 span corruption, then fill sentinel spans")
        t5_cache(pipeline, cfg)
        run_t5(pipeline, cfg, args.t5_steps, T5_BATCH_SIZE)

    if cfg.sft_data_dir is not None:
        _banner("6. Instruction SFT of the decoder (Alpaca-zh, ShareGPT-zh), then one chat exchange")
        sft = pipeline.run(cfg, ["sft"])["sft"]
        print(f"held-out reply cross-entropy {sft['heldout_reply_cross_entropy']:.3f}", flush=True)
        chat_once(pipeline, ctx)

        _banner("7. RLHF on the SFT model: pairs -> reward model -> PPO -> evaluation")
        res = pipeline.run(cfg, ["pairs", "rm", "ppo", "eval"])
        rm, ppo, ev = res["rm"], res["ppo"], res["eval"]
        print(f"{res['pairs']['pairs']} pairs (gold reply vs the SFT model's own); reward model "
              f"accuracy on held-back pairs {rm['heldout_pairwise_accuracy']:.3f}", flush=True)
        print("PPO mean reward per iteration: " + " ".join(f"{r:.2f}" for r in ppo["reward_mean"])
              + f"; KL to the SFT policy {ppo['kl'][-1]:.2f} nats", flush=True)
        print(f"held-out prompts: reward-model score SFT {ev['rm_score_sft']:.2f}, PPO "
              f"{ev['rm_score_ppo']:.2f}; PPO preferred on {ev['ppo_win_rate']:.0%} "
              f"(report: {ctx.dir('eval', 'report.md')})", flush=True)

    print(f"\ndemo finished in {time.time() - t0:.0f} s; runs, checkpoints and metrics under "
          f"{ctx.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
