#!/usr/bin/env bash
# Everything this repository checks on a GPU, in one command (a lent GPU machine's time is short):
#   1. the tests marked `gpu` (CUDA-graph decode against eager, the engine on CUDA), and the model and
#      inference tests on that machine;
#   2. greedy decoding on bench-small in bfloat16: dsv3 with CUDA graphs, dsv3 eager, transformers `generate`;
#   3. a training step on bench-small against transformers;
#   4. the FP8 Triton kernels (dsv3.quant.kernels): tests/test_quant_kernels.py compiled for this GPU (not the
#      interpreter CI uses), and benchmarks/bench_fp8_gemm.py: TFLOPS of the block-scaled GEMM against BF16 at
#      V3's shapes, the quantisers' bandwidth as a share of the HBM's (--peak-tbs, H200: 4.8). Run alone:
#      bash benchmarks/gpu_checks.sh OUTDIR fp8     (a minute or two, most of it triton compiling)
# Usage, from the repository root on a machine with CUDA and PyTorch (no install needed: src/ is put on the
# path; the tests need pytest and transformers):
#   bash benchmarks/gpu_checks.sh [OUTDIR] [fp8]  # logs and JSON land in OUTDIR (default gpu_results)
set -uo pipefail
OUT=${1:-gpu_results}
ONLY=${2:-all}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels compile for the GPU here
PY=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
$PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
# FP8 first: it is the quickest, and the part no CPU can check
$PY -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py tests/test_fp8.py 2>&1 \
    | tee "$OUT/fp8_tests.log" || status=1
$PY benchmarks/bench_fp8_gemm.py --json "$OUT/fp8_gemm.json" 2>&1 | tee "$OUT/fp8_gemm.log" || status=1
[ "$ONLY" = fp8 ] && exit $status
$PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_infer.py tests/test_model.py \
    2>&1 | tee "$OUT/tests.log" || status=1
$PY benchmarks/bench_decode.py --device cuda --dtype bfloat16 --repeats 5 --json "$OUT/decode.json" 2>&1 \
    | tee "$OUT/decode.log" || status=1
$PY benchmarks/bench_train.py --device cuda --dtype bfloat16 --json "$OUT/train.json" 2>&1 \
    | tee "$OUT/train.log" || status=1
exit $status
