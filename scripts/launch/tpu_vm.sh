#!/usr/bin/env bash
# Cloud TPU VM launcher: create a slice, install this checkout on every host, run an
# experiment on all hosts at once (one JAX process per host), follow it, stop it, delete.
#
# Usage:
#   scripts/launch/tpu_vm.sh create NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [GCLOUD_FLAGS...]
#   scripts/launch/tpu_vm.sh setup  NAME ZONE
#   scripts/launch/tpu_vm.sh run    NAME ZONE EXPERIMENT_GIN MODEL_DIR [MAIN_FLAGS...]
#   scripts/launch/tpu_vm.sh logs   NAME ZONE [WORKER]
#   scripts/launch/tpu_vm.sh stop   NAME ZONE
#   scripts/launch/tpu_vm.sh delete NAME ZONE
#
#   create  gcloud compute tpus tpu-vm create; e.g. v4-32 with tpu-ubuntu2204-base,
#           v5p-128 with v2-alpha-tpuv5, v5litepod-64 (v5e) with v2-alpha-tpuv5-lite.
#           Extra flags go to gcloud (--spot, --reserved, --network=...).
#   setup   copies this checkout (tracked and untracked, not ignored, files) to every
#           worker and installs it there: a python3.11 venv, pip install -e ".[tpu]".
#   run     starts python -m t5x_like.main --gin_file=EXPERIMENT_GIN
#           --gin.MODEL_DIR=MODEL_DIR [MAIN_FLAGS...] on every worker in the background
#           (log ~/t5x_like.log, pid ~/t5x_like.pid); FOREGROUND=1 streams all workers'
#           output instead. MODEL_DIR must be on GCS (gs://...), which every host reaches.
#   logs    follows worker WORKER's log (default 0, the one that logs metrics).
#   stop    SIGTERM to the run on every worker: it checkpoints and exits.
#   delete  deletes the slice.
#
# Environment: PROJECT (gcloud --project), TFDS_DATA_DIR and T5X_LIKE_C4_SPM_PATH (passed
# on to the run), REMOTE_DIR (checkout directory under ~ on the workers, default t5x_like),
# PYTHON (the workers' interpreter for the venv, default python3.11), DRY_RUN=1 (print the
# gcloud commands instead of running them).
#
# Example: T5 1.1 base on a v4-32
#   scripts/launch/tpu_vm.sh create t5-base us-central2-b v4-32 tpu-ubuntu2204-base
#   scripts/launch/tpu_vm.sh setup  t5-base us-central2-b
#   TFDS_DATA_DIR=gs://YOUR_BUCKET/tfds scripts/launch/tpu_vm.sh run t5-base us-central2-b \
#       experiments/t5_1_1_base_c4.gin gs://YOUR_BUCKET/t5_1_1_base_c4
#   scripts/launch/tpu_vm.sh logs   t5-base us-central2-b
#   scripts/launch/tpu_vm.sh delete t5-base us-central2-b

set -euo pipefail

REMOTE_DIR=${REMOTE_DIR:-t5x_like}
PYTHON=${PYTHON:-python3.11}
# Paths on the workers, expanded there (hence the single quotes).
# shellcheck disable=SC2016
VENV='$HOME/t5x_like_venv' LOG='$HOME/t5x_like.log' PID='$HOME/t5x_like.pid'
CHECKOUT="\$HOME/$REMOTE_DIR"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# gcloud, with --project from $PROJECT; under DRY_RUN=1 only printed.
gc() {
  local cmd=(gcloud "$@")
  if [[ -n "${PROJECT:-}" ]]; then
    cmd+=("--project=$PROJECT")
  fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "+ ${cmd[*]}"
  else
    "${cmd[@]}"
  fi
}

# Runs a shell command on every worker of the slice.
on_all_workers() {
  local name=$1 zone=$2 command=$3
  gc compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=all "--command=$command"
}

