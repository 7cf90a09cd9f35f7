#!/usr/bin/env bash
# kdtool distill's pending GPU figures in one device run (under 9 minutes, within the
# device's 10-minute command limit):
#   1. the GPU tests (dead leaves under cudaSyncDebugMode "error", the CUDA loop, bench);
#   2. the dead-leaves renderer's device time against a step and the previous renderer;
#   3. kdtool's loop against a straightforward fp32 loop, with a profile of kdtool's loop,
#      then again with its step compiled as CUDA graphs (--compile-mode reduce-overhead:
#      no CPU cost per kernel launch: the likely lever for the 3x goal);
#   4. CIFAR-10 ResNet-34 -> ResNet-18: fresh dead leaves against the pool, and class
#      weighting (--balance weight) against the paper's loss, in a time budget (EMA=0.995:
#      every student also with a weight average, --ema, beside its live weights), and the
#      students' learning curves (kdtool analyze curves, against seconds of steps).
# Each step has its own timeout and log in $OUT; one failing step does not stop the rest.
#
#   DATA=.gpu/cifar10 REF=.gpu/ref OUT=runs/gpu bash bench/gpu_distill.sh
#
# DATA: folder with train45k.zip and val5k.zip (a copy of ../shared/data/cifar10).
# REF: optional folder holding the previous renderer as REF/distill/noise.py, made with
#   mkdir -p .gpu/ref/distill && git show 256865f:distill/noise.py > .gpu/ref/distill/noise.py
# SMOKE=1: the same steps at toy scale on the CPU (checks the plumbing, not the figures).
set -uo pipefail
DATA=${DATA:-.data/cifar10}
OUT=${OUT:-runs/gpu_distill}
REF=${REF:-}
CIFAR_MIN=${CIFAR_MIN:-2.5}
export KDTOOL_CACHE=${KDTOOL_CACHE:-/tmp/kdtool-cache} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
. bench/install_here.sh "$OUT/install.log"

# step NAME SECONDS CMD...: run CMD under a timeout, log to $OUT/NAME.log, print its tail.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$? ($(date +%T))"
  tail -n "${TAILN:-14}" "$OUT/$name.log"
}

ref_args=()
[ -n "$REF" ] && ref_args=(--reference "$REF")
if [ -n "${SMOKE:-}" ]; then
  dev=cpu
  step pytest_gpu 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/distill
  step noise_cost 300 python3 bench/noise_cost.py --device cpu --batch 32 --repeats 2 \
    --big-limit 1 "${ref_args[@]}"
  step distill_speed 300 python3 bench/distill_speed.py --device cpu --iters 4 --epochs 1 \
    --profile "$OUT/prof" --profile-skip 2 --profile-steps 2
  step cifar_distill 600 python3 bench/cifar_distill.py --data "$DATA" --smoke --epochs 1 \
    --weighted --pool 256 --ema 0.9 --workdir "$OUT/cifar_work"
else
  dev=cuda
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/gpu.txt"
  step pytest_gpu 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  step noise_cost 60 python3 bench/noise_cost.py --device cuda --window-growth 1.3 2 3 \
    "${ref_args[@]}"
  step distill_speed 120 python3 bench/distill_speed.py --device cuda --profile "$OUT/prof"
  step distill_speed_graphs 110 python3 bench/distill_speed.py --device cuda \
    --compile-mode reduce-overhead
  TAILN=16 step cifar_distill "$(python3 -c "print(int($CIFAR_MIN * 60 + 60))")" \
    python3 bench/cifar_distill.py --data "$DATA" --budget-min "$CIFAR_MIN" \
    --teacher-epochs "${TEACHER_EPOCHS:-15}" --weighted --pool 4096 --ema "${EMA:-0}" \
    --workdir /tmp/cifar_work
fi
# The CIFAR students' learning curves against seconds of steps (fresh against pool, weighted
# against plain): one PNG, and every epoch's numbers in the CSV.
work=$OUT/cifar_work
[ -n "${SMOKE:-}" ] || work=/tmp/cifar_work
students=()
for f in "$work"/*.safetensors; do
  case $(basename "$f") in teacher_*|probe.*) ;; *) [ -e "$f" ] && students+=("$f") ;; esac
done
[ ${#students[@]} -gt 0 ] && step curves 60 python3 -m kdtool analyze curves "${students[@]}" \
  --x seconds --out "$OUT/cifar_curves" --force
echo "done on $dev ($(date +%T)); logs in $OUT"
