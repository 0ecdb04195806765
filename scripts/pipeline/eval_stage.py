"""The eval stage: SFT vs PPO policy on held-out prompts by the reward model, and the run's report."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from zhchat.scripts.pipeline.config import STAGES, Context, vocabulary
from zhchat.scripts.pipeline.train_stages import model_and_params


def stage_eval(ctx: Context) -> dict:
    """SFT vs PPO policy on held-out preference prompts, scored by the reward model."""
    import jax

    from zhchat.rl import ppo_step, rollout
    from zhchat.rl.reward_model import RewardModel
    from zhchat.rl.cli import load_params
    from zhchat.tasks.preference_reader import PreferenceExamples, _pad

    cfg = ctx.cfg
    vocab = vocabulary(ctx)
    model, sft_params = model_and_params(ctx, ctx.checkpoints("sft"))
    ppo_params = load_params(directory=ctx.checkpoints("ppo"), model=model, under=("policy",))
    rm = RewardModel(backbone=model)
    rm_params = load_params(directory=ctx.checkpoints("rm"), model=rm)
    held = PreferenceExamples(files=ctx.result("cache")["preference_files"], vocab=vocab,
                              max_prompt_len=cfg.rm_max_prompt_len, split="validation")
    examples = held.examples[:cfg.eval_prompts]
    prompts = np.asarray(rollout.left_pad(_pad([e["prompt"] for e in examples],
                                               cfg.rm_max_prompt_len), model.pad_id))
    scored = {}
    for name, params in (("sft", sft_params), ("ppo", ppo_params)):
        responses = rollout.generate(model, params, prompts, jax.random.key(cfg.seed),
                                     max_decode_length=cfg.eval_max_decode_length,
                                     temperature=0.7, top_p=0.9)
        score = ppo_step.scores(rm_params, prompts, responses, eos_id=vocab.eos_id,
                                reward_model=rm, reward_fn=None)
        scored[name] = (np.asarray(responses), np.asarray(score, np.float64))
    samples = []
    for i in range(min(cfg.eval_samples_shown, len(examples))):
        samples.append({"prompt": _user_text(_decode(vocab, examples[i]["prompt"])),
                        **{f"{n}_reply": _decode(vocab, scored[n][0][i]) for n in scored},
                        **{f"{n}_score": float(scored[n][1][i]) for n in scored}})
    result = {"prompts": len(examples),
              "rm_score_sft": float(scored["sft"][1].mean()),
              "rm_score_ppo": float(scored["ppo"][1].mean()),
              "ppo_win_rate": float((scored["ppo"][1] > scored["sft"][1]).mean()),
              "samples": samples}
    _write_report(ctx, result)
    return result


def _decode(vocab: Any, ids: Sequence[int]) -> str:
    ids = [int(t) for t in ids]
    stops = {vocab.eos_id, vocab.im_end_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return vocab.decode([t for t in ids[:cut] if t > 0])


def _user_text(prompt: str) -> str:
    """A chat prompt's turns without the template's markers (for the report)."""
    text = prompt.replace("<|im_end|>", "")
    turns = [t.strip() for t in text.split("<|im_start|>") if t.strip()]
    return " / ".join(t.split("\n", 1)[-1] if "\n" in t else t for t in turns
                      if not t.startswith("assistant"))


def _write_report(ctx: Context, ev: dict) -> None:
    """report.md: every completed stage's seconds and headline numbers, then the sample chats."""
    lines = ["| stage | seconds | result |", "|---|---:|---|"]
    for stage in STAGES[:-1]:
        if not ctx.done(stage):
            continue
        with open(ctx.dir(stage, "stage.json"), encoding="utf-8") as f:
            rec = json.load(f)
        headline = {k: v for k, v in rec["result"].items()
                    if not isinstance(v, (list, dict)) or k in ("reward_mean", "kl")}
        lines.append(f"| {stage} | {rec['seconds']} | {json.dumps(headline, ensure_ascii=False)} |")
    lines += ["", f"Held-out prompts: {ev['prompts']}; mean reward-model score SFT "
              f"{ev['rm_score_sft']:.3f}, PPO {ev['rm_score_ppo']:.3f}; PPO wins "
              f"{ev['ppo_win_rate']:.1%}.", ""]
    for s in ev["samples"]:
        lines += [f"- **prompt** {s['prompt']!r}",
                  f"  - SFT ({s['sft_score']:.2f}): {s['sft_reply']!r}",
                  f"  - PPO ({s['ppo_score']:.2f}): {s['ppo_reply']!r}"]
    os.makedirs(ctx.dir("eval"), exist_ok=True)
    with open(ctx.dir("eval", "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
