#!/usr/bin/env bash
# Everything this repository checks on a GPU, in one command (a lent GPU machine's time is short):
#   1. the tests marked `gpu` (CUDA-graph decode against eager, the engine on CUDA), and the model and
#      inference tests on that machine;
#   2. greedy decoding on bench-small in bfloat16: dsv3 with CUDA graphs, dsv3 eager, transformers `generate`;
#   3. a training step on bench-small against transformers.
# Usage, from the repository root on a machine with CUDA and PyTorch (no install needed: src/ is put on the
# path; the tests need pytest and transformers):
#   bash benchmarks/gpu_checks.sh [OUTDIR]        # logs and JSON land in OUTDIR (default gpu_results)
set -uo pipefail
OUT=${1:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_infer.py tests/test_model.py \
    tests/test_fp8.py 2>&1 | tee "$OUT/tests.log" || status=1
$PY benchmarks/bench_decode.py --device cuda --dtype bfloat16 --repeats 5 --json "$OUT/decode.json" 2>&1 \
    | tee "$OUT/decode.log" || status=1
$PY benchmarks/bench_train.py --device cuda --dtype bfloat16 --json "$OUT/train.json" 2>&1 \
    | tee "$OUT/train.log" || status=1
exit $status
