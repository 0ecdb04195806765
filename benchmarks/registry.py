"""Named benchmarks: every result row of BENCHMARKS.md is one entry here, run by one runner.

    python -m zhchat.benchmarks.run --list
    python -m zhchat.benchmarks.run decoder_1b.packed_cache.train_step [--dry_run]
    python -m zhchat.benchmarks.run headline          # a group: the headline table's benchmarks

A benchmark is a kind (train_step, hf_baseline, train_cli, decode, convergence, evaluate, pipeline,
demo, demo_sweep, vocab, dedup, kernel), the entry-point calls that measure it (a module and its
flags, as `python -m MODULE FLAGS` would run it) and the files its numbers land in. Names read
`<model or subject>.<data>[.<variant>...].<measurement>` and stay stable: a new measurement gets a
new name, an old one leaves the registry when BENCHMARKS.md stops showing it (its history stays in
benchmarks/results/ and git). Flags may hold placeholders the runner fills: `{work}` (this
benchmark's output folder), `{work_dir}` (their parent), `{scratch}` (large run folders, emptied
before each run), `{cache}` / `{val_cache}` (the packed LM caches), `{conv}`, `{eval_data}`,
`{pipeline}`, `{demo_data}`, `{tok}`, `{t5pack}` (data folders under --data_root) and `{repo}`.

Standard library only: listing and dry runs work where gin, TensorFlow or seqio are missing.
"""

from __future__ import annotations

import dataclasses

RECORDS = "{work}/records.jsonl"  # where the json-line-emitting entry points append (--out)


