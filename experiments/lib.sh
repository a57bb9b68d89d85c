# Sourced by the experiment scripts once they have set DATA (the MVTec-style root) and RES (their
# results folder, results_dir below): the package's command line, the ImageNet AlexNet weights of
# the perceptual map and LPIPS, and the steps each of them repeats.
DF=(python3 -m defect_fast)
TRAIN_ARGV=()
# Ctrl-C stops the script: a training saves its step and exits with a status (130), which the rows'
# "|| failed=1" took for a failure, and the next row started
trap 'echo "stopped (Ctrl-C): a rerun goes on from what is saved" >&2; exit 130' INT
export DEFECT_FAST_ALEXNET_WEIGHTS=${DEFECT_FAST_ALEXNET_WEIGHTS:-../shared/weights/alexnet-features-imagenet.pth}

# results_dir DEFAULT: the results folder, $RESULTS_DIR where it is set (a relative one taken from
# the folder the script was started in, $START, which the script sets before its cd to the
# repository root), else DEFAULT (the committed results' folder). A row whose file exists there is
# skipped, so a rerun into another folder is compared with the committed file, not skipped.
results_dir() {
  if [ -n "${RESULTS_DIR:-}" ]; then
    case $RESULTS_DIR in /*) echo "$RESULTS_DIR" ;; *) echo "${START:-$PWD}/$RESULTS_DIR" ;; esac
  else
    echo "$1"
  fi
}

# needs_resume RUN: true for a run stopped before its model file: one with a checkpoint, or with
# only the config.json a training writes first (killed before its first checkpoint: train --resume
# starts it again from that config.json).
needs_resume() {
  [ ! -f "$1/model.pt" ] && { [ -f "$1/checkpoint.pt" ] || [ -f "$1/config.json" ]; }
}

# train_or_resume RUN TRAIN-OPTIONS...: a run stopped before its model file is resumed (needs_resume),
# one not begun is trained on $DATA with the options, a finished one is left; non-zero when training
# fails. TRAIN_ARGV is left holding the arguments the run is started with ($DATA --out RUN
# TRAIN-OPTIONS...), for evaluate's record.
train_or_resume() {
  local run=$1
  shift
  TRAIN_ARGV=("$DATA" --out "$run" "$@")
  if needs_resume "$run"; then
    "${DF[@]}" train "$DATA" --out "$run" --resume --quiet
  elif [ ! -f "$run/model.pt" ]; then
    "${DF[@]}" train "${TRAIN_ARGV[@]}"
  fi
}

# evaluate RUN NAME [EVALUATE-OPTIONS...]: $RES/NAME.json, the metrics on $DATA with the run's record
# (experiments/record_eval.py; the training's arguments from TRAIN_ARGV, the last train_or_resume's),
# unless it exists; non-zero when evaluation fails.
evaluate() {
  local run=$1 name=$2
  shift 2
  [ -f "$RES/$name.json" ] && return
  "${DF[@]}" evaluate "$run" "$DATA" --json "$RES/$name.tmp" --overwrite "$@" || return
  python3 experiments/record_eval.py "$RES/$name.tmp" "$RES/$name.json" "$run" -- "${TRAIN_ARGV[@]}"
}
