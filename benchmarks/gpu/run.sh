#!/usr/bin/env bash
# The accelerator run: environment, tests, benchmarks and the paper's suites, each step under
# its own time limit, every result packed under $OUT (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/run.sh              # on the device: OUT is set there
#   bash benchmarks/gpu/run.sh --dry-run    # every step at tiny sizes on a CPU, minutes
#
# Environment: PYTHON (python3), OUT (results; default /tmp/fedjax_gpu_out), DATA_DIR
# (.device/fashion-mnist), DEADLINE_S (the whole run: 500 s; dry 2400), LIMIT_SCALE (step
# limits times this: 1; dry 6), STEPS (the steps to run, in that order; default $ALL below),
# CURVE_E (1,4,16,64,256), TEST_WORKERS (8, dry 2; with pytest-xdist).
# A step that fails or runs out of time is recorded and the run goes on; the results are
# packed after every step, so a run stopped from outside still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

DRY=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fedjax_gpu_out}
DATA=${DATA_DIR:-$ROOT/.device/fashion-mnist}
if [ "$DRY" = 1 ]; then DEADLINE=${DEADLINE_S:-2400}; else DEADLINE=${DEADLINE_S:-500}; fi
# Step limits x SCALE: a CPU compiles the same programs several times slower.
if [ "$DRY" = 1 ]; then SCALE=${LIMIT_SCALE:-6}; else SCALE=${LIMIT_SCALE:-1}; fi
CURVE_E=${CURVE_E:-1,4,16,64,256}
RESERVE=20 # seconds kept for the report and the packing
ALL="env tests k5_xla k5_im2col curve_e k50_xla k50_im2col memory cifar_xla cifar_im2col"
ALL+=" paper_label_flipping paper_attack_timing paper_availability"
STEPS=${STEPS:-$ALL}

WORK=$(mktemp -d /tmp/fedjax_gpu.XXXXXX)
mkdir -p "$OUT" "$WORK/logs" "$WORK/results/throughput" "$WORK/results/paper"
LOG=$OUT/log.txt
: >"$LOG"
: >"$WORK/steps.tsv"
export PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
# Programs compiled by one step and run again by another (E=1 of the curve is the k=5 round).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fedjax_gpu_jax_cache}
START=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

pack() { # results and logs in one archive (checkpoints left out), in parts if over 15 MiB
  rm -f "$OUT"/results.tar.gz*
  tar -czf "$WORK/results.tar.gz" --exclude=checkpoints -C "$WORK" results logs steps.tsv
  if [ "$(stat -c %s "$WORK/results.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d "$WORK/results.tar.gz" "$OUT/results.tar.gz.part"
  else
    cp "$WORK/results.tar.gz" "$OUT/results.tar.gz"
  fi
}

# step NAME LIMIT_S COMMAND...: runs COMMAND (from the repository) under min(LIMIT_S, the
# time left), its output in logs/NAME.log and in the main log.
step() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local left=$((DEADLINE - (SECONDS - START) - RESERVE))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    say "== $name: skipped, ${left}s left"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$WORK/steps.tsv"
    return 0
  fi
  say "== $name (limit ${limit}s, $((SECONDS - START))s into the run): $*"
  local t0=$SECONDS rc status
  timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status=timed_out ;;
    *) status="failed_rc$rc" ;;
  esac
  cat "$WORK/logs/$name.log" >>"$LOG"
  tail -n 12 "$WORK/logs/$name.log"
  say "== $name: $status in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >>"$WORK/steps.tsv"
  pack
}

say "fedjax-poison accelerator run: $(date -u), dry run $DRY, deadline ${DEADLINE}s, $PY"
say "commit (when .device was prepared): $(cat .device/commit.txt 2>/dev/null || echo '?')"

