#!/usr/bin/env bash
# Real packed rows on one GPU: the decoder step on rows of a packed cache against the one-document
# upper bound, the trainer CLI end to end on that cache, and HF + torch on the same rows.
# Carry .whl/ (gin, grain, array-record, tensorboardX) and the caches named below (built on the CPU
# side: out/bench/zc100m_lm_{train,validation} are the zero_chatgpt_100m pipeline's lm caches,
# 2.3 and 3.1 documents a row):
#   OUT=... bash benchmarks/packed_gpu.sh PART... (tests | step_100m | step_1b | embed | cli | hf)
set -u
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- tests step_100m step_1b
source benchmarks/gpu_env.sh  # zhchat importable; cd /tmp; sets $repo
out=$(realpath -m "${OUT:-$repo/out/packed_results}")
mkdir -p "$out/logs" "$out/profiles"
data=${DATA:-$repo/out/bench/zc100m_lm_train}
val=${VAL:-$repo/out/bench/zc100m_lm_validation}
steps=${STEPS:-10}
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/suite.log"
  ZHCHAT_BENCH_RUN=$name timeout "$limit" "$@" --out="$out/results.jsonl" > "$out/logs/$name.log" 2>&1
  echo "   rc=$? $(tail -n 1 "$out/logs/$name.log" | cut -c1-300)" | tee -a "$out/suite.log"
}
tt=(python3 -m zhchat.benchmarks.train_throughput --steps="$steps")
segs() { echo "--gin.DecoderConfig.max_segments_per_row=$1"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
for what in "$@"; do case "$what" in
  tests)  # the cuDNN packed kernel and the decoder on it against XLA
    JAX_PLATFORMS=cuda timeout 400 python3 -m pytest -q -p no:cacheprovider \
      "$repo/tests/models/test_attention_gpu.py" "$repo/tests/models/test_decoder_gpu.py" \
      > "$out/logs/tests.log" 2>&1
    echo "== tests rc=$? $(tail -n 1 "$out/logs/tests.log")" | tee -a "$out/suite.log" ;;
  step_100m|step_1b)  # one-document rows (upper bound); real rows on the packed kernel (16 and
                      # 8 table slots a row; unsorted rows); real rows on the dense-mask path
                      # (2 slots, unsorted: nearly every batch misses the table)
    w=decoder_100m; [ "$what" = step_1b ] && w=decoder_1b
    run "${w}_onedoc" 150 "${tt[@]}" --workload=$w --unpacked
    run "${w}_real" 150 "${tt[@]}" --workload=$w --data="$data" --profile_dir="$out/profiles/${w}_real"
    run "${w}_real_segs8" 150 "${tt[@]}" --workload=$w --data="$data" "$(segs 8)"
    run "${w}_real_unsorted" 150 "${tt[@]}" --workload=$w --data="$data" --gin.DecoderConfig.sort_packed_rows=False
    run "${w}_real_masked" 150 "${tt[@]}" --workload=$w --data="$data" "$(segs 2)" \
      --gin.DecoderConfig.sort_packed_rows=False ;;
  embed)  # the embedding gradient: one-hot matmul (default) against XLA's scatter-add, real rows
    for w in decoder_100m decoder_1b; do
      run "${w}_onedoc" 150 "${tt[@]}" --workload=$w --unpacked
      run "${w}_real" 150 "${tt[@]}" --workload=$w --data="$data" --profile_dir="$out/profiles/${w}_real"
      run "${w}_real_scatter_embed" 150 "${tt[@]}" --workload=$w --data="$data" \
        --gin.DecoderConfig.embedding_grad="'scatter'"
    done ;;
  cli)  # the trainer CLI on the cache: reader, transfers, eval every 100 and checkpoints included
    run cli_decoder_100m 400 python3 -m zhchat.benchmarks.train_cli --run_dir=/tmp/cli_100m \
      --gin_file=models/decoder_100m.gin --gin_file=runs/pretrain.gin \
      --gin.TRAIN_CACHE_DIR="'$data'" --gin.EVAL_CACHE_DIR="'$val'" \
      --gin.train.eval_data=@eval/make_cache_iterator --gin.train.eval_every=100 \
      --gin.train.eval_steps=5 --gin.BATCH_SIZE=32 --gin.NUM_STEPS=300 --gin.train.log_every=25 \
      --gin.train.checkpoint_every=150 --gin.train.progress_bar=False ;;
  hf)  # HF + torch.compile on the same real rows (SDPA with a block-diagonal mask)
    run hf_compile_decoder_100m_real 400 python3 -m zhchat.benchmarks.hf_baseline \
      --workload=decoder_100m --data="$data" --compile --steps="$steps" --warmup=2
    run hf_compile_decoder_1b_real 400 python3 -m zhchat.benchmarks.hf_baseline \
      --workload=decoder_1b --data="$data" --compile --steps="$steps" --warmup=2 ;;
  *) echo "unknown part $what" >&2; exit 2 ;;
esac; done
bundle_out "$out" logs profiles  # results.jsonl, suite.log, env.txt stay beside it
exit 0