# NAME=value for each variable of the run's environment that is set here.
run_env() {
  local var out=""
  for var in TFDS_DATA_DIR T5X_LIKE_C4_SPM_PATH; do
    if [[ -n "${!var:-}" ]]; then
      out+="$var=$(printf '%q' "${!var}") "
    fi
  done
  printf '%s' "$out"
}

cmd_create() {
  (($# >= 4)) || die "create NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [GCLOUD_FLAGS...]"
  local name=$1 zone=$2 type=$3 version=$4
  shift 4
  gc compute tpus tpu-vm create "$name" "--zone=$zone" "--accelerator-type=$type" \
    "--version=$version" "$@"
}

cmd_setup() {
  (($# == 2)) || die "setup NAME ZONE"
  local name=$1 zone=$2 repo tarball
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  tarball=$(mktemp "${TMPDIR:-/tmp}/t5x_like.XXXXXX")
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
      tar --null --files-from=- --ignore-failed-read -czf "$tarball")
  fi
  gc compute tpus tpu-vm scp "$tarball" "$name:t5x_like.tar.gz" "--zone=$zone" --worker=all
  rm -f "$tarball"
  # Ubuntu 22.04 images ship python3.10; t5x_like needs >= 3.11.
  on_all_workers "$name" "$zone" "set -e
    rm -rf $CHECKOUT && mkdir -p $CHECKOUT && tar -xzf \$HOME/t5x_like.tar.gz -C $CHECKOUT
    if ! command -v $PYTHON > /dev/null || ! $PYTHON -c 'import venv, ensurepip' 2> /dev/null; then
      sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv
    fi
    [ -x $VENV/bin/python ] || $PYTHON -m venv $VENV
    $VENV/bin/pip install -q --upgrade pip
    cd $CHECKOUT && $VENV/bin/pip install -q -e '.[tpu]'
    $VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}

cmd_run() {
  (($# >= 4)) || die "run NAME ZONE EXPERIMENT_GIN MODEL_DIR [MAIN_FLAGS...]"
  local name=$1 zone=$2 experiment=$3 model_dir=$4 main
  shift 4
  main="$(run_env)$VENV/bin/python -m t5x_like.main --gin_file=$(printf '%q' "$experiment")"
  main+=" --gin.MODEL_DIR=$(printf '%q' "$model_dir")"
  # Every worker joins jax.distributed; JAX finds the pod's coordinator itself.
  main+=" --distributed=on"
  if (($# > 0)); then
    main+=" $(printf '%q ' "$@")"
  fi
  if [[ "${FOREGROUND:-0}" == 1 ]]; then
    on_all_workers "$name" "$zone" "cd $CHECKOUT && $main"
  else
    on_all_workers "$name" "$zone" \
      "cd $CHECKOUT; nohup $main > $LOG 2>&1 < /dev/null & echo \$! > $PID"
    echo "started on every worker; follow it with: $0 logs $name $zone"
  fi
}

cmd_logs() {
  (($# == 2 || $# == 3)) || die "logs NAME ZONE [WORKER]"
  gc compute tpus tpu-vm ssh "$1" "--zone=$2" "--worker=${3:-0}" "--command=tail -n 200 -F $LOG"
}

cmd_stop() {
  (($# == 2)) || die "stop NAME ZONE"
  on_all_workers "$1" "$2" "[ -f $PID ] && kill -TERM \$(cat $PID) || true"
}

cmd_delete() {
  (($# == 2)) || die "delete NAME ZONE"
  gc compute tpus tpu-vm delete "$1" "--zone=$2" --quiet
}

main() {
  local sub=${1:-}
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] || die "REMOTE_DIR=$REMOTE_DIR: use a plain name"
  case "$sub" in
    create | setup | run | logs | stop | delete)
      shift
      "cmd_$sub" "$@"
      ;;
    -h | --help | help)
      usage
      ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
