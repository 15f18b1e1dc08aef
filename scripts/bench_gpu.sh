#!/usr/bin/env bash
# The GPU benchmark as one script, made for one borrowed-device call:
#   bash scripts/bench_gpu.sh [OUT_DIR] [STEPS]
# Stages, in order of value: the environment and a JAX smoke test on the GPU; the GPU
# checks (backend, cuDNN attention vs einsum); tiny and small, bfloat16, remat none /
# full: pipelined training tokens/s, MFU and memory; cached sampling at batch 1 and 8;
# a micro model's steps/s through train.py; with DATA=DIR (a corpus, e.g. the GoT
# scripts), the default tiny run and a short small run on it, each with a full-split
# evaluation.
#
# Each stage runs in the background under its own time limit and is abandoned (killed,
# not waited for) when it overruns, so one stage that hangs in the driver costs its
# limit, not the session. Its output goes to a work folder; the cleaned log is appended
# to OUT_DIR/session.log only when the stage ends, so OUT_DIR holds finished files
# whenever the call is cut off. BUDGET_S (default 480) bounds the whole script.
# VARIANTS="tiny" for one variant. Needs a CUDA build of jax; the smoke stage stops the
# script when JAX runs on the CPU, unless ALLOW_CPU=1 (STEPS=2: a smoke test here).
set -u
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-${OUT:-bench-gpu}}" && cd "${1:-${OUT:-bench-gpu}}" && pwd)
steps=${2:-20}
variants=${VARIANTS:-tiny small}
data=${DATA:-}
work=$(mktemp -d)
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))
export PYTHONUNBUFFERED=1

# The interpreter that has jax (a device image may put it in a venv off the PATH).
py=
for candidate in "${PYTHON:-}" /opt/torch/.venv/bin/python3 python3 python; do
  if [ -n "$candidate" ] && "$candidate" -c "import jax, yaml" >/dev/null 2>&1; then
    py=$(command -v "$candidate"); break
  fi
done
log() { echo "$*" | tee -a "$out/session.log"; }
[ -n "$py" ] || { log "no python with jax and yaml found"; exit 2; }

# stage NAME LIMIT_S COMMAND...: run COMMAND in the background, give up at its limit or
# the script's deadline, then append its log (progress bars stripped) to session.log.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then log "== $name: skipped, ${left} s left"; return 1; fi
  local start=$(date +%s) rc
  setsid "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && (( $(date +%s) - start < limit )); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null; rc="killed at its ${limit} s limit"
  else
    wait "$pid"; rc="exit $?"
  fi
  { echo "== $name: $rc after $(( $(date +%s) - start )) s"
    tr '\r' '\n' <"$work/$name.log" | grep -v -E '^\s*([0-9]+%\|.*)?$' | tail -n 60; } >>"$out/session.log"
  [[ $rc == "exit 0" ]]
}

log "python $py, OUT $out, steps $steps, variants $variants, data ${data:-none}"
stage env 120 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  '$py' -c 'import sys, jax, jax.numpy as jnp, flax, optax; \
print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__); \
print(jax.default_backend(), jax.devices()); x = jnp.ones((4096, 4096), jnp.bfloat16); \
print(\"matmul ok\", float((x @ x)[0, 0]))'" \
  || { log "the environment stage failed: stopping"; exit 1; }
stage check_gpu 120 "$py" -m chatgot_jax.tools.check_gpu ${ALLOW_CPU:+--allow-cpu} \
  || { [ -n "${ALLOW_CPU:-}" ] || { log "the GPU checks failed: stopping"; exit 1; }; }
for variant in $variants; do
  stage "train-$variant" 180 "$py" -m chatgot_jax.tools.bench --variant "$variant" --steps "$steps" \
    --grid "model.remat=none,full model.compute_dtype=bfloat16" \
    --out-md "$out/train-$variant.md" --out-png "$out/train-$variant.png"
done
for variant in $variants; do
  for batch in 1 8; do
    stage "sample-$variant-$batch" 60 "$py" -m chatgot_jax.tools.bench --variant "$variant" \
      --mode sample --num-samples "$batch" model.compute_dtype=bfloat16
  done
done
# Fixed per-step cost: a micro model through train.py (the loop, logging, device batches).
"$py" -c "import random; random.seed(0); w='winter is coming the north remembers'.split(); \
open('$work/corpus.txt','w').write('\n'.join('JON: '+' '.join(random.choices(w,k=8)) for _ in range(20000)))"
stage micro-train 90 "$py" train.py --data "$work/corpus.txt" --out "$work/micro-run" \
  --max-steps $(( steps * 100 )) --eval-every 1000000 --save-every 1000000 model.d_model=32 \
  model.n_layers=1 model.n_head=4 model.d_hid=64 train.sample_tokens=0 train.eval_windows=8 \
  train.log_every=100
if [ -n "$data" ]; then
  stage got-tiny 150 "$py" train.py --variant tiny --data "$data" --out "$work/got-tiny" \
    && stage got-tiny-eval 60 "$py" -m chatgot_jax.evaluate "$work/got-tiny" --json "$out/got-tiny-full.json"
  stage got-small 240 "$py" train.py --variant small --data "$data" --out "$work/got-small" \
    --max-steps "${SMALL_STEPS:-1500}" --eval-every 250 --save-every 100000 \
    && stage got-small-eval 60 "$py" -m chatgot_jax.evaluate "$work/got-small" --json "$out/got-small-full.json"
fi
log "done in $(( $(date +%s) - deadline + ${BUDGET_S:-480} )) s"
cat "$out"/train-*.md 2>/dev/null
