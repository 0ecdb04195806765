#!/usr/bin/env bash
# Convergence against HF transformers on one GPU: named parts, each one system of one comparison
# (ours and HF run in separate processes: JAX preallocates the GPU). Caches come from
# benchmarks/convergence_data.sh (built on a CPU machine with seqio) under $CONV_DATA (default
# out/conv) and travel with the checkout; carried wheels in .whl/ provide grain/gin there.
#   OUT=out/conv_results bash benchmarks/convergence_gpu.sh dec_ours dec_hf ...
# Parts: dec_ours dec_hf (decoder_100m, 1,200 steps of batch 32 x 2048, packed rows);
#   dec_depth dec_noz (600 steps of the same schedule: residual_init='depth', z-loss off);
#   t5_ours t5_hf t5_emb002 (T5 v1.1-small span corruption 512/114, AdamW, batch 64, 1,200 steps;
#   t5_emb002: our T5 with a std-0.02 embedding under AdamW);
#   dec_depth1200: residual_init='depth' over the whole 1,200-step schedule;
#   t5_ada t5_ada002 (ours only: T5's own recipe, Adafactor + rsqrt 1e-2, 100 warmup steps,
#   embedding std 1.0 / 0.02); dec1b_ours dec1b_hf (decoder_1b, 500 steps of batch 8 x 2048,
#   4,000 rows, each seen once).
# PARALLEL=1 runs the listed parts at once on the one GPU (each JAX process gets a slice of its
# memory: XLA_PYTHON_CLIENT_MEM_FRACTION), for parts too small to fill it alone.
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
  [ -n "${MEM:-}" ] && [ "$system" = ours ] && cpu="XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM"
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
dec1b=(--gin_file=models/decoder_1b.gin --train_cache="$data/dec_train"
       --eval_cache="$data/dec_val" --batch_size=8 --steps=500 --warmup_steps=50 --peak_lr=3e-4
       --eval_every=100 --eval_batches=40)
t5ada=(--gin_file=models/t5_small.gin --recipe=runs/t5_span_corruption.gin
       --train_cache="$data/t5_train" --eval_cache="$data/t5_val" --batch_size=64 --steps=1200
       --warmup_steps=100 --peak_lr=1e-2 --eval_every=200 --eval_batches=4)
run_part() {
  local part=$1
  case "$part" in
  dec_ours) conv ours dec100m ours 390 "${dec[@]}" --steps=1200 ;;
  dec_hf)   conv hf dec100m hf 420 "${dec[@]}" --steps=1200 ;;
  dec_depth) conv ours_depth dec100m_600 ours 200 "${dec[@]}" --steps=600 \
      --gin.make_schedule.decay_steps=1200 --gin.DecoderConfig.residual_init="'depth'" ;;
  dec_noz) conv ours_no_zloss dec100m_600 ours 200 "${dec[@]}" --steps=600 \
      --gin.make_schedule.decay_steps=1200 --gin.DecoderOnlyModel.z_loss=0.0 ;;
  t5_ours) conv ours t5small ours 150 "${t5[@]}" ;;
  t5_hf)   conv hf t5small hf 230 "${t5[@]}" ;;
  t5_emb002) MEM=0.15 conv ours_emb002 t5small_emb002 ours 300 "${t5[@]}" \
      --gin.T5Config.embedding_init_std=0.02 ;;
  dec_depth1200) MEM=0.4 conv ours_depth dec100m_depth ours 480 "${dec[@]}" --steps=1200 \
      --gin.DecoderConfig.residual_init="'depth'" ;;
  t5_ada) MEM=0.15 conv ours_adafactor t5small_ada ours 300 "${t5ada[@]}" ;;
  t5_ada002) MEM=0.15 conv ours_adafactor_emb002 t5small_ada002 ours 300 "${t5ada[@]}" \
      --gin.T5Config.embedding_init_std=0.02 ;;
  dec1b_ours) MEM=0.4 conv ours dec1b_ours ours 480 "${dec1b[@]}" ;;
  dec1b_hf) conv hf dec1b_hf hf 540 "${dec1b[@]}" ;;
  *) echo "unknown part $part" | tee -a "$out/suite.log" ;;
  esac
}
for part in "$@"; do
  if [ -n "${PARALLEL:-}" ]; then run_part "$part" & sleep 5; else run_part "$part"; fi
done
wait
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/env.txt" 2>&1
tar -czf "$out/convergence.tar.gz" -C "$out" --exclude=convergence.tar.gz . 2>/dev/null
