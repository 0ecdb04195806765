#!/usr/bin/env bash
# The issue-4 benchmark suite on one GPU: our trainer step and decoding vs HF transformers + torch,
# for the ~1B decoder and T5 v1.1-large, in one call. Results go to $OUT (default out/bench) as
# json lines, plus a log per run. Works from a plain checkout: the zhchat namespace is assembled
# from symlinks when the package is not installed (GPU images without a build toolchain).
#   bash benchmarks/gpu_suite.sh PART... (quick | train | hf_compile | hf_t5_compile | decode |
#   decoder_tune | final | decoder_variants | t5_ours | mu_bf16 | variants2 | hf_eager | variants3 |
#   t5_unrolled | t5_preset | hf_t5_b64 | t5_mu_bf16 | t5_variants4 | decoder_b16 | gpu_tests)
set -u
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- train decode
out=$(realpath -m "${OUT:-out/bench}")
mkdir -p "$out/logs" "$out/hlo"
source benchmarks/gpu_env.sh  # zhchat importable from the checkout; cd /tmp; sets $repo
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/suite.log"
  timeout "$limit" "$@" --out="$out/results.jsonl" > "$out/logs/$name.log" 2>&1
  echo "   rc=$? $(tail -n 1 "$out/logs/$name.log" | cut -c1-400)" | tee -a "$out/suite.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
} > "$out/env.txt" 2>&1; cat "$out/env.txt"
steps=${STEPS:-10}
remat() { echo "--gin.DecoderConfig.remat_policy='$1'"; }
t5remat() { echo "--gin.T5Config.remat_policy='$1'"; }
prof() { echo "--profile_dir=$out/profiles/$1"; }
unroll="--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL"
# the presets before 2026-12-01 (scanned layers, remat): the parts that measured them pin them, so
# every part still measures what BENCHMARKS.md says it did
dec_scan=--gin.DecoderConfig.scan_layers=True t5_scan=--gin.T5Config.scan_layers=True
old_remat=dots_with_no_batch_dims_saveable
old_dec=("$dec_scan" "$(remat $old_remat)") old_t5=("$t5_scan" "$(t5remat $old_remat)")
for what in "$@"; do case "$what" in
  quick)  # everything once, few steps: does the suite run on this machine?
    run quick_decoder 300 python3 -m zhchat.benchmarks.train_throughput --workload=decoder_1b --steps=3
    run quick_t5 300 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large --steps=3 ;;
  train)  # the presets against HF eager, as in BENCHMARKS.md's headline tables (rows without
          # segment ids, as HF's batch; HF T5 at 32: 64 does not fit it); then hf_compile, hf_t5_compile
    run ours_decoder_1b 200 python3 -m zhchat.benchmarks.train_throughput --workload=decoder_1b \
      --steps=$steps --unpacked
    run hf_decoder_1b 150 python3 -m zhchat.benchmarks.hf_baseline --workload=decoder_1b --steps=$steps
    run ours_t5_large 200 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large --steps=$steps
    run hf_t5_large_b32 150 python3 -m zhchat.benchmarks.hf_baseline --workload=t5_large \
      --steps=$steps --batch_size=32 ;;
  decoder_tune)  # remat policies, gradient accumulation; profiles of the candidates
    run ours_decoder_1b_remat_none 120 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps $dec_scan "$(remat none)" \
      "$(prof decoder_1b_remat_none)"
    run ours_decoder_1b_dots_saveable 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps $dec_scan "$(remat dots_saveable)"
    run ours_decoder_1b_b16_mb2_remat_none 120 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --batch_size=16 --microbatches=2 $dec_scan "$(remat none)" ;;
  hf_compile)  # the HF decoder under torch.compile
    run hf_decoder_1b_compile 240 python3 -m zhchat.benchmarks.hf_baseline --workload=decoder_1b \
      --steps=$steps --compile ;;
  final)  # after the decode and T5-mask fixes: decode, cuBLAS-only GEMMs, T5-large at 32 and 64
    run decode_ours_decoder_1b 80 python3 -m zhchat.benchmarks.decode_throughput \
      --workload=decoder_1b --repeats=2 --systems=ours
    XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run ours_decoder_1b_no_triton_gemm 70 \
      python3 -m zhchat.benchmarks.train_throughput --workload=decoder_1b --steps=$steps "${old_dec[@]}"
    run ours_t5_large_b32 200 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps --batch_size=32 "${old_t5[@]}" "$(prof t5_large_b32)"
    run ours_t5_large 150 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps "${old_t5[@]}" ;;
  decode)  # one process per system: JAX preallocates most of the GPU memory, torch would OOM
    for system in ours hf; do
      run decode_decoder_1b_$system 240 python3 -m zhchat.benchmarks.decode_throughput \
        --workload=decoder_1b --repeats=2 --systems=$system
      run decode_t5_large_$system 240 python3 -m zhchat.benchmarks.decode_throughput \
        --workload=t5_large --repeats=2 --prompt_len=512 --systems=$system
    done ;;
  decoder_variants)  # packed vs unpacked rows (static causal path), unrolled layers, batch 16
    run ours_decoder_1b_packed 110 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps "${old_dec[@]}" --breakdown "$(prof decoder_1b_packed)" \
      --hlo_out="$out/hlo/decoder_1b_packed.hlo.txt"
    run ours_decoder_1b_unpacked 110 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked "${old_dec[@]}" --breakdown \
      "$(prof decoder_1b_unpacked)" \
      --hlo_out="$out/hlo/decoder_1b_unpacked.hlo.txt"
    run ours_decoder_1b_unpacked_unrolled 150 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked --gin.DecoderConfig.scan_layers=False \
      "$(remat $old_remat)" "$(prof decoder_1b_unpacked_unrolled)"
    run ours_decoder_1b_unpacked_b16 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked --batch_size=16 "${old_dec[@]}" ;;
  t5_ours)  # the old (scanned) T5-large preset at 64 (profiled, broken down, HLO) and at 32
    run ours_t5_large 150 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps "${old_t5[@]}" --breakdown "$(prof t5_large)" --hlo_out="$out/hlo/t5_large.hlo.txt"
    run ours_t5_large_b32 100 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps --batch_size=32 "${old_t5[@]}" ;;
  mu_bf16)  # AdamW with a bf16 first moment
    run ours_decoder_1b_unpacked_mu_bf16 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked "${old_dec[@]}" \
      "--gin.make_optimizer.mu_dtype='bfloat16'" ;;
  variants2)  # no remat (unrolled decoder / scanned T5); XLA fully unrolling the scanned loops
    run ours_decoder_1b_unrolled_remat_none 150 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked --gin.DecoderConfig.scan_layers=False \
      "$(remat none)" "$(prof decoder_1b_unrolled_remat_none)"
    XLA_FLAGS="$unroll" run ours_decoder_1b_xla_unroll 150 python3 -m \
      zhchat.benchmarks.train_throughput --workload=decoder_1b --steps=$steps --unpacked \
      "${old_dec[@]}" "$(prof decoder_1b_xla_unroll)"
    run ours_t5_large_remat_none 120 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps $t5_scan "$(t5remat none)" \
      "$(prof t5_large_remat_none)"
    XLA_FLAGS="$unroll" run ours_t5_large_xla_unroll 150 python3 -m \
      zhchat.benchmarks.train_throughput --workload=t5_large --steps=$steps "${old_t5[@]}" \
      "$(prof t5_large_xla_unroll)" ;;
  hf_eager)  # HF eager on both workloads (T5 at 32: 64 runs HF out of memory, even on 141 GB)
    run hf_t5_large_b32 100 python3 -m zhchat.benchmarks.hf_baseline --workload=t5_large \
      --steps=$steps --batch_size=32
    run hf_decoder_1b 100 python3 -m zhchat.benchmarks.hf_baseline --workload=decoder_1b \
      --steps=$steps ;;
  hf_t5_compile)
    run hf_t5_large_b32_compile 200 python3 -m zhchat.benchmarks.hf_baseline --workload=t5_large \
      --steps=$steps --batch_size=32 --compile ;;
  variants3)  # the best measured decoder settings plus a bf16 first moment; attention-saving remat
    run ours_decoder_1b_unrolled_none_mu_bf16 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked --gin.DecoderConfig.scan_layers=False \
      "$(remat none)" "--gin.make_optimizer.mu_dtype='bfloat16'"
    run ours_decoder_1b_attention_saveable 90 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked $dec_scan \
      "$(remat dots_and_attention_saveable)"
    run ours_t5_large_attention_saveable 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps $t5_scan \
      "$(t5remat dots_and_attention_saveable)" "$(prof t5_large_attention_saveable)" ;;
  t5_unrolled)  # T5-large with unrolled stacks (init through a scanned twin), attention-saving remat
    run ours_t5_large_unrolled 200 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps --gin.T5Config.scan_layers=False "$(t5remat $old_remat)" \
      "$(prof t5_large_unrolled)"
    run ours_t5_large_unrolled_attention_saveable 200 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps --gin.T5Config.scan_layers=False \
      "$(t5remat dots_and_attention_saveable)"
    run ours_t5_large_attention_saveable 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps $t5_scan "$(t5remat dots_and_attention_saveable)"
    run ours_decoder_1b_scanned_attention_saveable 90 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked $dec_scan \
      "$(remat dots_and_attention_saveable)" ;;
  t5_preset)  # the T5-large preset (unrolled, no remat) at 64, profiled, and at 32
    run ours_t5_large 200 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps "$(prof t5_large)" --hlo_out="$out/hlo/t5_large.hlo.txt"
    run ours_t5_large_b32 150 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps --batch_size=32 ;;
  hf_t5_b64)  # HF T5-large at our batch of 64, eager (out of memory even on 141 GB) and compiled
    run hf_t5_large 120 python3 -m zhchat.benchmarks.hf_baseline --workload=t5_large --steps=$steps
    run hf_t5_large_compile 240 python3 -m zhchat.benchmarks.hf_baseline --workload=t5_large \
      --steps=$steps --compile ;;
  t5_mu_bf16)  # the T5-large preset with a bf16 first moment
    run ours_t5_large_mu_bf16 200 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps "--gin.make_optimizer.mu_dtype='bfloat16'" ;;
  t5_variants4)  # the T5-large preset with XLA's attention instead of cuDNN's; at batch 128
    run ours_t5_large_xla_attention 200 python3 -m zhchat.benchmarks.train_throughput \
      --workload=t5_large --steps=$steps "--gin.T5Config.attention_impl='xla'"
    run ours_t5_large_b128 200 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large \
      --steps=$steps --batch_size=128 ;;
  decoder_b16)  # the decoder preset at batch 16 × 2048 (fp32 and bf16 first moment), HF compiled
    run ours_decoder_1b_b16 100 python3 -m zhchat.benchmarks.train_throughput --workload=decoder_1b \
      --steps=$steps --unpacked --batch_size=16
    run ours_decoder_1b_b16_mu_bf16 100 python3 -m zhchat.benchmarks.train_throughput \
      --workload=decoder_1b --steps=$steps --unpacked --batch_size=16 \
      "--gin.make_optimizer.mu_dtype='bfloat16'"
    run hf_decoder_1b_b16_compile 200 python3 -m zhchat.benchmarks.hf_baseline \
      --workload=decoder_1b --steps=$steps --batch_size=16 --compile ;;
  gpu_tests)  # the GPU-only tests (cuDNN vs XLA attention, remat policies); conftest pins the CPU
    echo "== gpu_tests" | tee -a "$out/suite.log"
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider \
      "$repo/tests/models/test_decoder_gpu.py" > "$out/logs/gpu_tests.log" 2>&1
    echo "   rc=$? $(tail -n 1 "$out/logs/gpu_tests.log")" | tee -a "$out/suite.log" ;;
  *) echo "unknown part $what"; exit 2 ;;
esac; done
bundle_out "$out" logs hlo profiles  # results.jsonl, suite.log, env.txt stay beside it
exit 0
