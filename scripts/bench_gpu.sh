#!/usr/bin/env bash
# The GPU benchmark as one script: tiny and small, bfloat16, remat
# none / full, training tokens/s, MFU and memory, then cached sampling.
#   bash scripts/bench_gpu.sh [OUT_DIR] [STEPS]      (VARIANTS="tiny" for one variant)
# Needs a CUDA build of jax on the machine (pip install "jax[cuda12]==<jax version>").
# On a CPU it runs the same points (slowly): STEPS=2 makes it a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-gpu}}
steps=${2:-20}
variants=${VARIANTS:-tiny small}
mkdir -p "$out"
python -c "import jax; print('devices:', jax.devices())" | tee "$out/devices.txt"
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
cat "$out"/train-*.md