# The machine's flax/optax/orbax, unless they fail to import: then the ones tested here.
if ! "$PY" benchmarks/gpu/steps.py imports >>"$LOG" 2>&1 && ls .device/fallback/*.whl >/dev/null 2>&1; then
  say "installing .device/fallback: $(ls .device/fallback)"
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site_fallback .device/fallback/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/site_fallback:$PYTHONPATH
  "$PY" benchmarks/gpu/steps.py imports >>"$LOG" 2>&1 || say "imports still fail: see the log"
fi

RES=$WORK/results
TP=("$PY" benchmarks/gpu/steps.py throughput --data-dir "$DATA" --)
# Needs several devices or the CPU backend: the sharding tests, the two-process run on CPU
# devices, and the benchmark test that expects one CPU device per core.
TESTS=(-m "not slow" --ignore=tests/test_sharding.py --ignore=tests/test_multihost.py)
TESTS+=(--ignore=tests/test_throughput.py -p no:cacheprovider -v -rfE --durations=15)
TESTS+=(--junitxml="$RES/tests.xml")
WORKERS=${TEST_WORKERS:-8}
[ "$DRY" = 1 ] && WORKERS=${TEST_WORKERS:-2}
if "$PY" -c "import xdist" 2>/dev/null; then TESTS+=(-n "$WORKERS"); fi

if [ "$DRY" = 0 ]; then
  K5=(--data files --clients-per-round 5 --repeats 3 --curves none)
  K50=(--data files --clients-per-round 50 --repeats 2 --curves none)
  CIFAR=(--dataset cifar10 --data synthetic --repeats 3 --curves none)
  CURVE=(--data files --clients-per-round 5 --curve-e "$CURVE_E" --curve-repeats 2)
  MEMORY=(--dataset both --clients 5,20,50 --experiments 1,16,64)
  TEST_FILES=()
  SMALL=()
else # tiny sizes; the code paths of the real run
  # Synthetic data with a small test set: a round is timed as (round + evaluation) less
  # evaluation, which a tiny round on the 10,000 real test images leaves in the noise.
  TINY=(--data synthetic --num-clients 8 --examples-per-client 32 --test-size 40 --repeats 1)
  K5=("${TINY[@]}" --clients-per-round 2 --curves none --no-one-device-rows)
  K50=("${TINY[@]}" --clients-per-round 4 --curves none --no-one-device-rows)
  CIFAR=("${TINY[@]}" --dataset cifar10 --clients-per-round 2 --curves none --no-one-device-rows)
  CURVE=("${TINY[@]}" --clients-per-round 2 --curve-e 1,2 --curve-repeats 1)
  MEMORY=(--dataset fashion_mnist --clients 2,5 --experiments 1,2)
  TEST_FILES=(tests/test_metrics.py tests/test_selection.py)
  SMALL=(--small)
fi

# One function a step, run in the order of STEPS.
s_env() { step env 45 "$PY" benchmarks/gpu/steps.py env --out "$RES/env.json" "${SMALL[@]}"; }
s_tests() { # several test processes share the GPU: each takes memory as it needs it
  step tests 90 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest "${TESTS[@]}" "${TEST_FILES[@]}"
}
s_k5_xla() { step k5_xla 60 "${TP[@]}" "${K5[@]}" --conv-impl xla --out "$RES/throughput/fmnist_k5_xla"; }
s_k5_im2col() { step k5_im2col 45 "${TP[@]}" "${K5[@]}" --conv-impl im2col --out "$RES/throughput/fmnist_k5_im2col"; }
s_curve_e() {
  step curve_e 90 "$PY" benchmarks/gpu/steps.py curve-e --data-dir "$DATA" -- "${CURVE[@]}" \
    --conv-impl xla --out "$RES/throughput/curve_e_xla"
}
s_k50_xla() { step k50_xla 45 "${TP[@]}" "${K50[@]}" --conv-impl xla --out "$RES/throughput/fmnist_k50_xla"; }
s_k50_im2col() { step k50_im2col 45 "${TP[@]}" "${K50[@]}" --conv-impl im2col --out "$RES/throughput/fmnist_k50_im2col"; }
s_memory() { step memory 60 "$PY" benchmarks/memory.py "${MEMORY[@]}"; }
s_cifar_xla() { step cifar_xla 60 "${TP[@]}" "${CIFAR[@]}" --conv-impl xla --out "$RES/throughput/cifar10_k5_xla"; }
s_cifar_im2col() { step cifar_im2col 60 "${TP[@]}" "${CIFAR[@]}" --conv-impl im2col --out "$RES/throughput/cifar10_k5_im2col"; }
paper() {
  local tiny=() # dry run: 2 or 3 experiments of each suite, 2 rounds
  if [ "$DRY" = 1 ]; then
    tiny=(--config.num_rounds=2 --config.eval_every=2 --config.num_clients=2000)
    tiny+=("--config.sweep.seed=(0,)")
    case $1 in
      label_flipping) tiny+=("--config.sweep.malicious_fraction=(0.0,0.5)" "--config.sweep.flips=('6:0',)") ;;
      availability) tiny+=("--config.sweep.alpha=(0.0,(0.0,0.6))") ;;
    esac
  fi
  step "paper_$1" 400 "$PY" launch.py "--config=configs/paper/$1.py:dataset=fashion_mnist" \
    --config.data.source=files "--config.data.dir=$DATA" --config.sweep.max_parallel=0 \
    "--workdir=$RES/paper/$1" "${tiny[@]}"
}
s_paper_label_flipping() { paper label_flipping; }
s_paper_attack_timing() { paper attack_timing; }
s_paper_availability() { paper availability; }

for name in $STEPS; do
  if declare -F "s_$name" >/dev/null; then "s_$name"; else say "== $name: no such step"; fi
done

"$PY" benchmarks/gpu/steps.py report --work "$WORK" --steps "$WORK/steps.tsv" \
  --out "$OUT/summary.md" >>"$LOG" 2>&1 || say "report failed: see the log"
pack
if [ "$(stat -c %s "$LOG")" -gt $((15 * 1024 * 1024)) ]; then # what comes back: 16 MiB a file
  { head -c 1M "$LOG" && echo "[... cut: every step's whole log is in results.tar.gz ...]" &&
    tail -c 14M "$LOG"; } >"$WORK/log.txt" && mv "$WORK/log.txt" "$LOG"
fi
say "done in $((SECONDS - START))s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md" 2>/dev/null
rm -rf "$WORK"
