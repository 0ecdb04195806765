#!/usr/bin/env bash
# Convergence against HF transformers on one GPU: named parts, each one system of one comparison
# (ours and HF run in separate processes: JAX preallocates the GPU). Caches come from
# benchmarks/convergence_data.sh (built on a CPU machine with seqio) under $CONV_DATA (default
# out/conv) and travel with the checkout; carried wheels in .whl/ provide grain/gin there.
#   OUT=out/conv_results bash benchmarks/convergence_gpu.sh dec_ours dec_hf ...
# Parts: dec_ours dec_hf (decoder_100m, 1,200 steps of batch 32 x 2048, packed rows);
#   dec_depth dec_noz (600 steps of the same schedule: residual_init='depth', z-loss off);
#   t5_ours t5_hf t5_emb1 (T5 v1.1-small span corruption 512/114, AdamW, batch 64, 1,200 steps;
#   t5_emb1: our T5 with the std-1.0 embedding under AdamW).
# Each comparison folder gets curves.jsonl, table.md, summary.json and convergence.png; all of it
# is bundled into $OUT/convergence.tar.gz at the end (8 files at most come back from a call).
set -u
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # zhchat importable; cd /tmp; sets $repo
out=$(realpath -m "${OUT:-$repo/out/conv_results}")
data=$(realpath -m "${CONV_DATA:-$repo/out/conv}")
mkdir -p "$out"
conv() {  # conv NAME GROUP SYSTEM TIMEOUT ARGS...: one system's run, appended to GROUP's curves
  local name=$1 group=$2 system=$3 limit=$4; shift 4
  local cpu=""; [ "$system" = hf ] && cpu="JAX_PLATFORMS=cpu"
  echo "== $name ($group, $system): $*" | tee -a "$out/suite.log"
  env $cpu timeout "$limit" python3 -m zhchat.benchmarks.convergence --systems="$system" \
    --name="$name" --out="$out/$group" "$@" > "$out/$name.log" 2>&1
  echo "   rc=$? $(grep -v '^hf {' "$out/$name.log" | tail -n 3 | tr '\n' ' ' | cut -c1-300)" \
    | tee -a "$out/suite.log"
}
dec=(--gin_file=models/decoder_100m.gin --train_cache="$data/dec_train"
     --eval_cache="$data/dec_val" --batch_size=32 --warmup_steps=100 --peak_lr=3e-4
     --eval_every=200 --eval_batches=10)
t5=(--gin_file=models/t5_small.gin --recipe=runs/t5_span_corruption_adamw.gin
    --train_cache="$data/t5_train" --eval_cache="$data/t5_val" --batch_size=64 --steps=1200
    --warmup_steps=100 --peak_lr=1e-3 --eval_every=200 --eval_batches=4)
for part in "$@"; do case "$part" in
  dec_ours) conv ours dec100m ours 390 "${dec[@]}" --steps=1200 ;;
  dec_hf)   conv hf dec100m hf 420 "${dec[@]}" --steps=1200 ;;
  dec_depth) conv ours_depth dec100m_600 ours 200 "${dec[@]}" --steps=600 \
      --gin.make_schedule.decay_steps=1200 --gin.DecoderConfig.residual_init="'depth'" ;;
  dec_noz) conv ours_no_zloss dec100m_600 ours 200 "${dec[@]}" --steps=600 \
      --gin.make_schedule.decay_steps=1200 --gin.DecoderOnlyModel.z_loss=0.0 ;;
  t5_ours) conv ours t5small ours 150 "${t5[@]}" ;;
  t5_hf)   conv hf t5small hf 230 "${t5[@]}" ;;
  t5_emb1) conv ours_emb1 t5small ours 300 "${t5[@]}" --gin.T5Config.embedding_init_std=1.0 ;;
  *) echo "unknown part $part" | tee -a "$out/suite.log" ;;
esac; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/env.txt" 2>&1
tar -czf "$out/convergence.tar.gz" -C "$out" --exclude=convergence.tar.gz . 2>/dev/null
