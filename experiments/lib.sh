# Sourced by the experiment scripts once they have set DATA (the MVTec-style root) and RES (their
# results folder): the package's command line, the ImageNet AlexNet weights of the perceptual map
# and LPIPS, and the two steps each of them repeats.
DF=(python3 -m defect_fast)
export DEFECT_FAST_ALEXNET_WEIGHTS=${DEFECT_FAST_ALEXNET_WEIGHTS:-../shared/weights/alexnet-features-imagenet.pth}

# train_or_resume RUN TRAIN-OPTIONS...: a run stopped before its model file is resumed, one not
# begun is trained on $DATA with the options, a finished one is left; non-zero when training fails.
train_or_resume() {
  local run=$1
  shift
  if [ -f "$run/checkpoint.pt" ] && [ ! -f "$run/model.pt" ]; then
    "${DF[@]}" train "$DATA" --out "$run" --resume --quiet
  elif [ ! -f "$run/model.pt" ]; then
    "${DF[@]}" train "$DATA" --out "$run" "$@"
  fi
}

# evaluate RUN NAME [EVALUATE-OPTIONS...]: $RES/NAME.json, the metrics on $DATA with the run's record
# (experiments/record_eval.py), unless it exists; non-zero when evaluation fails.
evaluate() {
  local run=$1 name=$2
  shift 2
  [ -f "$RES/$name.json" ] && return
  "${DF[@]}" evaluate "$run" "$DATA" --json "$RES/$name.tmp" --overwrite "$@" || return
  python3 experiments/record_eval.py "$RES/$name.tmp" "$RES/$name.json" "$run"
}
