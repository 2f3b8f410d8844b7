#!/usr/bin/env bash
# bench/device_check.sh: the GPU check, for a CUDA machine, in under 8 minutes.
#
# Needs a Python with CUDA builds of jax and torch and this project installed (the script
# installs nothing: device machines are often offline). PYTHON picks the interpreter.
#   1. the parity battery with JAX on the GPU (lenet_parity's torch side runs on the CPU), TF32
#      off (JAX_DEFAULT_MATMUL_PRECISION=highest, NVIDIA_TF32_OVERRIDE=0 for cuBLAS/cuDNN), on
#      lenet5, lenet5_bn and cifar10_cnn: python -m lenet_parity
#   2. the two tiers at batch 128 and 1024 in float32 (both models pin full float32 products),
#      JAX jit and scan against torch eager and compiled
#   3. populations of 1, 4, 16 and 64 lenet5 seeds as one program (TF32 off)
#   4. precision: the parity battery at bfloat16 (each port against float64), and the three
#      tiers at batch 128 with --precision float32,bfloat16,tf32 (the mixed-precision tier)
# Results: bench/results/gpu_parity.txt, gpu_tiers_tf32_off.{md,json},
# gpu_population.{md,json}, gpu_precision.txt, gpu_precision_tiers.{md,json}.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=bench/results
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "error: $PYTHON's jax sees no GPU (install jax[cuda12]); nothing measured" >&2
  exit 2
fi
"$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null ||
  echo "note: torch sees no GPU: its side runs on the CPU" >&2

status=0
{
  "$PYTHON" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "torch",
torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
  for spec in lenet5 lenet5_bn cifar10_cnn; do
    echo "== $spec"
    JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 timeout 60 \
      "$PYTHON" -m lenet_parity "$spec" --steps 20 || status=1
  done
} 2>&1 | tee "$OUT/gpu_parity.txt"

variants=jax-stock-jit,jax-stock-scan,jax-fused-jit,jax-fused-scan,torch-stock-eager,torch-stock-compile
specs=lenet5,lenet5_bn,cifar10_cnn
JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 \
  "$PYTHON" -m bench --spec "$specs" --batch-sizes 128,1024 --variants "$variants" \
  --images 5120 --timeout 60 --json "$OUT/gpu_tiers_tf32_off.json" | tee "$OUT/gpu_tiers_tf32_off.md" || status=1
JAX_DEFAULT_MATMUL_PRECISION=highest NVIDIA_TF32_OVERRIDE=0 \
  "$PYTHON" -m bench --population 1,4,16,64 --spec lenet5 --images 25600 --timeout 60 \
  --json "$OUT/gpu_population.json" | tee "$OUT/gpu_population.md" || status=1
{
  for spec in lenet5 lenet5_bn; do
    echo "== $spec at bfloat16"
    timeout 120 "$PYTHON" -m lenet_parity "$spec" --precision bfloat16 --steps 5 || status=1
  done
} 2>&1 | tee "$OUT/gpu_precision.txt"
"$PYTHON" -m bench --spec "$specs" --batch-sizes 128 --variants "$variants" \
  --precision float32,bfloat16,tf32 --images 5120 --timeout 60 \
  --json "$OUT/gpu_precision_tiers.json" | tee "$OUT/gpu_precision_tiers.md" || status=1
exit $status
