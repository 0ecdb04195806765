#!/usr/bin/env bash
# Starts `python -m zhchat.trainer.train` on every host of an existing Cloud TPU VM pod slice
# through `gcloud compute tpus tpu-vm ssh --worker=all` (creates no resources). Every host runs
# the same command with --distributed=auto: jax.distributed.initialize() reads the host's
# process id, the host count and the coordinator from the TPU metadata.
#
#   scripts/launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--workdir=DIR]
#       [--python=python3] [--dry_run] -- --gin_file=... --gin.X=...
#
# Everything after `--` goes to the trainer unchanged (a trainer `--dry_run` goes there too).
# --workdir: the checkout on the hosts (`~/...` expands there). --dry_run prints the gcloud
# command and the command each host runs, and exits 0.
set -euo pipefail

usage() {
  echo "usage: $0 --tpu=NAME --zone=ZONE [--project=P] [--workdir=DIR] [--python=python3]" \
       "[--dry_run] -- TRAINER_ARGS..." >&2
  [[ -n ${1:-} ]] && echo "error: $1" >&2
  exit 2
}

# shell_quote ARG: ARG as one word for bash (bare when it is plain, else double or single quotes).
shell_quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

tpu= zone= project= workdir= python=python3 dry_run=0
while (($#)); do
  case $1 in
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) usage "unknown option '$1' (trainer arguments go after --)" ;;
  esac
  shift
done
[[ -n $tpu ]] || usage "--tpu=NAME is required"
[[ -n $zone ]] || usage "--zone=ZONE is required"
(($#)) || usage "no trainer arguments after -- (e.g. -- --gin_file=models/decoder_1b.gin ...)"

remote=
if [[ -n $workdir ]]; then
  if [[ $workdir == "~" || $workdir == "~/"* ]]; then  # keep ~ outside the quotes: it expands
    rest=${workdir#"~"}; rest=${rest#/}
    remote="cd ~${rest:+/$(shell_quote "$rest")} && "
  else
    remote="cd $(shell_quote "$workdir") && "
  fi
fi
remote+="$python -m zhchat.trainer.train --distributed=auto"  # JAX finds the pod's hosts
for arg in "$@"; do remote+=" $(shell_quote "$arg")"; done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -n $project ]] && cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

printed=
for word in "${cmd[@]:0:${#cmd[@]}-1}"; do printed+="$(shell_quote "$word") "; done
printed+="--command=$(shell_quote "$remote")"
echo "$printed"
echo "# every host of $tpu runs: $remote"
((dry_run)) && exit 0
command -v gcloud >/dev/null || {
  echo "error: gcloud is not on PATH: install the Google Cloud SDK (or pass --dry_run to only" \
       "print the command)" >&2
  exit 127
}
exec "${cmd[@]}"