@dataclasses.dataclass(frozen=True)
class Call:
    """One entry-point call: `python -m module *args` reproduces it; `entry` ("pkg.mod:fn", default
    "module:main") is the function the runner calls with `args`."""

    module: str
    args: tuple[str, ...]
    entry: str = ""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A named measurement: its calls, the result files (globs) holding its numbers, the
    environment its process needs, whose devices it reports (jax, torch or cpu) and a time limit."""

    name: str
    kind: str
    description: str
    calls: tuple[Call, ...]
    results: tuple[str, ...] = (RECORDS,)
    env: tuple[tuple[str, str], ...] = ()
    framework: str = "jax"
    timeout_s: int = 600
    label: str = ""  # convergence: the row label (--name) of this run in the folder's summary.json


REGISTRY: dict[str, Benchmark] = {}


def _add(b: Benchmark) -> None:
    if b.name in REGISTRY:
        raise ValueError(f"duplicate benchmark {b.name}")
    REGISTRY[b.name] = b


# gin flags of the variants
SCAN, T5_SCAN = "--gin.DecoderConfig.scan_layers=True", "--gin.T5Config.scan_layers=True"
MU_BF16 = "--gin.make_optimizer.mu_dtype='bfloat16'"
SCATTER = "--gin.DecoderConfig.embedding_grad='scatter'"
UNSORTED = "--gin.DecoderConfig.sort_packed_rows=False"
UNROLL_XLA = (("XLA_FLAGS",
               "--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL"),)
REMAT_DOTS, REMAT_ATTN = "dots_with_no_batch_dims_saveable", "dots_and_attention_saveable"


def remat(policy: str, model: str = "DecoderConfig") -> str:
    return f"--gin.{model}.remat_policy='{policy}'"


def segments(n: int) -> str:
    return f"--gin.DecoderConfig.max_segments_per_row={n}"


def train_step(name: str, description: str, workload: str, *flags: str, steps: int = 8,
               env: tuple[tuple[str, str], ...] = (), timeout_s: int = 300) -> None:
    """Our jitted trainer step (benchmarks/train_throughput.py)."""
    args = (f"--workload={workload}", f"--steps={steps}", *flags, f"--out={RECORDS}")
    _add(Benchmark(name, "train_step", description,
                   (Call("zhchat.benchmarks.train_throughput", args),), env=env,
                   timeout_s=timeout_s))


def hf_step(name: str, description: str, workload: str, *flags: str, compile: bool,
            steps: int = 8) -> None:
    """HF transformers + torch on the same shapes (benchmarks/hf_baseline.py)."""
    args = (f"--workload={workload}", f"--steps={steps}", *flags,
            *(("--compile",) if compile else ()), f"--out={RECORDS}")
    _add(Benchmark(name, "hf_baseline", description, (Call("zhchat.benchmarks.hf_baseline", args),),
                   framework="torch", timeout_s=400))


def decode(name: str, description: str, workload: str, system: str, *flags: str) -> None:
    """Sampling with the KV cache, one system a process (benchmarks/decode_throughput.py)."""
    args = (f"--workload={workload}", "--repeats=2", f"--systems={system}", *flags,
            f"--out={RECORDS}")
    _add(Benchmark(name, "decode", description,
                   (Call("zhchat.benchmarks.decode_throughput", args),),
                   framework="torch" if system == "hf" else "jax", timeout_s=300))


def convergence(name: str, description: str, folder: str, system: str, label: str,
                *flags: str, timeout_s: int = 900) -> None:
    """One system's curve of a comparison folder (benchmarks/convergence.py); the systems of one
    comparison share `folder`, so its table and plot hold all of them."""
    out = f"{{work_dir}}/convergence/{folder}"
    args = (f"--systems={system}", f"--name={label}", f"--out={out}", *flags)
    _add(Benchmark(name, "convergence", description, (Call("zhchat.benchmarks.convergence", args),),
                   results=(f"{out}/summary.json",), label=label,
                   env=(("JAX_PLATFORMS", "cpu"),) if system == "hf" else (),
                   framework="torch" if system == "hf" else "jax", timeout_s=timeout_s))


# --- Real packed rows (issue 17): the headline, and its variants --------------------------------
for m, size in (("decoder_100m", "100M"), ("decoder_1b", "1B")):
    train_step(f"{m}.synthetic.train_step", f"{size} decoder preset, one-document synthetic rows "
               "(no segment ids; the upper bound)", m, "--unpacked")
    train_step(f"{m}.packed_cache.train_step", f"{size} decoder preset on 8 batches of the packed "
               "cache (several documents a row)", m, "--data={cache}")
    hf_step(f"{m}.packed_cache.hf_compile", f"HF Llama + torch.compile, {size}, the same cache "
            "rows", m, "--data={cache}", "--warmup=2", compile=True)
    train_step(f"{m}.packed_cache.scatter_embed.train_step", f"{size} on the cache, XLA "
               "scatter-add embedding gradient", m, "--data={cache}", SCATTER)
    train_step(f"{m}.packed_cache.scatter_embed.segments_8.train_step", f"{size} on the cache, "
               "scatter gradient, 8 segment-table slots a row", m, "--data={cache}", SCATTER,
               segments(8), steps=10)
    train_step(f"{m}.packed_cache.scatter_embed.unsorted.train_step", f"{size} on the cache, "
               "scatter gradient, rows not sorted by document count", m, "--data={cache}", SCATTER,
               UNSORTED, steps=10)
    train_step(f"{m}.packed_cache.scatter_embed.segments_2.unsorted.train_step", f"{size} on the "
               "cache, scatter gradient, 2 slots, unsorted (mostly the dense mask)", m,
               "--data={cache}", SCATTER, segments(2), UNSORTED, steps=10)
    train_step(f"{m}.synthetic.scatter_embed.train_step", f"{size} one-document rows, scatter "
               "embedding gradient", m, "--unpacked", SCATTER)

_add(Benchmark(
    "decoder_100m.packed_cache.train_cli", "train_cli",
    "the trainer CLI end to end on the cache: 300 steps of 32, eval every 100, checkpoints at "
    "150 and 300",
    (Call("zhchat.benchmarks.train_cli", (
        "--run_dir={scratch}/run", "--name=decoder_100m.packed_cache.train_cli", f"--out={RECORDS}",
        "--gin_file=models/decoder_100m.gin", "--gin_file=runs/pretrain.gin",
        "--gin.TRAIN_CACHE_DIR='{cache}'", "--gin.EVAL_CACHE_DIR='{val_cache}'",
        "--gin.train.eval_data=@eval/make_cache_iterator", "--gin.train.eval_every=100",
        "--gin.train.eval_steps=5", "--gin.BATCH_SIZE=32", "--gin.NUM_STEPS=300",
        "--gin.train.log_every=25", "--gin.train.checkpoint_every=150",
        "--gin.train.progress_bar=False")),), timeout_s=600))

# --- Synthetic one-document rows (issue 4): decoder_1b ------------------------------------------
D1B, B16 = "decoder_1b", "--batch_size=16"
train_step("decoder_1b.synthetic.mu_bf16.train_step", "decoder_1b preset, AdamW first moment in "
           "bf16", D1B, "--unpacked", MU_BF16)
train_step("decoder_1b.synthetic.no_skip_nonfinite.train_step", "decoder_1b preset without the "
           "skip of non-finite steps", D1B, "--unpacked", "--no_skip_nonfinite")
hf_step("decoder_1b.synthetic.hf_eager", "HF LlamaForCausalLM + torch, eager, batch 8", D1B,
        compile=False)
hf_step("decoder_1b.synthetic.hf_compile", "HF LlamaForCausalLM + torch.compile, batch 8", D1B,
        compile=True)
train_step("decoder_1b.synthetic_b16.train_step", "decoder_1b preset at batch 16 x 2048", D1B,
           "--unpacked", B16)
train_step("decoder_1b.synthetic_b16.mu_bf16.train_step", "decoder_1b at batch 16, bf16 first "
           "moment", D1B, "--unpacked", B16, MU_BF16)
hf_step("decoder_1b.synthetic_b16.hf_compile", "HF Llama + torch.compile at batch 16", D1B, B16,
        compile=True)
OLD_DEC = (SCAN, remat(REMAT_DOTS))  # the preset before 2026-12-01
train_step("decoder_1b.synthetic_segments.scanned.remat_dots.train_step", "old preset (scanned, "
           "remat dots) on packed-format rows (segment ids all ones)", D1B, *OLD_DEC, "--breakdown")
train_step("decoder_1b.synthetic.scanned.remat_dots.train_step", "old preset (scanned layers, "
           "remat dots_with_no_batch_dims_saveable), static causal path", D1B, "--unpacked",
           *OLD_DEC)
train_step("decoder_1b.synthetic.scanned.remat_dots.mu_bf16.train_step", "old preset, bf16 first "
           "moment", D1B, "--unpacked", *OLD_DEC, MU_BF16)
train_step("decoder_1b.synthetic_b16.scanned.remat_dots.train_step", "old preset at batch 16", D1B,
           "--unpacked", B16, *OLD_DEC)
train_step("decoder_1b.synthetic.scanned.remat_dots.xla_unroll.train_step", "old preset, XLA fully "
           "unrolling the layer loop", D1B, "--unpacked", *OLD_DEC, env=UNROLL_XLA)
train_step("decoder_1b.synthetic.remat_dots.train_step", "unrolled layers with remat dots", D1B,
           "--unpacked", remat(REMAT_DOTS))
train_step("decoder_1b.synthetic.scanned.remat_attention.train_step", "scanned, remat "
           "dots_and_attention_saveable (keeps cuDNN's attention outputs)", D1B, "--unpacked", SCAN,
           remat(REMAT_ATTN))

# --- Synthetic rows (issue 4): T5 v1.1-large ----------------------------------------------------
T5L = "t5_large"
for batch in (64, 32, 128):
    data = "synthetic" if batch == 64 else f"synthetic_b{batch}"
    flags = () if batch == 64 else (f"--batch_size={batch}",)
    train_step(f"t5_large.{data}.train_step", f"T5 v1.1-large preset (unrolled, no remat), batch "
               f"{batch} x (512 + 114)", T5L, *flags)
    if batch != 128:
        hf_step(f"t5_large.{data}.hf_eager", f"HF T5ForConditionalGeneration eager, batch {batch}",
                T5L, *flags, compile=False)
        hf_step(f"t5_large.{data}.hf_compile", f"HF T5 + torch.compile, batch {batch}", T5L,
                *flags, compile=True)
for name, desc, flags in (
        ("scanned.remat_dots", "old preset (scanned stacks, remat dots)",
         (T5_SCAN, remat(REMAT_DOTS, "T5Config"))),
        ("scanned", "scanned stacks, no remat", (T5_SCAN,)),
        ("scanned.remat_attention", "scanned, remat dots_and_attention_saveable",
         (T5_SCAN, remat(REMAT_ATTN, "T5Config"))),
        ("remat_dots", "unrolled, remat dots", (remat(REMAT_DOTS, "T5Config"),)),
        ("remat_attention", "unrolled, remat dots_and_attention_saveable",
         (remat(REMAT_ATTN, "T5Config"),)),
        ("mu_bf16", "preset, bf16 first moment", (MU_BF16,)),
        ("xla_attention", "preset with XLA attention instead of cuDNN",
         ("--gin.T5Config.attention_impl='xla'",))):
    train_step(f"t5_large.synthetic.{name}.train_step", f"T5-large at 64: {desc}", T5L, *flags)

# --- T5 attention kernels (issue 17): the bucket kernel against cuDNN's dense bias -------------
train_step("t5_large.synthetic.pallas_attention.train_step", "T5-large at 64: self-attention "
           "through the bucket kernel (models/bucket_attention.py)", T5L,
           "--gin.T5Config.attention_impl='pallas'")
for name, desc, flags in (("train_step", "dense masks (cuDNN with [batch, heads, q, k] bias)", ()),
                          ("pallas_attention.train_step", "self-attention through the bucket kernel",
                           ("--gin.T5Config.attention_impl='pallas'",))):
    train_step(f"t5_large.packed_sft.{name}", f"T5-large on packed instruction + prompt rows "
               f"(benchmarks/t5_packed_data.sh), batch 64: {desc}", T5L,
               "--data={t5pack}/t5_sft", *flags)
# --- Prefix-LM decoder rows (issue 17): two flash calls against the dense prefix-LM mask -------
for m in ("decoder_100m", D1B):
    for name, desc, flags in (
            ("train_step", "prefix-LM attention split into bidirectional inputs + causal calls "
             "(models/prefix_attention.py)", ()),
            ("dense_mask.train_step", "the dense [batch, 1, len, len] prefix-LM mask (before)",
             ("--gin.DecoderConfig.split_prefix_attention=False",))):
        train_step(f"{m}.prefix_lm_sft.{name}", f"{m} on packed prefix-LM instruction + prompt "
                   f"rows of 2048 (benchmarks/t5_packed_data.sh): {desc}", m,
                   "--data={t5pack}/prefix_lm_sft", *flags)
for name, desc, flags in (("packed_cross.train_step", "16 table slots a row", ()),
                          ("packed_cross.segments_4.train_step", "4 table slots a row",
                           ("--gin.T5Config.max_segments_per_row=4",))):
    train_step(f"t5_large.packed_sft.{name}", "T5-large on packed instruction + prompt rows, "
               f"batch 64: cross-attention through cuDNN's packed layout, {desc} "
               "(models/cross_attention.py)", T5L, "--data={t5pack}/t5_sft",
               "--gin.T5Config.packed_cross_attention=True", *flags)
_add(Benchmark("t5_large.attention.kernels", "kernel",
               "T5 self-attention alone (T5-large encoder 512 and decoder 114 causal, encoder "
               "2048), forward + backward: the bucket kernel (first and default tiles) vs cuDNN "
               "with the dense bias and without a bias",
               (Call("zhchat.benchmarks.attention_kernels",
                     ("--cases=t5_large_encoder,t5_large_decoder,t5_encoder_2048",
                      f"--out={RECORDS}")),), timeout_s=600))

# --- Decoding (issue 4) ---------------------------------------------------------------------------
for m, flags in ((D1B, ()), (T5L, ("--prompt_len=512",))):
    decode(f"{m}.synthetic.decode", f"{m}: our jitted predict_batch, batch 64, 256 new tokens", m,
           "ours", *flags)
    decode(f"{m}.synthetic.hf_generate", f"{m}: HF generate with its KV cache, same prompts", m,
           "hf", *flags)

# --- Serving (issue 20): the HTTP server, batched vs one request at a time ----------------------
_add(Benchmark("decoder_1b.serve.throughput", "serve",
               "decoder_1b (fresh bf16 init): /v1/completions at 1/16/64/256 concurrent streaming "
               "clients, continuous batching (64 rows) vs sequential; req/s, tok/s, TTFT",
               (Call("zhchat.benchmarks.serve_throughput",
                     ("--vocab={conv}/spm.model", "--gin_file=models/decoder_1b.gin",
                      "--gin.VOCAB_SIZE=32128", "--param_dtype=bfloat16", "--max_batch=64",
                      "--max_tokens=64", f"--out={RECORDS}")),), timeout_s=600))
SERVE_1B = ("--vocab={conv}/spm.model", "--gin_file=models/decoder_1b.gin", "--gin.VOCAB_SIZE=32128",
            "--param_dtype=bfloat16", "--max_batch=64", "--max_tokens=64", f"--out={RECORDS}")
_add(Benchmark("decoder_1b.serve.backend", "serve",
               "decoder_1b: the batch backend stepped directly at 1/16/64 rows (no HTTP, no engine "
               "thread): the device's share of serving, 3072 cache slots",
               (Call("zhchat.benchmarks.serve_throughput", SERVE_1B + ("--modes=backend",)),),
               timeout_s=600))
_add(Benchmark("decoder_1b.serve.context_512.throughput", "serve",
               "decoder_1b with a 512-token context (768 cache slots): the backend alone, then "
               "the server at 1/16/64/256 clients, continuous batching",
               (Call("zhchat.benchmarks.serve_throughput",
                     SERVE_1B + ("--max_context=512", "--modes=backend,batched")),), timeout_s=600))

# --- Convergence against HF (issue 14) ------------------------------------------------------------
DEC_CONV = ("--gin_file=models/decoder_100m.gin", "--train_cache={conv}/dec_train",
            "--eval_cache={conv}/dec_val", "--batch_size=32", "--warmup_steps=100",
            "--peak_lr=3e-4", "--eval_every=200", "--eval_batches=10")
DEC1B_CONV = ("--gin_file=models/decoder_1b.gin", "--train_cache={conv}/dec_train",
              "--eval_cache={conv}/dec_val", "--batch_size=8", "--steps=500", "--warmup_steps=50",
              "--peak_lr=3e-4", "--eval_every=100", "--eval_batches=40")
T5_CONV = ("--gin_file=models/t5_small.gin", "--train_cache={conv}/t5_train",
           "--eval_cache={conv}/t5_val", "--batch_size=64", "--steps=1200", "--warmup_steps=100",
           "--eval_every=200", "--eval_batches=4")
ADAMW = ("--recipe=runs/t5_span_corruption_adamw.gin", "--peak_lr=1e-3")
ADAFACTOR = ("--recipe=runs/t5_span_corruption.gin", "--peak_lr=1e-2")
EMB002 = "--gin.T5Config.embedding_init_std=0.02"
HALF = "--gin.make_schedule.decay_steps=1200"  # 600 steps of the 1,200-step schedule
convergence("decoder_100m.conv_cache.convergence", "ours, decoder_100m, 1,200 steps of 32 x 2048",
            "dec100m", "ours", "ours", *DEC_CONV, "--steps=1200")
convergence("decoder_100m.conv_cache.hf_convergence", "HF Llama, the same rows and recipe",
            "dec100m", "hf", "hf", *DEC_CONV, "--steps=1200")
convergence("decoder_100m.conv_cache.depth_init_600.convergence", "ours, residual_init='depth', "
            "600 steps", "dec100m_600", "ours", "ours_depth", *DEC_CONV, "--steps=600", HALF,
            "--gin.DecoderConfig.residual_init='depth'")
convergence("decoder_100m.conv_cache.no_zloss_600.convergence", "ours, z-loss off, 600 steps",
            "dec100m_600", "ours", "ours_no_zloss", *DEC_CONV, "--steps=600", HALF,
            "--gin.DecoderOnlyModel.z_loss=0.0")
convergence("decoder_1b.conv_cache.convergence", "ours, decoder_1b, 500 steps of 8 x 2048", "dec1b",
            "ours", "ours", *DEC1B_CONV)
convergence("decoder_1b.conv_cache.hf_convergence", "HF Llama 1B, the same rows and recipe",
            "dec1b", "hf", "hf", *DEC1B_CONV)
convergence("t5_small.span_cache.adamw.convergence", "ours, T5-small span corruption, AdamW, "
            "embedding std 1.0", "t5small", "ours", "ours", *T5_CONV, *ADAMW)
convergence("t5_small.span_cache.adamw.emb_002.convergence", "ours, AdamW, embedding std 0.02",
            "t5small", "ours", "ours_emb002", *T5_CONV, *ADAMW, EMB002)
convergence("t5_small.span_cache.adafactor.convergence", "ours, T5's recipe (Adafactor, rsqrt "
            "1e-2), embedding std 1.0", "t5small", "ours", "ours_adafactor", *T5_CONV, *ADAFACTOR)
convergence("t5_small.span_cache.adafactor.emb_002.convergence", "ours, Adafactor, embedding std "
            "0.02", "t5small", "ours", "ours_adafactor_emb002", *T5_CONV, *ADAFACTOR, EMB002)
convergence("t5_small.span_cache.hf_convergence", "HF T5ForConditionalGeneration, AdamW, HF's init",
            "t5small", "hf", "hf", *T5_CONV, *ADAMW)

# --- Offline evaluation, the pipeline, the demo recipe, tokenizer, dedup --------------------------
_add(Benchmark(
    "decoder_1b.cmmlu_c3.evaluate", "evaluate",
    "time of CMMLU (20 subjects, 5-shot) + C3 dev on decoder_1b after one synthetic step",
    (Call("zhchat.trainer.train", (
        "--gin_file=models/decoder_1b.gin", "--gin_file=runs/pretrain.gin",
        "--gin_file=runs/synthetic_data.gin", "--gin.RUN_DIR='{scratch}/run'", "--gin.NUM_STEPS=1",
        "--gin.BATCH_SIZE=8", "--gin.train.checkpoint_every=1", "--gin.train.progress_bar=False",
        "--gin.train.async_checkpointing=False"), entry="zhchat.trainer.cli:main"),
     Call("zhchat.scripts.evaluate", (
         "--run_dir={scratch}/run", "--vocab={conv}/spm.model", "--out={work}/report",
         "--suite_gin=evals/cmmlu.gin", "--suite_gin=evals/c3.gin",
         "--gin.Suites.cmmlu_dir='{eval_data}/cmmlu'", "--gin.Suites.cmmlu_shots=[5]",
         "--gin.Suites.c3_files=['{eval_data}/c3/*-dev.json']", "--batch_size=32",
         "--max_len=2048", "--bucket=256", "--no_progress"),
         entry="zhchat.scripts.evaluate.cli:main")),
    results=("{work}/report/report.json",)))
for stages, where in (("clean,vocab,cache", "CPU"), ("pretrain,sft", "GPU"),
                      ("pairs,rm,ppo,eval", "GPU")):
    _add(Benchmark(
        f"zero_chatgpt_100m.{stages.replace(',', '_')}.pipeline", "pipeline",
        f"the 100m pipeline preset, stages {stages} ({where})",
        (Call("zhchat.scripts.pipeline", ("--gin_file=pipelines/zero_chatgpt_100m.gin",
                                          "--out_dir={pipeline}", f"--stages={stages}",
                                          f"--force={stages}"),
              entry="zhchat.scripts.pipeline.cli:main"),),
        results=tuple(f"{{pipeline}}/{s}/stage.json" for s in stages.split(",")),
        framework="jax" if where == "GPU" else "cpu", timeout_s=600 if where == "GPU" else 3600))
_add(Benchmark("demo.embedded_corpus.demo", "demo",
               "the full demo on 2 CPU cores: every stage on the corpus embedded in the repo",
               (Call("zhchat.scripts.demo", ("--out_dir={scratch}/run",)),),
               results=("{scratch}/run/*/stage.json",), timeout_s=1800))
DEMO_VARIANTS = ("base", "b8", "b4", "b8_lr6e3", "b8_lr1e2", "b8_d192", "b8_l2", "b8_l6", "b8_wd0",
                 "b8_b2_99", "b8_1500", "b8_b2_99_wd0")
_add(Benchmark("demo.pretrain_recipe.sweep", "demo_sweep",
               "the demo's pretrain stage, one change per variant, over a demo run's caches",
               (Call("zhchat.benchmarks.demo_sweep",
                     ("--data_dir={demo_data}", "--out={work}", *DEMO_VARIANTS)),),
               results=("{work}/sweep.json",), timeout_s=3600))
_add(Benchmark("tokenizer_32k.shared_corpus.vocab", "vocab",
               "32k unigram SentencePiece on the cleaned shared corpus, byte fallback on held-out",
               (Call("zhchat.tasks.tokenizer", (
                   "--input={tok}/train.jsonl.gz", "--format=jsonl", "--model_prefix={tok}/spm32k",
                   "--vocab_size=32000", "--heldout={tok}/validation.jsonl.gz",
                   "--heldout_format=jsonl")),),
               results=("{tok}/spm32k.stats.json",), framework="cpu", timeout_s=7200))
_add(Benchmark("raw_corpora.minhash_lsh.dedup", "dedup",
               "near-duplicate detection on all raw corpora: ours (Beam) vs datasketch MinHashLSH",
               (Call("zhchat.benchmarks.dedup", ("--out={work}/dedup.json",)),),
               results=("{work}/dedup.json",), framework="cpu", timeout_s=1800))

# --- Tiny CPU benchmarks: the runner's own check (not in BENCHMARKS.md) -------------------------
TINY = ("--batch_size=8", "--warmup=1", "--gin.VOCAB_SIZE=512")  # 8: the tests' forced devices
train_step("decoder_tiny.synthetic.train_step", "tiny decoder, synthetic rows (CPU smoke run)",
           "decoder_tiny", *TINY, steps=2, timeout_s=120)
train_step("t5_tiny.synthetic.train_step", "tiny T5, synthetic rows (CPU smoke run)", "t5_tiny",
           *TINY, steps=2, timeout_s=120)


def _names(prefix: str = "", *, kinds: tuple[str, ...] = (), contains: str = "") -> tuple[str, ...]:
    return tuple(n for n, b in REGISTRY.items() if n.startswith(prefix) and contains in n
                 and (not kinds or b.kind in kinds))


HEADLINE = ("decoder_100m.synthetic.train_step", "decoder_100m.packed_cache.train_step",
            "decoder_100m.packed_cache.train_cli", "decoder_100m.packed_cache.hf_compile",
            "decoder_1b.synthetic.train_step", "decoder_1b.packed_cache.train_step",
            "decoder_1b.packed_cache.hf_compile")
# named groups: what one table of BENCHMARKS.md shows (a group name has no dot)
GROUPS: dict[str, tuple[str, ...]] = {
    "headline": HEADLINE,
    "packed_variants": _names(contains="scatter_embed"),
    "decoder_1b": ("decoder_1b.synthetic.train_step", "decoder_1b.synthetic.mu_bf16.train_step",
                   "decoder_1b.synthetic.hf_eager", "decoder_1b.synthetic.hf_compile",
                   "decoder_1b.synthetic_b16.train_step",
                   "decoder_1b.synthetic_b16.mu_bf16.train_step",
                   "decoder_1b.synthetic_b16.hf_compile"),
    "decoder_1b_variants": _names("decoder_1b.synthetic", contains="remat"),
    "t5_large": _names("t5_large.synthetic", kinds=("hf_baseline",))
    + ("t5_large.synthetic.train_step", "t5_large.synthetic_b32.train_step",
       "t5_large.synthetic_b128.train_step"),
    "t5_large_variants": tuple(n for n in _names("t5_large.synthetic.", kinds=("train_step",))
                               if n != "t5_large.synthetic.train_step"),
    "t5_attention": ("t5_large.attention.kernels", "t5_large.synthetic.train_step",
                     "t5_large.synthetic.pallas_attention.train_step",
                     "t5_large.packed_sft.train_step",
                     "t5_large.packed_sft.pallas_attention.train_step"),
    "prefix_lm": _names("decoder_100m.prefix_lm_sft.") + _names("decoder_1b.prefix_lm_sft.")
    + ("decoder_100m.synthetic.train_step", "decoder_1b.synthetic.train_step"),
    "decode": _names(kinds=("decode",)),
    "skip_nonfinite": ("decoder_1b.synthetic.train_step",
                       "decoder_1b.synthetic.no_skip_nonfinite.train_step"),
    "convergence_decoder_100m": _names("decoder_100m.conv_cache.", kinds=("convergence",)),
    "convergence_decoder_1b": _names("decoder_1b.conv_cache.", kinds=("convergence",)),
    "convergence_t5_small": _names("t5_small.", kinds=("convergence",)),
    "evaluate": ("decoder_1b.cmmlu_c3.evaluate",),
    "pipeline_cpu": ("zero_chatgpt_100m.clean_vocab_cache.pipeline",),
    "pipeline_gpu": ("zero_chatgpt_100m.pretrain_sft.pipeline",
                     "zero_chatgpt_100m.pairs_rm_ppo_eval.pipeline"),
    "cpu": ("demo.embedded_corpus.demo", "demo.pretrain_recipe.sweep",
            "tokenizer_32k.shared_corpus.vocab", "raw_corpora.minhash_lsh.dedup"),
    "serve": ("decoder_1b.serve.throughput",),
    "serve_variants": ("decoder_1b.serve.backend", "decoder_1b.serve.context_512.throughput"),
    "smoke": ("decoder_tiny.synthetic.train_step", "t5_tiny.synthetic.train_step"),
}


def expand(names: list[str] | tuple[str, ...]) -> list[Benchmark]:
    """Benchmarks of the given names and group names, in order, each once."""
    out: dict[str, Benchmark] = {}
    for n in names:
        members = GROUPS.get(n, (n,))
        for m in members:
            if m not in REGISTRY:
                raise KeyError(f"unknown benchmark or group {m!r} (python -m zhchat.benchmarks.run "
                               "--list shows them)")
            out.setdefault(m, REGISTRY[m])
    return list(out.values())
