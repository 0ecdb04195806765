"""Which demo pretraining recipe learns most in the demo's time on 2 CPU cores?

    python -m zhchat.benchmarks.demo_sweep --data_dir=runs/demo --out=DIR [--steps_scale=0.1] NAME...

Runs the pipeline's own pretrain stage (gin_configs/pipelines/demo.gin plus each variant's
PipelineConfig changes and gin bindings) over the vocab and caches of an earlier demo run
(`--data_dir`, shared read-only), one run folder per variant, and writes `sweep.json` and a table:
held-out cross-entropy, the unigram baseline, tokens/s and wall time. On 2 CPU cores with
`--steps_scale` small it measures each variant's cost per step; on a GPU at full length, its
learning per step (the curves do not depend on the device), so the two together say which variant
fits the 10-minute demo best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import gin

# name -> (PipelineConfig changes, extra pretrain bindings)
VARIANTS: dict[str, tuple[dict, list[str]]] = {
    "base": ({}, []),
    "b8": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100}, []),
    "b4": ({"pretrain_batch_size": 4, "pretrain_steps": 2000, "pretrain_warmup_steps": 200}, []),
    "b8_lr6e3": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100,
                  "pretrain_peak_lr": 6e-3}, []),
    "b8_lr1e2": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100,
                  "pretrain_peak_lr": 1e-2}, []),
    "b16_lr6e3": ({"pretrain_peak_lr": 6e-3}, []),
    "b8_wd0": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
               ["make_optimizer.weight_decay = 0.0"]),
    "b8_d192": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
                ["DecoderConfig.emb_dim = 192", "DecoderConfig.num_heads = 6",
                 "DecoderConfig.num_kv_heads = 3", "DecoderConfig.mlp_dim = 512"]),
    "b8_l2": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
              ["DecoderConfig.num_layers = 2"]),
    "b8_l6": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
              ["DecoderConfig.num_layers = 6"]),
    "b8_b2_99": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
                 ["make_optimizer.b2 = 0.99"]),
    "b4_lr6e3": ({"pretrain_batch_size": 4, "pretrain_steps": 2000, "pretrain_warmup_steps": 200,
                  "pretrain_peak_lr": 6e-3}, []),
    "b8_lr6e3_wd0": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100,
                      "pretrain_peak_lr": 6e-3}, ["make_optimizer.weight_decay = 0.0"]),
    "b8_1500": ({"pretrain_batch_size": 8, "pretrain_steps": 1500, "pretrain_warmup_steps": 100}, []),
    "b8_b2_99_wd0": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
                     ["make_optimizer.b2 = 0.99", "make_optimizer.weight_decay = 0.0"]),
    "b8_b2_99_lr5e3": ({"pretrain_batch_size": 8, "pretrain_steps": 1000,
                        "pretrain_warmup_steps": 100, "pretrain_peak_lr": 5e-3},
                       ["make_optimizer.b2 = 0.99"]),
    "b8_end0": ({"pretrain_batch_size": 8, "pretrain_steps": 1000, "pretrain_warmup_steps": 100},
                ["make_schedule.end_value_ratio = 0.0"]),
}
# name -> (steps, batch size, peak lr) of the demo's T5 span corruption (scripts/demo.run_t5)
T5_VARIANTS: dict[str, tuple[int, int, float]] = {
    "t5_200": (200, 16, 3e-3), "t5_400": (400, 16, 3e-3), "t5_400_b8": (400, 8, 3e-3),
    "t5_800_b8": (800, 8, 3e-3), "t5_400_lr1e2": (400, 16, 1e-2), "t5_400_lr1e3": (400, 16, 1e-3),
}
PROMPTS = ["子曰：", "道可道，", "孔子说：", "中国人民", "天下大势，", "我们今天", "秦始皇"]


def _run_folder(name: str, data_dir: str, out: str) -> str:
    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    for stage in ("clean", "vocab", "cache", "t5"):  # the data stages' output, shared
        link = os.path.join(run_dir, stage)
        if os.path.exists(os.path.join(data_dir, stage)) and not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(data_dir, stage)), link)
    return run_dir


def samples(pipeline, ctx) -> dict:
    from zhchat.scripts import demo
    from zhchat.scripts.pipeline.config import vocabulary

    model, params = pipeline.model_and_params(ctx, ctx.checkpoints("pretrain"))
    out = {}
    for seed in (0, 1):
        for p, t in zip(PROMPTS, demo.sample(model, params, vocabulary(ctx), PROMPTS, seed=seed)):
            out.setdefault(p, []).append(t)
    return out


def run_t5_variant(name: str, *, data_dir: str, out: str, steps_scale: float) -> dict:
    from zhchat.scripts import demo, pipeline
    from zhchat.gin_configs import cli as gin_cli

    steps, batch, lr = T5_VARIANTS[name]
    steps = max(int(steps * steps_scale), 10)
    gin.clear_config()
    gin_cli.parse_gin(["pipelines/demo.gin"], [])
    run_dir = _run_folder(name, data_dir, out)
    cfg = dataclasses.replace(pipeline.PipelineConfig(), out_dir=os.path.abspath(run_dir))
    # its own run folder under a private t5/ (the shared cache is linked in)
    t5_dir = os.path.join(run_dir, "t5")
    if os.path.islink(t5_dir):
        os.remove(t5_dir)
        os.makedirs(t5_dir)
        os.symlink(os.path.abspath(os.path.join(data_dir, "t5", "cache")),
                   os.path.join(t5_dir, "cache"))
    t0 = time.time()
    res = demo.run_t5(pipeline, cfg, steps, batch, peak_lr=lr)
    return {"name": name, "steps": steps, "batch_size": batch, "peak_lr": lr,
            "loss": res["loss"], "fills": res["fills"], "seconds": time.time() - t0}


def run_variant(name: str, *, data_dir: str, out: str, steps_scale: float) -> dict:
    from zhchat.scripts import pipeline
    from zhchat.gin_configs import cli as gin_cli

    changes, bindings = VARIANTS[name]
    gin.clear_config()
    gin_cli.parse_gin(["pipelines/demo.gin"], [])
    cfg = pipeline.PipelineConfig()
    run_dir = _run_folder(name, data_dir, out)
    changes = dict(changes)
    steps = max(int(changes.get("pretrain_steps", cfg.pretrain_steps) * steps_scale), 10)
    warmup = changes.get("pretrain_warmup_steps", cfg.pretrain_warmup_steps)
    changes.update(pretrain_steps=steps, pretrain_warmup_steps=max(int(warmup * steps_scale), 1),
                   pretrain_eval_every=max(steps // 4, 5), out_dir=os.path.abspath(run_dir))
    cfg = dataclasses.replace(cfg, **changes,
                              pretrain_bindings=[*cfg.pretrain_bindings, *bindings,
                                                 f"train.checkpoint_every = {steps}"])
    t0 = time.time()
    res = pipeline.run(cfg, ["pretrain"], force=["pretrain"])["pretrain"]
    return {"name": name, "steps": steps, "batch_size": cfg.pretrain_batch_size,
            "peak_lr": cfg.pretrain_peak_lr, "bindings": bindings,
            "heldout_cross_entropy": res["heldout_cross_entropy"],
            "unigram_heldout_cross_entropy": res["unigram_heldout_cross_entropy"],
            "eval_history": [(e["step"], e["cross_entropy"]) for e in res["eval_history"]],
            "tokens_per_sec": res.get("tokens_per_sec"), "seconds": time.time() - t0,
            "samples": samples(pipeline, pipeline.Context(cfg))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=list(VARIANTS),
                   help=f"of {sorted(VARIANTS)} and {sorted(T5_VARIANTS)}")
    p.add_argument("--data_dir", required=True, help="a demo run folder with clean/ vocab/ cache/")
    p.add_argument("--out", required=True)
    p.add_argument("--steps_scale", type=float, default=1.0)
    args = p.parse_args(argv)
    unknown = sorted(set(args.names) - set(VARIANTS) - set(T5_VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)} {sorted(T5_VARIANTS)}")
    for stage in ("vocab", "cache"):
        if not os.path.exists(os.path.join(args.data_dir, stage, "stage.json")):
            p.error(f"{args.data_dir}/{stage} is not a finished stage: run the demo's data stages")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.names:
        fn = run_t5_variant if name in T5_VARIANTS else run_variant
        rows.append(fn(name, data_dir=args.data_dir, out=args.out, steps_scale=args.steps_scale))
        with open(os.path.join(args.out, "sweep.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, ensure_ascii=False)
        r = rows[-1]
        if name in T5_VARIANTS:
            print(f"SWEEP {r['name']:10s} steps {r['steps']:5d} batch {r['batch_size']:3d} "
                  f"lr {r['peak_lr']:g} loss {r['loss']:.3f} {r['seconds']:.0f} s "
                  f"{list(r['fills'].values())}", flush=True)
            continue
        for prompt, texts in r["samples"].items():
            print(f"  {prompt} -> " + " | ".join(t.replace(chr(10), "/") for t in texts))
        print(f"SWEEP {r['name']:10s} steps {r['steps']:5d} batch {r['batch_size']:3d} "
              f"held-out {r['heldout_cross_entropy']:.3f} (unigram "
              f"{r['unigram_heldout_cross_entropy']:.3f}) {r['tokens_per_sec'] or 0:.0f} tok/s "
              f"{r['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
